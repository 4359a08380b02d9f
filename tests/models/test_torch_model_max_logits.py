"""Moonlight-mini's torch model reports per-head max logits to an active MaxLogitRecorder, and
``qk_clip_`` clips its MLA weights from them.

The reference recomputes each layer's MLA logits by hand in float64 from the layer's input
(captured with a forward pre-hook) and its weights. Tolerance: the model computes q and k in
float32 (rounding ~1e-7 relative per product over hidden=128 inputs); ``MAX_REL = 1e-5`` bounds
the measured max logit against the float64 one with a margin, far below the factor changes
(>= 1e-2 here) a wrong clip would make.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from muon_megatron.core.qk_clip import MaxLogitRecorder, active_recorder, per_head_max_logits
from muon_megatron.models import MOONLIGHT_MINI
from muon_megatron.models.mla_attention import SDPACoreAttention
from muon_megatron.models.torch_model import MLA, MoonlightModel, qk_clip_

F64 = torch.float64
MAX_REL = 1e-5
SEQ, BATCH = 24, 2


def spec_of(q_lora: bool):
    spec = MOONLIGHT_MINI.replace(seq_length=SEQ)
    if q_lora:
        spec = spec.replace(attention=dataclasses.replace(spec.attention, q_lora_rank=48))
    return spec


def build(q_lora: bool, seed: int) -> MoonlightModel:
    torch.manual_seed(seed)
    model = MoonlightModel(spec_of(q_lora))
    with torch.no_grad():  # spread the heads' logit sizes over a decade, as training does
        for layer in model.layers:
            att = layer.self_attention
            q = att.linear_q_proj if att.a.q_lora_rank is None else att.linear_q_up_proj
            w = q.weight.view(att.a.num_heads, -1, q.weight.shape[1])
            w *= torch.logspace(0, 1.5, att.a.num_heads).view(-1, 1, 1) * 3
    return model


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def capture_inputs(model: MoonlightModel):
    """Forward pre-hooks storing each MLA's input hidden states by recorder name."""
    seen, handles = {}, []
    for m in model.modules():
        if isinstance(m, MLA):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=m.max_logit_name: seen.__setitem__(_n, args[0].detach().clone())))
    return seen, handles


