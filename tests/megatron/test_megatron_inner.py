"""MegatronMuon in one process (no process group): step telemetry and checkpoints that keep
this run's layouts."""

from __future__ import annotations

import torch

from muon_megatron.distributed import ParamLayout
from muon_megatron.megatron.inner import MegatronMuon, OptimizerStateMismatch, tensorboard_hook


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = (value, step)


def _optimizer(report=True):
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(4))
    groups = [
        {"params": [w], "use_muon": True, "layouts": [ParamLayout("w", (6, 4))], "names": ["w"]},
        {"params": [b], "use_muon": False, "names": ["b"]},
    ]
    opt = MegatronMuon(groups, lr=0.01, ns_dtype=torch.float32, report_update_rms=report)
    w.grad, b.grad = torch.randn(6, 4), torch.randn(4)
    return opt


def test_step_hook_writes_step_time_newton_schulz_time_and_update_rms_to_the_writer():
    opt = _optimizer()
    writer = FakeWriter()
    opt.step_hooks.append(tensorboard_hook(lambda: writer, lambda: 7))
    opt.step()
    assert writer.scalars["muon/optimizer-step-seconds"][1] == 7
    assert writer.scalars["muon/optimizer-step-seconds"][0] > 0
    ns_seconds, step = writer.scalars["muon/newton-schulz-seconds"]
    assert step == 7 and 0 < ns_seconds <= writer.scalars["muon/optimizer-step-seconds"][0]
    assert "muon/update-rms/muon-group0" in writer.scalars and "muon/update-rms/adamw-group1" in writer.scalars


def test_checkpoint_carries_no_layouts_and_loading_keeps_this_runs_layouts():
    opt = _optimizer(report=False)
    opt.step()
    sd = opt.state_dict()
    assert all("layouts" not in g for g in sd["param_groups"])
    other = _optimizer(report=False)
    layouts = other.param_groups[0]["layouts"]
    other.load_state_dict(sd)
    assert other.param_groups[0]["layouts"] is layouts
    assert torch.equal(
        other.state[other.param_groups[0]["params"][0]]["momentum_buffer"],
        opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"],
    )


def test_adamw_state_is_refused_with_the_flag_to_use():
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))])
    try:
        _optimizer().load_state_dict(adam.state_dict())
    except OptimizerStateMismatch as err:
        assert "--no-load-optim" in str(err)
    else:
        raise AssertionError("AdamW state was accepted")
