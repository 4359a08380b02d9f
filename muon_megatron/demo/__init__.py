"""``muon-megatron demo``: Muon against AdamW on Moonlight-mini or a byte-level transformer.

Modules: :mod:`.data` (the standard-library corpus and the lr schedule), :mod:`.byte_lm` (the small
byte-level model), :mod:`.engines` (one runner per engine and the one training loop),
:mod:`.report` (summary, table, plot) and :mod:`.command` (the subcommand's flags and ``run``).
"""

from .command import add_arguments, run
from .data import load_corpus, lr_factor, sample_batch, stdlib_source_files

__all__ = ["add_arguments", "load_corpus", "lr_factor", "run", "sample_batch", "stdlib_source_files"]
