"""Newton-Schulz against the exact polar factor U V^T of a float64 SVD."""

from __future__ import annotations

import math

import pytest
import torch

from core_reference import ns5_float64, random_matrix_with_spectrum, rel_err
from muon_megatron import NS_COEFFICIENTS, newton_schulz
from muon_megatron.core.newton_schulz import MOONLIGHT_BAND_MIN_RELATIVE_SV, MOONLIGHT_SINGULAR_VALUE_BAND

# float32 NS against the same iteration in float64: unit roundoff 6e-8, a few hundred
# accumulations per matmul and 15 matmuls stay far below this.
FLOAT32_REL = 1e-5
# The subspace test in float64: only rounding of a 5-step iteration separates U^T O V from diagonal.
FLOAT64_OFF_DIAGONAL = 1e-10
FLOAT32_OFF_DIAGONAL = 1e-5
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3); through 15 matmuls whose results are
# rounded to bf16 the singular values drift by a few hundredths (measured up to 0.08 on 96 x 32 with
# all singular values equal, where the iteration's slope amplifies rounding most).
BF16_BAND_MARGIN = 0.1
# bf16 rounding also puts noise of ~2^-9 ||X|| in every direction, which the iteration lifts like a
# tiny singular value (slope a = 3.4 at 0): measured 0.04 off the subspaces for well-conditioned G.
# For the "graded" spectra, whose smallest singular values are that small, bf16 cannot tell noise
# from signal, so there only the band is checked.
BF16_OFF_DIAGONAL = 0.08

SHAPES = [(64, 64), (32, 96), (96, 32), (128, 48), (5, 200)]


