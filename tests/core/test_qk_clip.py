"""QK-Clip's rule (muon_megatron.core.qk_clip) against logits computed independently in float64.

Every test draws fresh random inputs and weights, computes the attention logits
``q_i . k_j * scale`` of each head from the weights in float64 with its own slicing of the layout
(RoPE included), applies the library's factors, and recomputes. Tolerances: float64 weights and
factors carry ~1e-16 relative rounding per multiply; a logit sums a few dozen products, so
``REL = 1e-12`` leaves three orders of margin while catching any wrong factor (the smallest
factor error a bug could make, e.g. gamma**0.5 for gamma, is > 1e-3 here).
"""

from __future__ import annotations

import math

import pytest
import torch

from muon_megatron.core.qk_clip import (
    MaxLogitRecorder, active_recorder, clip_factors, clip_fused_qkv_, clip_mla_, fused_qkv_row_scales, k_row_scales,
    layer_stats, mla_kv_up_row_scales, mla_q_row_scales, per_head_max_logits, q_row_scales, scale_flat_range_,
    scale_rows_, validate_qk_clip,
)

REL = 1e-12
F64 = torch.float64


# --- independent float64 reference -----------------------------------------------------------------


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., s, d]`` by position, float64."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.outer(torch.arange(s, dtype=F64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def causal_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[b, s, s]`` logits of one head from ``q, k [b, s, d]``; masked (j > i) entries are -inf."""
    logits = torch.einsum("bid,bjd->bij", q, k) * scale
    s = q.shape[1]
    return logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)


