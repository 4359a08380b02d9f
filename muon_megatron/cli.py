"""The ``muon-megatron`` command: one subcommand per entry of :data:`SUBCOMMANDS`.

Each entry names the module that implements it; the module is imported only when its subcommand
runs (or is asked for ``--help``), so ``muon-megatron --help`` needs neither engine and a
subcommand's optional dependencies are needed only by that subcommand.

To add a subcommand, write a module with two functions,

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...   # declare its flags
    def run(args: argparse.Namespace) -> int | None: ...              # do it; the exit status

and add one line to :data:`SUBCOMMANDS`: ``"name": Subcommand("package.module", "one-line help")``.
Function names other than ``add_arguments`` / ``run`` can be given as ``add_arguments=`` / ``run=``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Subcommand:
    """A subcommand, loaded lazily from ``module``."""

    module: str
    """Dotted path of the module implementing it."""
    help: str
    """One line for ``muon-megatron --help``."""
    add_arguments: str = "add_arguments"
    """Name of ``fn(parser) -> None`` in ``module`` that declares the subcommand's flags."""
    run: str = "run"
    """Name of ``fn(args) -> int | None`` in ``module`` that runs it and returns the exit status."""

    def function(self, attribute: str) -> Callable:
        module = importlib.import_module(self.module)
        try:
            return getattr(module, getattr(self, attribute))
        except AttributeError:
            raise AttributeError(f"{self.module} has no function {getattr(self, attribute)!r} ({attribute})") from None


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("muon_megatron.demo.command", "Moonlight-mini (or a byte-level LM) on the Python stdlib through an engine adapter: Muon vs AdamW"),
    "plan": Subcommand("muon_megatron.sizing", "Muon's per-rank memory, Newton-Schulz work and traffic for a Megatron layout"),
    "analyze": Subcommand("muon_megatron.analysis", "SVD entropy of a checkpoint's weight matrices (Moonlight's comparison)"),
    "megatron": Subcommand("muon_megatron.megatron.launch", "run a Megatron training script with --optimizer muon installed"),
    "deepspeed": Subcommand("muon_megatron.deepspeed.launch", "run a DeepSpeed or Hugging Face training script with \"type\": \"muon\" meaning muon_megatron's Muon"),
    "patch": Subcommand("muon_megatron.patch_cli", "check, apply or revert the --optimizer muon patch on a Megatron or DeepSpeed tree"),
}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``selected`` only (importing that subcommand's module alone)."""
    parser = argparse.ArgumentParser(
        prog="muon-megatron",
        description="Moonlight's Muon optimizer for Megatron-LM and DeepSpeed.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, entry in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=entry.help, description=entry.help)
        if name == selected:
            entry.function("add_arguments")(sub_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    status = SUBCOMMANDS[args.command].function("run")(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