def rope64(x: torch.Tensor, base: float) -> torch.Tensor:
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.outer(torch.arange(s, dtype=F64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return x * ang.cos() + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * ang.sin()


def rms64(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.double()


def reference_max_logits(att: MLA, x: torch.Tensor, spec) -> torch.Tensor:
    """Per-head max of q_i . k_j / sqrt(nope + rope), j <= i, in float64 from the weights."""
    a, x = att.a, x.double()
    H, nope, rope, v = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    if a.q_lora_rank is None:
        q = x @ att.linear_q_proj.weight.double().T
    else:
        q = rms64(x @ att.linear_q_down_proj.weight.double().T, att.q_layernorm.weight, spec.norm_eps)
        q = q @ att.linear_q_up_proj.weight.double().T
    b, s, _ = x.shape
    q = q.view(b, s, H, nope + rope).transpose(1, 2)
    kv_a = x @ att.linear_kv_down_proj.weight.double().T
    latent, k_rope = kv_a[..., : a.kv_lora_rank], rope64(kv_a[..., a.kv_lora_rank :], spec.rope_base)
    kv = (rms64(latent, att.kv_layernorm.weight, spec.norm_eps) @ att.linear_kv_up_proj.weight.double().T)
    kv = kv.view(b, s, H, nope + v).transpose(1, 2)
    logits = (torch.einsum("bhid,bhjd->bhij", q[..., :nope], kv[..., :nope])
              + torch.einsum("bhid,bjd->bhij", rope64(q[..., nope:], spec.rope_base), k_rope)) / math.sqrt(nope + rope)
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    return logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("q_lora", [False, True])
def test_recorded_max_logits_equal_a_float64_reference_per_layer_and_head(q_lora):
    model = build(q_lora, seed=1)
    seen, handles = capture_inputs(model)
    rec = MaxLogitRecorder()
    with rec:
        model(ids(2))
    for h in handles:
        h.remove()
    names = [f"layers.{i}.self_attention" for i in range(model.spec.num_layers)]
    assert rec.names() == sorted(names)
    for name in names:
        att = model.get_submodule(name)
        ref = reference_max_logits(att, seen[name], model.spec)
        assert torch.allclose(rec.get(name).double(), ref, rtol=MAX_REL, atol=0), name


def test_recording_changes_neither_outputs_nor_gradients():
    batch = ids(3)
    results = []
    for record in (False, True):
        model = build(False, seed=4)
        rec = MaxLogitRecorder()
        if record:
            with rec:
                out = model(batch)
        else:
            out = model(batch)
        out.float().square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], len(rec)))
    (out0, grads0, n0), (out1, grads1, n1) = results
    assert n0 == 0 and n1 == model.spec.num_layers
    assert torch.equal(out0, out1)
    assert len(grads0) == len(grads1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def test_a_recorder_left_inactive_records_nothing():
    model = build(False, seed=5)
    rec = MaxLogitRecorder()
    model(ids(6))
    assert len(rec) == 0 and active_recorder() is None


def test_micro_batches_accumulate_the_max():
    model = build(False, seed=7)
    singles = []
    for seed in (8, 9):
        rec = MaxLogitRecorder()
        with rec:
            model(ids(seed))
        singles.append(rec.maxima)
    both = MaxLogitRecorder()
    with both:
        model(ids(8))
        model(ids(9))
    for name, value in both.maxima.items():
        assert torch.equal(value, torch.maximum(singles[0][name], singles[1][name]))


@pytest.mark.parametrize("q_lora", [False, True])
def test_qk_clip_brings_heads_above_tau_to_tau_and_leaves_the_others(q_lora):
    model = build(q_lora, seed=11)
    batch = ids(12)
    seen, handles = capture_inputs(model)
    rec = MaxLogitRecorder()
    with rec:
        model(batch)
    for h in handles:
        h.remove()
    before = {n: t.clone() for n, t in rec.maxima.items()}
    all_max = torch.sort(torch.cat(list(before.values()))).values
    tau = float(all_max[len(all_max) // 2])  # about half the heads above
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = qk_clip_(model, rec, tau=tau)
    assert len(rec) == 0, "qk_clip_ resets the recorder"
    clipped_total = 0
    for name, S in before.items():
        att = model.get_submodule(name)
        over = S > tau
        clipped_total += int(over.sum())
        assert stats.clipped_heads[name] == int(over.sum())
        assert stats.max_logit[name] == pytest.approx(float(S.max()), rel=1e-7)
        after = reference_max_logits(att, seen[name], model.spec)  # same inputs, new weights
        assert torch.allclose(after[over], torch.full_like(after[over], tau), rtol=MAX_REL, atol=0), name
        assert torch.allclose(after[~over], S[~over].double(), rtol=MAX_REL, atol=0), name
        a = att.a
        kv_up = att.linear_kv_up_proj.weight.view(a.num_heads, a.qk_nope_head_dim + a.v_head_dim, -1)
        kv_old = old[f"{name}.linear_kv_up_proj.weight"].view_as(kv_up)
        assert torch.equal(kv_up[~over], kv_old[~over]) and torch.equal(kv_up[:, a.qk_nope_head_dim :],
                                                                        kv_old[:, a.qk_nope_head_dim :])
    assert stats.clipped_heads_total == clipped_total > 0
    for n, p in model.named_parameters():  # only the query and key-up projections may change
        if not n.endswith(("linear_q_proj.weight", "linear_q_up_proj.weight", "linear_kv_up_proj.weight")):
            assert torch.equal(p, old[n]), n


def test_qk_clip_without_recorded_maxima_names_the_layer():
    model = build(False, seed=13)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attention"):
        qk_clip_(model, MaxLogitRecorder(), tau=10.0)
    with pytest.raises(ValueError, match="tau"):
        qk_clip_(model, MaxLogitRecorder(), tau=0.0)


def test_megatron_sdpa_core_attention_records_its_heads_and_keeps_its_output():
    g = torch.Generator().manual_seed(14)
    s, b, h, d, dv = 10, 2, 3, 12, 8
    q, k, v = (torch.randn(s, b, h, n, generator=g) for n in (d, d, dv))
    core = SDPACoreAttention(layer_number=5, softmax_scale=0.2, k_channels=d, v_channels=dv, attention_dropout=0.0)
    plain = core(q, k, v)
    rec = MaxLogitRecorder()
    with rec:
        recorded = core(q, k, v)
    assert torch.equal(plain, recorded)
    assert rec.names() == ["layer5"]
    ref = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) * 0.2
    ref = ref.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf).amax(dim=(0, 2, 3))
    assert torch.allclose(rec.get("layer5").double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(rec.get("layer5"), per_head_max_logits(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), scale=0.2))
