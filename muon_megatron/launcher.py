"""Running a user's training script unchanged with one of the engine adapters installed.

Both adapters' launchers (:mod:`muon_megatron.megatron.launch`, :mod:`muon_megatron.deepspeed.launch`)
are this one function with their own ``install``: install, then run the script as ``__main__``
with ``sys.argv`` as the script would see it and its folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Callable, Optional, Sequence


def run_script(argv: Optional[Sequence[str]], install: Callable[[], None], usage: str) -> None:
    """``argv`` (default ``sys.argv[1:]``): the script, then its arguments. ``--help`` or nothing
    prints ``usage``; a missing script is a SystemExit naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage.strip())
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"muon-megatron: training script {script!r} not found")
    install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def add_script_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """A launcher subcommand's arguments: the training script (``what`` it is), then its own."""
    parser.add_argument("script", help=what)
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
