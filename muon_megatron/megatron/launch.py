"""Run an unmodified Megatron training script with muon-megatron installed.

    python -m muon_megatron.megatron.launch pretrain_gpt.py --optimizer muon ...
    torchrun --nproc-per-node 8 -m muon_megatron.megatron.launch pretrain_gpt.py --optimizer muon ...

:func:`main` calls :func:`muon_megatron.megatron.install` and then runs the script as
``__main__`` with its own arguments (``sys.argv`` as the script would see it).
:func:`add_arguments` / :func:`run` are the ``muon-megatron megatron SCRIPT ARGS...`` subcommand.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..launcher import add_script_arguments, run_script


def _install() -> None:
    from . import install

    install()


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_script(argv, _install, __doc__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_script_arguments(parser, "Megatron training script, e.g. pretrain_gpt.py")


def run(args: argparse.Namespace) -> int:
    main([args.script, *args.script_args])
    return 0


if __name__ == "__main__":
    main()
