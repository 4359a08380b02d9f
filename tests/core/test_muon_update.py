"""The Muon optimizer's update against an independent float64 evaluation of MOONLIGHT.md's formula,
over several steps, for whole matrices and every split spec."""

from __future__ import annotations

import pytest
import torch

import core_reference as ref
from muon_megatron import ExpertStack, FusedQKV, GateUp, Muon, Whole, apply_orthogonal_, decay_, group_by_shape, momentum_
from muon_megatron.core.base import finite_flags

STEPS = 4
LR = 1e-2
# Weights start at the usual 0.02 init scale so float32 rounding of W (6e-8 * 0.02) is far below
# the ~lr * 0.2 = 2e-3 per-element update whose error we measure.
INIT_STD = 0.02
# ns_dtype=float32: NS carries float32 rounding (1e-6 measured, see test_newton_schulz) and the
# update is applied to float32 weights; the total change W_k - W_0 must match to this.
FLOAT32_REL = 1e-5
# ns_dtype=bfloat16 (the default): bf16 NS moves singular values by a few hundredths and the
# directions by ~0.04 (test_newton_schulz: BF16_OFF_DIAGONAL); measured 0.021-0.023 on these cases
# (float32: 6e-7 to 9e-7).
BF16_REL = 0.05


# (name, parameter shape, split spec for the optimizer (None: default), reference split)
CASES = [
    ("square", (48, 48), None, ref.WHOLE),
    ("tall", (96, 32), None, ref.WHOLE),
    ("wide", (32, 96), Whole(), ref.WHOLE),
    ("fused_qkv", (2 * (3 + 2) * 8, 40), FusedQKV(num_query_groups=2, q_per_group=3, head_dim=8), ref.qkv_split(2, 3, 8)),
    ("gate_up", (2 * 24, 40), GateUp(), ref.GATE_UP),
    ("experts_3d_default", (4, 24, 40), None, ref.experts_stacked()),
    ("experts_columns", (24, 4 * 16), ExpertStack(4, layout="columns"), ref.experts_columns(4)),
    ("experts_3d_inner_gate_up", (3, 2 * 16, 24), ExpertStack(3, inner=GateUp()), ref.experts_stacked(ref.GATE_UP)),
    ("experts_columns_inner_gate_up", (2 * 12, 3 * 20), ExpertStack(3, layout="columns", inner=GateUp()),
     ref.experts_columns(3, ref.GATE_UP)),
]


def run_both(shape, split, ref_split, *, ns_dtype, seed, nesterov=True, steps=STEPS, **ours_kwargs):
    """Run our Muon and the float64 reference on the same fresh random gradients; return the total
    changes (ours, reference) of the weights."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*shape, generator=g) * INIT_STD
    W = torch.nn.Parameter(W0.clone())
    group = {"params": [W], "names": ["w"]}
    if split is not None:
        group["split"] = split
    opt = Muon([group], lr=LR, ns_dtype=ns_dtype, nesterov=nesterov, **ours_kwargs)
    reference = ref.MoonlightReference(W0, ref_split, lr=LR, nesterov=nesterov)
    for _ in range(steps):
        grad = torch.randn(*shape, generator=g)
        W.grad = grad.clone()
        opt.step()
        reference.step(grad)
    return W.detach() - W0, reference.W - W0.double()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_update_matches_float64_formula_with_float32_ns(case):
    _, shape, split, ref_split = case
    ours, expected = run_both(shape, split, ref_split, ns_dtype=torch.float32, seed=1)
    assert ref.rel_err(ours, expected) <= FLOAT32_REL


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_update_matches_float64_formula_with_default_bf16_ns(case):
    _, shape, split, ref_split = case
    ours, expected = run_both(shape, split, ref_split, ns_dtype=torch.bfloat16, seed=2)
    assert ref.rel_err(ours, expected) <= BF16_REL


def test_without_nesterov_matches_formula():
    ours, expected = run_both((40, 56), None, ref.WHOLE, ns_dtype=torch.float32, seed=3, nesterov=False)
    assert ref.rel_err(ours, expected) <= FLOAT32_REL


def test_splitting_changes_the_update():
    """Guards the split tests against passing vacuously: a fused QKV orthogonalised whole differs."""
    shape = (2 * (3 + 2) * 8, 40)
    split_ours, split_ref = CASES[3][2], CASES[3][3]
    fused, _ = run_both(shape, None, ref.WHOLE, ns_dtype=torch.float32, seed=4)
    split, _ = run_both(shape, split_ours, split_ref, ns_dtype=torch.float32, seed=4)
    assert ref.rel_err(fused, split) > 0.1


def test_stacked_experts_given_as_2d_with_expert_shape():
    """Megatron's legacy GroupedMLP keeps E experts of m x n in a 2-D tensor whose memory is [E, m, n]."""
    E, m, n = 3, 16, 24
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(E * m, n, generator=g) * INIT_STD
    W = torch.nn.Parameter(W0.clone())
    opt = Muon([{"params": [W], "split": ExpertStack(E, expert_shape=(m, n))}], lr=LR, ns_dtype=torch.float32)
    reference = ref.MoonlightReference(W0.reshape(E, m, n), ref.experts_stacked(), lr=LR)
    for _ in range(STEPS):
        grad = torch.randn(E * m, n, generator=g)
        W.grad = grad.clone()
        opt.step()
        reference.step(grad.reshape(E, m, n))
    assert ref.rel_err(W.detach() - W0, reference.W.reshape(E * m, n) - W0.double()) <= FLOAT32_REL