def gqa_head_logits(x, Wq_heads, Wk_groups, head_dim):
    """Per query head ``[b, s, s]`` logits (RoPE on the whole head) from per-head weight blocks."""
    rep = len(Wq_heads) // len(Wk_groups)
    out = []
    for h, Wq in enumerate(Wq_heads):
        q = rope(x @ Wq.T)
        k = rope(x @ Wk_groups[h // rep].T)
        out.append(causal_logits(q, k, 1.0 / math.sqrt(head_dim)))
    return out


def fused_blocks(W, groups, q_per_group, head_dim):
    """(query blocks per head, key blocks per group, value blocks per group) of a fused QKV weight,
    sliced by hand: per group ``q_per_group`` query heads, then the key, then the value."""
    blocks = W.view(groups, q_per_group + 2, head_dim, -1)
    q = [blocks[g, i] for g in range(groups) for i in range(q_per_group)]
    return q, [blocks[g, q_per_group] for g in range(groups)], [blocks[g, q_per_group + 1] for g in range(groups)]


def head_max(logits) -> torch.Tensor:
    return torch.stack([l.amax() for l in logits])


def assert_scaled(new, old, factor, what):
    """``new == factor * old`` on every unmasked entry, within REL of the head's magnitude."""
    finite = torch.isfinite(old)
    assert torch.equal(finite, torch.isfinite(new)), what
    err = (new[finite] - factor * old[finite]).abs().max()
    assert err <= REL * old[finite].abs().max(), f"{what}: off by {float(err):.3e}"


def gqa_setup(seed, groups, q_per_group, head_dim=8, hidden=24, b=2, s=12):
    """A fused QKV weight whose heads span three decades of logit size (so a threshold clips some
    heads and not others, and with GQA splits a group), the last group far below the rest."""
    g = torch.Generator().manual_seed(seed)
    heads = groups * q_per_group
    W = torch.randn(groups * (q_per_group + 2) * head_dim, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
    blocks = W.view(groups, q_per_group + 2, head_dim, hidden)
    for h in range(heads):
        blocks[h // q_per_group, h % q_per_group] *= 10.0 ** ((h % 3) - 1)
    blocks[groups - 1, :q_per_group] *= 1e-3
    x = torch.randn(b, s, hidden, generator=g, dtype=F64) * 3
    S = head_max(gqa_head_logits(x, *fused_blocks(W, groups, q_per_group, head_dim)[:2], head_dim))
    top = torch.sort(S[: heads - q_per_group]).values
    mid = len(top) // 2
    tau = float(torch.sqrt(top[mid - 1] * top[mid])) if len(top) > 1 else float(top[0]) / 2
    return W, x, S, tau


# --- the factors -------------------------------------------------------------------------------------


def test_clip_factors_are_min_one_tau_over_max_logit_and_never_negative():
    g = torch.Generator().manual_seed(1)
    S = torch.cat([torch.randn(20, generator=g) * 80, torch.tensor([100.0, -5.0, 250.0])]).float()
    tau = 100.0
    gamma = clip_factors(S, tau)
    ref = [1.0 if s <= tau else tau / s for s in S.double().tolist()]
    assert gamma.dtype == F64
    assert torch.allclose(gamma, torch.tensor(ref, dtype=F64), rtol=1e-15, atol=0)
    assert (gamma > 0).all() and (gamma <= 1).all()
    assert gamma[-3] == 1.0  # exactly at tau: not clipped


def test_clip_factors_return_none_when_no_head_exceeds_tau():
    S = torch.tensor([3.0, 99.5, 100.0, -7.0])
    assert clip_factors(S, 100.0) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_factors_refuse_non_finite_max_logits(bad):
    with pytest.raises(ValueError, match="non-finite"):
        clip_factors(torch.tensor([1.0, bad]), 10.0)


@pytest.mark.parametrize("tau, alpha, rule, match", [
    (0.0, 0.5, "per_head", "tau"), (-1.0, 0.5, "per_head", "tau"), (float("nan"), 0.5, "per_head", "tau"),
    (float("inf"), 0.5, "per_head", "tau"), (True, 0.5, "per_head", "tau"), (10.0, -0.1, "per_head", "alpha"),
    (10.0, 1.5, "per_head", "alpha"), (10.0, 0.5, "mean", "gqa_rule"),
])
def test_bad_settings_are_refused_naming_the_parameter(tau, alpha, rule, match):
    with pytest.raises(ValueError, match=match):
        validate_qk_clip(tau, alpha, rule)


def test_layout_mismatches_are_refused():
    gamma = torch.tensor([0.5, 1.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="num_query_groups"):
        fused_qkv_row_scales(gamma, num_query_groups=2, head_dim=4)
    w = torch.ones(10, 3)
    with pytest.raises(ValueError, match="row_offset"):
        scale_rows_(w, torch.ones(12), row_offset=4)
    with pytest.raises(ValueError, match="start and row_length"):
        scale_flat_range_(torch.ones(7), torch.ones(4), row_length=3, start=6)


# --- MHA and GQA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("groups, q_per_group", [(4, 1), (3, 3), (2, 4)])
def test_fused_qkv_per_head_rule_brings_every_clipped_head_to_tau(groups, q_per_group, alpha):
    head_dim = 8
    W, x, S, tau = gqa_setup(10 * groups + q_per_group, groups, q_per_group, head_dim)
    old = W.clone()
    gamma = clip_fused_qkv_(W, S, tau=tau, num_query_groups=groups, head_dim=head_dim, alpha=alpha)
    ref_gamma = torch.where(S > tau, tau / S, torch.ones_like(S))
    assert torch.allclose(gamma, ref_gamma, rtol=1e-15, atol=0)
    clipped = S > tau
    assert clipped.any() and (~clipped).any()
    if q_per_group > 1:  # a group holding clipped and unclipped heads: the shared-key case
        assert any(clipped.view(groups, -1)[g].any() and not clipped.view(groups, -1)[g].all() for g in range(groups))

    q_old, k_old, v_old = fused_blocks(old, groups, q_per_group, head_dim)
    q_new, k_new, v_new = fused_blocks(W, groups, q_per_group, head_dim)
    before = gqa_head_logits(x, q_old, k_old, head_dim)
    after = gqa_head_logits(x, q_new, k_new, head_dim)
    for h in range(len(before)):
        assert_scaled(after[h], before[h], float(ref_gamma[h]), f"head {h}")
        if clipped[h]:
            assert abs(float(after[h].amax()) - tau) <= REL * tau, f"head {h} max logit {float(after[h].amax())}"
    for g in range(groups):
        assert torch.equal(v_new[g], v_old[g]), "value rows must never change"
        gamma_g = float(ref_gamma.view(groups, -1)[g].min())
        # the shared key takes the smallest gamma of its query heads
        assert torch.allclose(k_new[g], k_old[g] * gamma_g ** (1 - alpha), rtol=1e-14, atol=0)
        if not clipped.view(groups, -1)[g].any():
            for i in range(q_per_group):
                assert torch.equal(q_new[g * q_per_group + i], q_old[g * q_per_group + i])
            assert torch.equal(k_new[g], k_old[g]), f"group {g} has no clipped head but its key changed"
    if q_per_group == 1:  # MHA: exactly gamma**alpha on q and gamma**(1-alpha) on k, megatron-core's split
        for h in range(groups):
            assert torch.allclose(q_new[h], q_old[h] * float(ref_gamma[h]) ** alpha, rtol=1e-14, atol=0)


@pytest.mark.parametrize("groups, q_per_group", [(3, 3), (2, 4)])
def test_fused_qkv_group_rule_scales_every_head_of_a_group_by_its_smallest_gamma(groups, q_per_group):
    """megatron-core's GQA convention: every logit of a group shrinks by gamma_g; the group's
    largest head lands on tau, the others below it."""
    head_dim, alpha = 8, 0.5
    W, x, S, tau = gqa_setup(7 + groups, groups, q_per_group, head_dim)
    old = W.clone()
    clip_fused_qkv_(W, S, tau=tau, num_query_groups=groups, head_dim=head_dim, alpha=alpha, gqa_rule="group")
    gamma = torch.where(S > tau, tau / S, torch.ones_like(S))
    gamma_g = gamma.view(groups, -1).amin(dim=1)
    before = gqa_head_logits(x, *fused_blocks(old, groups, q_per_group, head_dim)[:2], head_dim)
    after = gqa_head_logits(x, *fused_blocks(W, groups, q_per_group, head_dim)[:2], head_dim)
    for h in range(len(before)):
        assert_scaled(after[h], before[h], float(gamma_g[h // q_per_group]), f"head {h}")
    new_max = head_max(after).view(groups, -1)
    for g in range(groups):
        if gamma_g[g] < 1:
            assert abs(float(new_max[g].max()) - tau) <= REL * tau
    assert float(new_max.max()) <= tau * (1 + REL)


@pytest.mark.parametrize("rule", ["per_head", "group"])
def test_separate_q_and_k_projections_match_the_fused_layout(rule):
    groups, q_per_group, head_dim, alpha = 2, 3, 8, 0.5
    W, _, S, tau = gqa_setup(3, groups, q_per_group, head_dim)
    q_blocks, k_blocks, _ = fused_blocks(W, groups, q_per_group, head_dim)
    Wq, Wk = torch.cat(q_blocks), torch.cat(k_blocks)
    clip_fused_qkv_(W, S, tau=tau, num_query_groups=groups, head_dim=head_dim, alpha=alpha, gqa_rule=rule)
    gamma = clip_factors(S, tau)
    scale_rows_(Wq, q_row_scales(gamma, num_query_groups=groups, head_dim=head_dim, alpha=alpha, gqa_rule=rule,
                                 dtype=F64))
    scale_rows_(Wk, k_row_scales(gamma, num_query_groups=groups, head_dim=head_dim, alpha=alpha, dtype=F64))
    q_fused, k_fused, _ = fused_blocks(W, groups, q_per_group, head_dim)
    assert torch.equal(Wq, torch.cat(q_fused)) and torch.equal(Wk, torch.cat(k_fused))


def test_nothing_changes_when_no_head_exceeds_tau():
    groups, q_per_group, head_dim = 2, 2, 8
    W, _, S, _ = gqa_setup(5, groups, q_per_group, head_dim)
    old = W.clone()
    assert clip_fused_qkv_(W, S, tau=float(S.max()), num_query_groups=groups, head_dim=head_dim) is None
    assert torch.equal(W, old)
    Wq, Wkv = torch.randn(4 * 12, 16, dtype=F64), torch.randn(4 * 14, 8, dtype=F64)
    q0, kv0 = Wq.clone(), Wkv.clone()
    assert clip_mla_(Wq, Wkv, torch.tensor([1.0, 5.0, 2.0, 4.9]), tau=5.0, qk_nope_head_dim=8, qk_rope_head_dim=4,
                     v_head_dim=6) is None
    assert torch.equal(Wq, q0) and torch.equal(Wkv, kv0)


# --- MLA -------------------------------------------------------------------------------------------


def rms_norm(x, gain, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def mla_logits(x, Wq, Wdkv, gain, Wukv, H, nope, rope_dim, v, kv_rank):
    """Per head (content part, rotary part) ``[b, s, s]`` logits of MLA, float64, by hand:
    q = x Wq^T per head [q^C | q^R]; latent | k^R = x Wdkv^T (k^R shared by all heads);
    k^C | value = RMSNorm(latent) Wukv^T per head; logit = (q^C.k^C + rope(q^R).rope(k^R)) / sqrt(nope + rope)."""
    b, s, _ = x.shape
    q = (x @ Wq.T).view(b, s, H, nope + rope_dim)
    kv_a = x @ Wdkv.T
    latent, k_rope = kv_a[..., :kv_rank], rope(kv_a[..., kv_rank:])
    kv = (rms_norm(latent, gain) @ Wukv.T).view(b, s, H, nope + v)
    scale = 1.0 / math.sqrt(nope + rope_dim)
    content, rotary = [], []
    for h in range(H):
        content.append(causal_logits(q[:, :, h, :nope], kv[:, :, h, :nope], scale))
        rotary.append(causal_logits(rope(q[:, :, h, nope:]), k_rope, scale))
    return content, rotary


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_mla_clip_scales_content_and_rotary_logits_by_gamma_and_leaves_the_shared_rope_key(alpha):
    g = torch.Generator().manual_seed(int(alpha * 100))
    H, nope, rope_dim, v, kv_rank, hidden, b, s = 4, 8, 4, 6, 10, 20, 2, 10
    dims = (H, nope, rope_dim, v, kv_rank)
    Wq = torch.randn(H * (nope + rope_dim), hidden, generator=g, dtype=F64) / math.sqrt(hidden)
    for h in range(H):
        Wq[h * (nope + rope_dim) : (h + 1) * (nope + rope_dim)] *= 10.0 ** (h - 1.5)
    Wdkv = torch.randn(kv_rank + rope_dim, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
    gain = 1 + 0.1 * torch.randn(kv_rank, generator=g, dtype=F64)
    Wukv = torch.randn(H * (nope + v), kv_rank, generator=g, dtype=F64) / math.sqrt(kv_rank)
    x = torch.randn(b, s, hidden, generator=g, dtype=F64) * 3
    content, rotary = mla_logits(x, Wq, Wdkv, gain, Wukv, *dims)
    S = torch.stack([(c + r).amax() for c, r in zip(content, rotary)])
    top = torch.sort(S).values
    tau = float(torch.sqrt(top[1] * top[2]))  # two heads above, two below
    old_q, old_dkv, old_ukv = Wq.clone(), Wdkv.clone(), Wukv.clone()
    gamma = clip_mla_(Wq, Wukv, S, tau=tau, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v,
                      alpha=alpha)
    ref_gamma = torch.where(S > tau, tau / S, torch.ones_like(S))
    assert torch.allclose(gamma, ref_gamma, rtol=1e-15, atol=0)
    assert int((S > tau).sum()) == 2
    assert torch.equal(Wdkv, old_dkv), "linear_kv_down_proj (latent and shared k^R) must not change"
    content2, rotary2 = mla_logits(x, Wq, Wdkv, gain, Wukv, *dims)
    for h in range(H):
        gh = float(ref_gamma[h])
        assert_scaled(content2[h], content[h], gh, f"head {h} content logits")
        assert_scaled(rotary2[h], rotary[h], gh, f"head {h} rotary logits")
        new_max = float((content2[h] + rotary2[h]).amax())
        if S[h] > tau:
            assert abs(new_max - tau) <= REL * tau, f"head {h}: {new_max} vs tau {tau}"
        q_rows = slice(h * (nope + rope_dim), (h + 1) * (nope + rope_dim))
        kv_rows = slice(h * (nope + v), (h + 1) * (nope + v))
        if S[h] <= tau:
            assert torch.equal(Wq[q_rows], old_q[q_rows]) and torch.equal(Wukv[kv_rows], old_ukv[kv_rows])
        else:  # the split: q^C by gamma^alpha, q^R by gamma, k^C by gamma^(1-alpha)
            qh, kh = Wq[q_rows], Wukv[kv_rows]
            assert torch.allclose(qh[:nope], old_q[q_rows][:nope] * gh ** alpha, rtol=1e-14, atol=0)
            assert torch.allclose(qh[nope:], old_q[q_rows][nope:] * gh, rtol=1e-14, atol=0)
            assert torch.allclose(kh[:nope], old_ukv[kv_rows][:nope] * gh ** (1 - alpha), rtol=1e-14, atol=0)
        assert torch.equal(Wukv[kv_rows][nope:], old_ukv[kv_rows][nope:]), "value rows must never change"


# --- shards ---------------------------------------------------------------------------------------


def random_gamma(heads, seed):
    g = torch.Generator().manual_seed(seed)
    gamma = torch.rand(heads, generator=g, dtype=F64) * 0.9 + 0.05
    gamma[torch.rand(heads, generator=g) < 0.4] = 1.0
    return gamma


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_local_factors_equal_the_full_vector_sliced(tp):
    groups, q_per_group, head_dim = 4, 2, 4
    gamma = random_gamma(groups * q_per_group, tp)
    full = fused_qkv_row_scales(gamma, num_query_groups=groups, head_dim=head_dim)
    W = torch.randn(full.numel(), 12)
    whole = scale_rows_(W.clone(), full)
    rows = full.numel() // tp
    heads_local, groups_local = gamma.numel() // tp, groups // tp
    for r in range(tp):
        local = fused_qkv_row_scales(gamma[r * heads_local : (r + 1) * heads_local], num_query_groups=groups_local,
                                     head_dim=head_dim)
        assert torch.equal(local, full[r * rows : (r + 1) * rows])
        shard = W[r * rows : (r + 1) * rows].clone()
        assert torch.equal(scale_rows_(shard, full, row_offset=r * rows), whole[r * rows : (r + 1) * rows])
    H, nope, rope_dim, v = 4, 6, 2, 5
    gamma = random_gamma(H, 10 + tp)
    for build, kw in ((mla_q_row_scales, dict(qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim)),
                      (mla_kv_up_row_scales, dict(qk_nope_head_dim=nope, v_head_dim=v))):
        full = build(gamma, **kw)
        rows = full.numel() // tp
        for r in range(tp):
            local = build(gamma[r * (H // tp) : (r + 1) * (H // tp)], **kw)
            assert torch.equal(local, full[r * rows : (r + 1) * rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flat_shards_at_arbitrary_boundaries_equal_the_whole_matrix_scaled(dtype):
    g = torch.Generator().manual_seed(int(str(dtype)[-2:]) if str(dtype)[-2:].isdigit() else 3)
    rows, cols = 24, 7
    scales = random_gamma(rows, 4).float()
    W = torch.randn(rows, cols, generator=g).to(dtype)
    whole = scale_rows_(W.clone(), scales)
    # rounding once from float32: the reference of the low-precision path
    assert torch.equal(whole, (W.float() * scales.unsqueeze(1)).to(dtype))
    cuts = sorted({0, rows * cols, 3, 4, 5, 19, 20, 21 + cols * 3, 100, 101, 101, 150})
    flat = W.reshape(-1).clone()
    for a, b in zip(cuts[:-1], cuts[1:]):
        scale_flat_range_(flat[a:b], scales, row_length=cols, start=a)
    assert torch.equal(flat, whole.reshape(-1))


def test_factor_one_leaves_rows_bitwise_unchanged_in_low_precision():
    W = torch.randn(6, 5).bfloat16()
    scales = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.25, 1.0])
    out = scale_rows_(W.clone(), scales)
    keep = scales == 1
    assert torch.equal(out[keep], W[keep])


# --- measuring -------------------------------------------------------------------------------------


def brute_max(q, k, scale, causal):
    q, k = q.double(), k.double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        s_q, s_k = q.shape[2], k.shape[2]
        logits = logits.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(1), -math.inf)
    return logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups, s_k, chunk", [(6, 10, 1 << 24), (2, 10, 1), (3, 14, 200)])
def test_per_head_max_logits_match_a_float64_brute_force(causal, groups, s_k, chunk):
    g = torch.Generator().manual_seed(groups * s_k + chunk % 97)
    q = torch.randn(2, 6, 10, 8, generator=g) * 2
    k = torch.randn(2, groups, s_k, 8, generator=g)
    got = per_head_max_logits(q, k, scale=0.3, causal=causal, max_chunk_elements=chunk)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert torch.allclose(got.double(), brute_max(q, k, 0.3, causal), rtol=1e-6, atol=1e-6)


def test_per_head_max_logits_of_bf16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, 4, 16, 32, generator=g) * 3).bfloat16(), (torch.randn(1, 4, 16, 32, generator=g)).bfloat16()
    got = per_head_max_logits(q, k, scale=1 / math.sqrt(32))
    assert torch.allclose(got.double(), brute_max(q, k, 1 / math.sqrt(32), True), rtol=1e-6, atol=1e-6)


def test_recorder_keeps_the_running_max_over_micro_batches_until_reset():
    rec = MaxLogitRecorder()
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(5, generator=g) * 10 for _ in range(3)]
    for p in parts:
        rec.record("layer.0", p)
    assert torch.equal(rec.get("layer.0"), torch.stack(parts).amax(0))
    parts[0].fill_(1e9)  # the recorder holds its own copy
    assert float(rec.get("layer.0").max()) < 1e9
    taken = rec.consume()
    assert "layer.0" in taken and len(rec) == 0 and rec.get("layer.0") is None


def test_recorder_activation_nests_and_restores():
    outer, inner = MaxLogitRecorder(), MaxLogitRecorder()
    assert active_recorder() is None
    with outer:
        assert active_recorder() is outer
        with inner:
            assert active_recorder() is inner
        assert active_recorder() is outer
    assert active_recorder() is None


def test_recorder_record_logits_equals_the_helper():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    rec = MaxLogitRecorder()
    rec.record_logits("attn", q, k, scale=0.25)
    assert torch.equal(rec.get("attn"), per_head_max_logits(q, k, scale=0.25))


def test_pack_then_max_all_reduce_then_unpack_gives_the_elementwise_max_over_ranks():
    """Two 'ranks' with different maxima; the adapter's one MAX all-reduce is emulated by torch.maximum."""
    g = torch.Generator().manual_seed(6)
    ranks = [MaxLogitRecorder(), MaxLogitRecorder()]
    shapes = {"layers.1.self_attention": 4, "layers.0.self_attention": 4, "layers.10.self_attention": 2}
    values = {n: [torch.randn(h, generator=g) for _ in ranks] for n, h in shapes.items()}
    for r, rec in enumerate(ranks):
        for n in shapes:  # insertion order differs from the packed (sorted) order
            rec.record(n, values[n][r])
    packs = [rec.pack() for rec in ranks]
    assert packs[0].shape == (10,) and ranks[0].names() == sorted(shapes)
    reduced = torch.maximum(packs[0], packs[1])
    ranks[0].unpack_(reduced)
    for n in shapes:
        assert torch.equal(ranks[0].get(n), torch.maximum(values[n][0], values[n][1]))
    with pytest.raises(ValueError, match="pack and unpack the same names"):
        ranks[1].unpack_(reduced[:-1])
    with pytest.raises(KeyError, match="layers.2.self_attention"):
        ranks[1].pack(names=list(shapes) + ["layers.2.self_attention"])


def test_recorder_refuses_a_name_recorded_with_another_head_count():
    rec = MaxLogitRecorder()
    rec.record("a", torch.zeros(4))
    with pytest.raises(ValueError, match="own name"):
        rec.record("a", torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        rec.record("b", torch.zeros(2, 2))


def test_layer_stats_count_the_heads_above_tau_and_report_each_layers_max():
    g = torch.Generator().manual_seed(9)
    maxima = {f"l{i}": torch.rand(6, generator=g) * 200 for i in range(4)}
    gammas = {n: clip_factors(S, 100.0) for n, S in maxima.items()}
    stats = layer_stats(100.0, maxima, gammas)
    for n, S in maxima.items():
        assert stats.clipped_heads[n] == int((S > 100.0).sum())
        assert stats.max_logit[n] == pytest.approx(float(S.max()), rel=1e-7)
    assert stats.clipped_heads_total == sum(int((S > 100.0).sum()) for S in maxima.values())
