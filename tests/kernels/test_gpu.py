"""The kernels on a CUDA device against float64 references (skipped without CUDA; CI has none).

Checks numerics only: no assertion depends on a timing.
"""

import pytest
import torch

from muon_megatron.core import Muon, newton_schulz
from muon_megatron.kernels import (
    BackendChooser, GraphedNewtonSchulz, MuonStepRuntime, available_backends, get_backend, orthogonalize_grouped,
    symmetric_product, triton_importable,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_triton
@pytest.mark.parametrize("b,m,k", [(3, 300, 520), (2, 1408, 2048), (1, 64, 2048), (4, 576, 2048)])
def test_symmetric_product_bf16_matches_float64(b, m, k):
    A = torch.randn(b, m, k, device="cuda")
    Ab = A.bfloat16()
    ref = Ab.double() @ Ab.double().mT
    out = symmetric_product(Ab)
    assert rel(out, ref) < 1e-2 and rel(out, out.mT) < 1e-2
    M = torch.randn(b, m, m, device="cuda").bfloat16()
    M = (M + M.mT) / 2
    ref = 2.0 * M.double() @ M.double() - 4.7 * M.double()
    assert rel(symmetric_product(M, M, alpha=2.0, beta=-4.7), ref) < 1e-2
    ref = ref + 3.4 * torch.eye(m, device="cuda", dtype=torch.float64)
    assert rel(symmetric_product(M, M, alpha=2.0, beta=-4.7, gamma=3.4), ref) < 1e-2


@pytest.mark.parametrize("shape", [(8, 576, 2048), (4, 2048, 1408), (64, 2048), (2, 512, 4096)])
def test_every_gpu_backend_matches_float64(shape):
    G = torch.randn(shape, device="cuda")
    ref = newton_schulz(G.double(), dtype=torch.float64)
    core_err = rel(newton_schulz(G), ref)  # the core's bf16 reference form: ~2e-2 to 3.5e-2
    for name in available_backends(torch.device("cuda"), torch.bfloat16):
        out = get_backend(name).fn(G, 5, "moonlight", torch.bfloat16)
        assert out.shape == G.shape and rel(out, ref) < max(3e-2, 1.1 * core_err), name


def test_graphed_newton_schulz_equals_eager():
    g = GraphedNewtonSchulz(4, 64, 2048, backend="torch_batched")
    G = torch.randn(4, 64, 2048, device="cuda")
    g.input.copy_(G.bfloat16())
    out = g().clone()
    assert torch.equal(out, get_backend("torch_batched").fn(G.bfloat16(), 5, "moonlight", torch.bfloat16))


def test_runtime_triton_elementwise_matches_core_muon():
    torch.manual_seed(0)
    shapes = [(576, 2048), (4, 1408, 2048), (2048, 1408), (64, 2048), (64, 2048)]
    p0 = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    ours = [p.clone() for p in p0]
    rt = MuonStepRuntime(ours, backend=BackendChooser(), elementwise="triton")
    rt.step_(grads, lr=0.02, weight_decay=0.1)
    ref = [torch.nn.Parameter(p.clone().double()) for p in p0]
    for p, g in zip(ref, grads):
        p.grad = g.double()
    Muon([{"params": ref}], lr=0.02, weight_decay=0.1, ns_dtype=torch.float64).step()
    for a, r, q in zip(ours, ref, p0):
        assert rel(a - q, r.detach() - q.double()) < 4e-2
    outs = orthogonalize_grouped([g[0] if g.ndim == 3 else g for g in grads], backend=BackendChooser())
    assert len(outs) == len(grads)