def test_several_parameters_batched_by_shape_match_one_at_a_time():
    """Same-shape matrices go through one batched NS call; each must get its own update."""
    g = torch.Generator().manual_seed(6)
    W0s = [torch.randn(24, 40, generator=g) * INIT_STD * s for s in (1, 10, 0.1)] + [torch.randn(40, 24, generator=g) * INIT_STD]
    Ws = [torch.nn.Parameter(w.clone()) for w in W0s]
    opt = Muon([{"params": Ws}], lr=LR, ns_dtype=torch.float32)
    refs = [ref.MoonlightReference(w, ref.WHOLE, lr=LR) for w in W0s]
    for _ in range(STEPS):
        for W, r in zip(Ws, refs):
            grad = torch.randn(W.shape, generator=g) * float(torch.rand((), generator=g) * 100)
            W.grad = grad.clone()
            r.step(grad)
        opt.step()
    for W, W0, r in zip(Ws, W0s, refs):
        assert ref.rel_err(W.detach() - W0, r.W - W0.double()) <= FLOAT32_REL


def test_gradient_is_not_modified():
    W = torch.nn.Parameter(torch.randn(16, 24))
    grad = torch.randn(16, 24)
    W.grad = grad.clone()
    Muon([W], lr=LR).step()
    assert torch.equal(W.grad, grad)


def test_parameter_without_gradient_is_left_alone():
    A, B = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    before = B.detach().clone()
    opt = Muon([A, B], lr=LR)
    A.grad = torch.randn(8, 8)
    opt.step()
    assert torch.equal(B.detach(), before) and B not in opt.state


@pytest.mark.parametrize("name,expected", [("keller", (96 / 32) ** 0.5), ("spectral", (96 / 32) ** 0.5),
                                           ("none", 1.0), ("moonlight", 0.2 * 96**0.5)])
def test_named_update_scale_multiplies_the_orthogonalised_step(name, expected):
    """Weight decay 0 and one step: W_1 - W_0 = -lr * scale * NS(g + mu * g)."""
    g = torch.Generator().manual_seed(9)
    W0 = torch.randn(96, 32, generator=g) * INIT_STD
    grad = torch.randn(96, 32, generator=g)
    W = torch.nn.Parameter(W0.clone())
    W.grad = grad.clone()
    Muon([W], lr=LR, weight_decay=0.0, ns_dtype=torch.float32, update_scale=name).step()
    expected_step = -LR * expected * ref.ns5_float64(grad * 1.95)
    assert ref.rel_err(W.detach() - W0, expected_step) <= FLOAT32_REL


def test_finite_flags_per_tensor_in_order_without_overflow():
    tensors = [
        torch.randn(4, 3),
        torch.tensor([1.0, float("nan")]),
        torch.full((5,), 3e38),  # finite, though its 2-norm overflows float32
        torch.tensor([-float("inf"), 0.0], dtype=torch.bfloat16),
        torch.randn(2, 2, dtype=torch.bfloat16),
        torch.tensor([float("inf")], dtype=torch.float64),
    ]
    assert finite_flags(tensors) == [True, False, True, False, True, False]
    assert finite_flags([]) == [] and finite_flags([torch.zeros(0)]) == [True]


# --- the update's list-form functions, against the formula in float64 ----------------------------


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_advances_every_buffer_and_returns_the_newton_schulz_inputs(nesterov):
    g = torch.Generator().manual_seed(11)
    shapes = [(5, 7), (3,), (2, 4, 6)]
    bufs = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    before = [b.double() for b in bufs]
    kept = [x.clone() for x in grads]
    inputs = momentum_(bufs, grads, momentum=0.9, nesterov=nesterov)
    for b0, b, grad, u in zip(before, bufs, grads, inputs):
        expected_buf = 0.9 * b0 + grad.double()
        assert ref.rel_err(b, expected_buf) < 1e-6
        expected_input = grad.double() + 0.9 * expected_buf if nesterov else expected_buf
        assert ref.rel_err(u, expected_input) < 1e-6
        if not nesterov:
            assert u is b  # the buffer itself: no copy
    assert all(torch.equal(a, b) for a, b in zip(grads, kept))  # gradients untouched
    assert momentum_([], [], momentum=0.9, nesterov=True) == []


def test_decay_then_apply_is_the_decoupled_scaled_step_on_any_region():
    g = torch.Generator().manual_seed(12)
    W = torch.randn(6, 10, generator=g)
    W0 = W.double().clone()
    O = torch.randn(6, 10, generator=g).to(torch.bfloat16)
    lr, wd, scale = 0.02, 0.1, 0.7
    decay_([W], lr=lr, weight_decay=wd)
    # two regions of the matrix applied separately, plus a second matrix of another step size
    V = torch.randn(3, 3, generator=g)
    V0 = V.double().clone()
    P = torch.randn(3, 3, generator=g)
    apply_orthogonal_([W[:, :4], W[:, 4:], V], [O[:, :4], O[:, 4:], P], [lr * scale, lr * scale, 0.5])
    assert ref.rel_err(W, W0 * (1 - lr * wd) - lr * scale * O.double()) < 1e-6
    assert ref.rel_err(V, V0 - 0.5 * P.double()) < 1e-6
    untouched = torch.randn(4, generator=g)
    kept = untouched.clone()
    decay_([untouched], lr=lr, weight_decay=0.0)
    assert torch.equal(untouched, kept)


def test_group_by_shape_keeps_first_appearance_order():
    shapes = [(2, 3), (4, 5), (2, 3), torch.Size([4, 5]), (1, 1)]
    assert group_by_shape(shapes) == {(2, 3): [0, 2], (4, 5): [1, 3], (1, 1): [4]}
    assert list(group_by_shape(shapes)) == [(2, 3), (4, 5), (1, 1)]
