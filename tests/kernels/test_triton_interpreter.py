"""The Triton kernels' indexing checked on the CPU through Triton's interpreter.

Runs in a subprocess because ``TRITON_INTERPRET`` must be set before Triton is imported.
Skipped where Triton is not installed (it is optional). The interpreter mis-evaluates bf16
``tl.dot``, so the symmetric product is checked in float32 here and in bf16 by test_gpu.py.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from muon_megatron.kernels import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_interpreted(code: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_symmetric_product_one_triangle_matches_float64_on_all_tiles():
    run_interpreted("""
        import torch
        from muon_megatron.kernels import symmetric_product
        torch.manual_seed(0)
        for b, m, k in [(2, 40, 72), (1, 33, 50), (2, 70, 20)]:  # 16-wide tiles: 3 to 5 per side
            A = torch.randn(b, m, k)
            ref = A.double() @ A.double().mT
            out = symmetric_product(A)
            assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
            assert torch.allclose(out, out.mT, rtol=1e-5, atol=1e-5)
            At = torch.randn(b, k, m).mT  # strided (transposed) input
            ref = At.double() @ At.double().mT
            assert ((symmetric_product(At).double() - ref).norm() / ref.norm()) < 1e-6
            M = torch.randn(b, m, m); M = M + M.mT
            ref = 2.0 * M.double() @ M.double() - 3.0 * M.double()
            out = symmetric_product(M, M, alpha=2.0, beta=-3.0)
            assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
            ref = ref + 1.5 * torch.eye(m, dtype=torch.float64)
            out = symmetric_product(M, M, alpha=2.0, beta=-3.0, gamma=1.5)
            assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
    """)


def test_triton_elementwise_kernels_equal_the_core_update_functions():
    """The Triton momentum/apply kernels are a backend of the core's momentum_, decay_ and
    apply_orthogonal_, which the foreach path of MuonStepRuntime calls: both give the same step."""
    run_interpreted("""
        import torch
        from muon_megatron.kernels import MuonStepRuntime
        torch.manual_seed(0)
        # (40, 24) and (36, 20) form a padded tall bucket, (70, 20) a tall one over several tiles:
        # both go through the transposing tile kernels.
        shapes = [(24, 40), (40, 24), (3, 24, 40), (8, 40), (8, 40), (40, 56), (36, 20), (2, 70, 20)]
        p0 = [torch.randn(s) for s in shapes]
        pa, pb = [p.clone() for p in p0], [p.clone() for p in p0]
        kw = dict(backend="torch_batched", ns_dtype=torch.float32, launch_cost_flops=1e12)
        A = MuonStepRuntime(pa, elementwise="foreach", **kw)
        B = MuonStepRuntime(pb, elementwise="triton", **kw)
        assert any(b.padded for b in B.buckets.buckets)
        assert any(t.transposed for t in B._tables) and any(not t.transposed for t in B._tables)
        for _ in range(3):
            grads = [torch.randn(s) for s in shapes]
            A.step_(grads, lr=0.02, weight_decay=0.1)
            B.step_(grads, lr=0.02, weight_decay=0.1)
        for a, b, q in zip(pa, pb, p0):
            assert ((a - b).norm() / (a - q).norm()) < 1e-5, ((a - b).norm() / (a - q).norm())
        for a, b in zip(A.buffers, B.buffers):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    """)
