"""``collective_device``: CPU tensors for gloo, the current CUDA device for NCCL, a clear error
otherwise (NCCL rejects CPU tensors with "No backend type associated with device type cpu")."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from muon_megatron.distributed import any_rank, collective_device
from muon_megatron.distributed import comm


@pytest.fixture
def gloo_world(tmp_path):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_no_process_group_is_cpu():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    assert collective_device() == torch.device("cpu")


def test_gloo_group_takes_cpu_tensors(gloo_world):
    device = collective_device()
    assert device == torch.device("cpu")
    flag = torch.tensor([3.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # would raise on a backend without CPU support
    assert flag.item() == 3.0


@pytest.mark.parametrize("config, cuda, want", [
    ("cuda:nccl", True, torch.device("cuda", 2)),
    ("cpu:gloo,cuda:nccl", True, torch.device("cpu")),
    ("cpu:gloo,cuda:gloo", False, torch.device("cpu")),
])
def test_backend_config_decides(gloo_world, monkeypatch, config, cuda, want):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert collective_device() == want


def test_nccl_without_cuda_names_the_backend(gloo_world, monkeypatch):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="takes tensors on \\['cuda'\\]"):
        collective_device()


@pytest.mark.parametrize("name, want", [("gloo", "cpu"), ("nccl", "cuda")])
def test_falls_back_to_the_backend_name(gloo_world, monkeypatch, name, want):
    monkeypatch.delattr(dist, "get_backend_config")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device().type == want
    assert comm._backend_devices(None) is None


def test_any_rank_without_a_group_is_the_flag_itself():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    assert any_rank(True) is True and any_rank(False) is False


def test_any_rank_reduces_over_the_group(gloo_world):
    assert any_rank(True) is True and any_rank(False) is False
