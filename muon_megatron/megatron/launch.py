"""Run an unmodified Megatron training script with muon-megatron installed.

    python -m muon_megatron.megatron.launch pretrain_gpt.py --optimizer muon ...
    torchrun --nproc-per-node 8 -m muon_megatron.megatron.launch pretrain_gpt.py --optimizer muon ...

:func:`main` calls :func:`muon_megatron.megatron.install` and then runs the script as
``__main__`` with its own arguments (``sys.argv`` as the script would see it).
:func:`add_arguments` / :func:`run` are the ``muon-megatron megatron SCRIPT ARGS...`` subcommand.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"muon-megatron: training script {script!r} not found")
    from . import install

    install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's arguments: the training script, then everything for it."""
    parser.add_argument("script", help="Megatron training script, e.g. pretrain_gpt.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")


def run(args: argparse.Namespace) -> int:
    main([args.script, *args.script_args])
    return 0


if __name__ == "__main__":
    main()
