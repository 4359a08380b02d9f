"""Run an unmodified DeepSpeed or Hugging Face training script with muon_megatron's Muon active.

    muon-megatron deepspeed train.py ARGS...                                   # one process
    torchrun --nproc-per-node 8 -m muon_megatron.deepspeed.launch train.py ARGS...
    deepspeed --num_gpus 8 --module muon_megatron.deepspeed.launch train.py ARGS...
    accelerate launch --module muon_megatron.deepspeed.launch train.py ARGS...

:func:`main` calls :func:`muon_megatron.deepspeed.install` (so ``deepspeed.initialize``, as the
script, the Hugging Face Trainer or Accelerate call it, builds this package's Muon for
``"optimizer": {"type": "muon"}``) and then runs the script as ``__main__`` with its own arguments.
:func:`add_arguments` / :func:`run` are the ``muon-megatron deepspeed`` subcommand.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..launcher import add_script_arguments, run_script


def _install() -> None:
    from .activation import install

    install()


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_script(argv, _install, __doc__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_script_arguments(parser, "training script that calls deepspeed.initialize (directly, or through the Hugging "
                                 "Face Trainer or Accelerate)")


def run(args: argparse.Namespace) -> int:
    main([args.script, *args.script_args])
    return 0


if __name__ == "__main__":
    main()
