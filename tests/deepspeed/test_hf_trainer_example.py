"""``examples/hf_trainer``: the Hugging Face Trainer with a DeepSpeed JSON ``"type": "muon"``,
launched unmodified through ``muon_megatron.deepspeed.launch`` (torchrun, two CPU ranks, ZeRO-1).

Checks the real entry point end to end: the Trainer's ``"auto"`` values reach our optimizer (the
betas/eps of the AdamW half come from ``TrainingArguments``), the routing is Moonlight's, and the
first update equals a single-process :class:`muon_megatron.Muon` step on the same global batch
(float32 Newton-Schulz; tolerance 1e-5 relative per tensor, where float32 reductions in another
order land near 1e-7 and a missing orthogonalisation or another scale is off by order 1).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer" / "train.py"
BETA2 = 0.98  # not the package's default (0.95): it can only come from TrainingArguments.adam_beta2
# A DeepSpeed CPU quirk kept out of the test: the shared-memory all-reduce op is JIT-built and
# leaves /dev/shm buffers behind; gloo does the collectives.
SITECUSTOMIZE = "import deepspeed.ops\ndeepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] = False\n"


def _example_module():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found beside the interpreter")
    tmp = tmp_path_factory.mktemp("hf")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "muon_megatron.deepspeed.launch", str(EXAMPLE),
         "--max-steps", "1", "--ns-dtype", "float32", "--adam-beta2", str(BETA2), "--record", str(tmp / "rec"),
         "--out", str(tmp / "out")],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(tmp / "rec" / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_trainer_builds_our_muon_with_the_auto_values_filled_from_training_arguments(records):
    for rec in records:
        assert (rec["optimizer"], rec["wrapper"]) == ("DeepSpeedMuon", "DeepSpeedZeroOptimizer")
        muon, adamw = rec["groups"]
        assert muon["use_muon"] and not adamw["use_muon"]
        assert all(n.endswith("_proj.weight") for n in muon["names"]) and len(muon["names"]) == 2 * 7
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(adamw["names"])
        for g in (muon, adamw):
            assert (g["lr"], g["weight_decay"], g["adamw_betas"], g["adamw_eps"]) == (3e-3, 0.1, (0.9, BETA2), 1e-8)


def test_first_update_equals_the_single_process_muon_step_on_the_global_batch(records):
    from muon_megatron import Muon, muon_param_groups

    example = _example_module()
    model = example.build_model()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), records[0]["initial"][name]), name
    # each rank's mean loss over its own batch; DeepSpeed averages the ranks' gradients
    loss = sum(model(input_ids=rec["batches"][0], labels=rec["batches"][0]).loss for rec in records) / len(records)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    Muon(muon_param_groups(model), lr=3e-3, weight_decay=0.1, adamw_betas=(0.9, BETA2), adamw_eps=1e-8,
         ns_dtype=torch.float32).step()
    for name, p in model.named_parameters():
        final = records[0]["final"][name]
        assert torch.equal(final, records[1]["final"][name]), name  # the ranks agree
        change = (final - records[0]["initial"][name]).norm()
        assert float((final - p.detach()).norm() / change) < 1e-5, name