def spectrum(k: int, kind: str, generator) -> torch.Tensor:
    """Singular values (largest 1) whose smallest keeps s / ||G||_F above the band's threshold."""
    if kind == "equal":
        return torch.ones(k, dtype=torch.float64)
    if kind == "random":
        return torch.rand(k, dtype=torch.float64, generator=generator) * 0.9 + 0.1
    # "graded": log-spaced, condition number as large as the band's threshold allows:
    # s_min / ||G||_F >= s_min / (s_max sqrt(k)) must stay >= MOONLIGHT_BAND_MIN_RELATIVE_SV.
    cond = 1.0 / (MOONLIGHT_BAND_MIN_RELATIVE_SV * math.sqrt(k))
    return torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["equal", "random", "graded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_singular_values_in_documented_band_and_subspaces_match_svd(shape, kind, dtype):
    g = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    m, n = shape
    s = spectrum(min(m, n), kind, g)
    G, U, V = random_matrix_with_spectrum(m, n, s, g)
    assert float(s.min() / G.norm()) >= MOONLIGHT_BAND_MIN_RELATIVE_SV * 0.999

    O = newton_schulz(G, dtype=dtype)
    assert O.dtype == dtype and O.shape == G.shape
    O = O.double()

    # O = U D V^T with D diagonal: the polar factor's subspaces, only the singular values differ.
    D = U.T @ O @ V
    off = D - torch.diag(torch.diagonal(D))
    residual = O - U @ D @ V.T
    tol_off = {torch.float64: FLOAT64_OFF_DIAGONAL, torch.float32: FLOAT32_OFF_DIAGONAL}.get(dtype, BF16_OFF_DIAGONAL)
    if not (dtype == torch.bfloat16 and kind == "graded"):
        assert float(off.norm() / D.norm()) <= tol_off
        assert float(residual.norm() / O.norm()) <= tol_off

    lo, hi = MOONLIGHT_SINGULAR_VALUE_BAND
    margin = BF16_BAND_MARGIN if dtype == torch.bfloat16 else 0.0
    d = torch.diagonal(D)
    assert float(d.min()) >= lo - margin, d.min()
    assert float(d.max()) <= hi + margin, d.max()

    # So the distance to the exact polar factor is bounded by the band's width.
    polar = U @ V.T
    assert rel_err(O, polar) <= max(1 - lo, hi - 1) + margin


def test_band_edges_are_reached_by_the_scalar_iteration():
    """The band is tight: its documented ends are (nearly) attained, so it is not a loose bound."""
    a, b, c = NS_COEFFICIENTS["moonlight"][0]
    x = torch.logspace(math.log10(MOONLIGHT_BAND_MIN_RELATIVE_SV), 0, 200001, dtype=torch.float64)
    y = x.clone()
    for _ in range(5):
        y = a * y + b * y**3 + c * y**5
    lo, hi = MOONLIGHT_SINGULAR_VALUE_BAND
    assert lo <= float(y.min()) <= lo + 0.01
    assert hi - 0.01 <= float(y.max()) <= hi


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_float32_matches_float64_iteration(shape):
    g = torch.Generator().manual_seed(11)
    G = torch.randn(*shape, generator=g)
    assert rel_err(newton_schulz(G, dtype=torch.float32), ns5_float64(G)) <= FLOAT32_REL


def test_batch_normalises_each_matrix_on_its_own():
    g = torch.Generator().manual_seed(3)
    # Very different norms: a shared normalisation would shrink the small ones to ~0.
    batch = torch.stack([torch.randn(3, 24, 40, generator=g) * s for s in (1e-3, 1.0, 1e3)])
    out = newton_schulz(batch, dtype=torch.float64)
    assert out.shape == batch.shape
    for i in range(3):
        for j in range(3):
            assert rel_err(out[i, j], ns5_float64(batch[i, j])) <= 1e-12


def test_does_not_modify_input():
    G = torch.randn(16, 24)
    before = G.clone()
    newton_schulz(G, dtype=torch.float32)
    assert torch.equal(G, before)


def test_explicit_coefficient_list_equals_named_set():
    G = torch.randn(20, 30)
    named = newton_schulz(G, coefficients="moonlight", dtype=torch.float64)
    explicit = newton_schulz(G, coefficients=[NS_COEFFICIENTS["moonlight"][0]] * 5, dtype=torch.float64)
    assert torch.equal(named, explicit)


def test_per_step_schedule_uses_each_triple_in_order():
    g = torch.Generator().manual_seed(5)
    G = torch.randn(12, 20, generator=g, dtype=torch.float64)
    schedule = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    ref = ns5_float64(G, steps=4, abc=schedule)  # the last triple repeats for step 4
    assert rel_err(newton_schulz(G, steps=4, coefficients=schedule, dtype=torch.float64), ref) <= 1e-12


def test_polar_express_converges_closer_to_polar_factor_than_moonlight():
    """Polar Express (arXiv 2505.16932) is optimised to converge: with 8 steps in float64 its
    singular values are within 1e-2 of 1 where Moonlight's quintic stays in its 0.68-1.21 band."""
    g = torch.Generator().manual_seed(7)
    m, n = 64, 96
    s = torch.logspace(0, -2, m, dtype=torch.float64)
    G, U, V = random_matrix_with_spectrum(m, n, s, g)
    polar = U @ V.T
    pe = newton_schulz(G, steps=8, coefficients="polar_express", dtype=torch.float64)
    sv = torch.linalg.svdvals(pe)
    assert float((sv - 1).abs().max()) <= 1e-2
    assert rel_err(pe, polar) <= 1e-2
    assert rel_err(newton_schulz(G, steps=8, dtype=torch.float64), polar) > 5e-2
    # Its table is a per-step schedule: it equals the explicit list of its triples.
    explicit = newton_schulz(G, steps=8, coefficients=list(NS_COEFFICIENTS["polar_express"]), dtype=torch.float64)
    assert torch.equal(pe, explicit)


def test_polar_express_in_bf16_stays_near_polar_factor():
    g = torch.Generator().manual_seed(8)
    G, U, V = random_matrix_with_spectrum(64, 64, torch.rand(64, dtype=torch.float64, generator=g) + 0.05, g)
    out = newton_schulz(G, steps=8, coefficients="polar_express", dtype=torch.bfloat16).double()
    assert rel_err(out, U @ V.T) <= 0.05  # bf16 rounding only (see BF16_BAND_MARGIN)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_step_count_raises(bad):
    with pytest.raises(ValueError, match="ns_steps"):
        newton_schulz(torch.randn(4, 4), steps=bad)


def test_unknown_coefficient_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        newton_schulz(torch.randn(4, 4), coefficients="quintic")
    for name in NS_COEFFICIENTS:
        assert repr(name) in str(err.value)


def test_malformed_coefficient_list_raises():
    with pytest.raises(ValueError, match=r"\(a, b, c\) triples"):
        newton_schulz(torch.randn(4, 4), coefficients=[(1.0, 2.0)])


def test_vector_input_raises():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(8))
