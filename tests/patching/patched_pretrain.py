"""Worker: Megatron's own ``pretrain()`` with ``--optimizer muon`` on a patched megatron-core 0.19
tree, without ``muon_megatron.megatron.install()``: the patch alone must route the flags, the
validation and the optimizer to muon_megatron (tests only; reuses tests/megatron's worker)."""

from __future__ import annotations


def pretrain_worker_without_install(rank, world, extra_args):
    import megatron.training.arguments as training_arguments

    import muon_megatron.megatron as mm
    import mcore_pretrain

    mm.install = lambda *a, **k: None  # the patched tree must not need it
    assert "muon_megatron.patching.hooks" in open(training_arguments.__file__).read(), training_arguments.__file__
    out = mcore_pretrain.pretrain_worker(rank, world, extra_args)
    out["arguments_file"] = training_arguments.__file__
    return out
