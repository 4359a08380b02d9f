"""Models, data and float64 references for the QK-Clip tests of the DeepSpeed adapter.

- :class:`GQALM`: Llama-style attention with separate q/k/v projections, GQA (4 query heads over
  2 key heads), RoPE, recording its max logits through ``active_recorder()``; its Muon matrices
  are laid out so that at DP 2 the ZeRO-1 partition boundary cuts ``layers.1.q_proj.weight`` in
  the middle of a row.
- :func:`make_mla_model`: the project's Moonlight-mini torch model (MLA), cut to two layers and
  a short sequence; its own ``qk_clip_layers()`` declares it.

The references never use the adapter: max logits are recomputed in float64 from each attention
layer's captured input and the weights, factors are built by hand from them (Kimi K2's rule:
``gamma = min(1, tau / S)``; GQA "per_head": key head ``gamma_g ** (1 - alpha)`` with ``gamma_g``
the smallest gamma of its group, query head ``gamma_h / gamma_g ** (1 - alpha)``; MLA: ``q^C``
``gamma ** alpha``, ``q^R`` ``gamma``, ``k^C`` ``gamma ** (1 - alpha)``), and the single-process
reference trains with :class:`muon_megatron.Muon` on the full-batch gradient, then scales rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muon_megatron.core.qk_clip import QKClipLayer, active_recorder

F64 = torch.float64
VOCAB, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 32, 20, 4, 2, 6, 28
SEQ, MICRO = 8, 2
ROPE_BASE = 10000.0
#: QK-Clip thresholds of the tests: every head's max logit in every step of the tested runs stays
#: at least 0.4 % away from them (checked by the tests), and some heads exceed them at lr > 0 too.
TAU = {"gqa": 12.0, "mla": 12.0}


def rope(x: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., s, d]`` by position, in ``x``'s dtype (float64 tables)."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.outer(torch.arange(s, dtype=F64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return (x.to(F64) * ang.cos() + rot.to(F64) * ang.sin()).to(x.dtype)


class GQAAttention(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.max_logit_name = name
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, GROUPS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, GROUPS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = rope(self.q_proj(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2))
        k = rope(self.k_proj(x).view(b, s, GROUPS, HEAD_DIM).transpose(1, 2))
        v = self.v_proj(x).view(b, s, GROUPS, HEAD_DIM).transpose(1, 2)
        scale = 1.0 / math.sqrt(HEAD_DIM)
        recorder = active_recorder()
        if recorder is not None:
            recorder.record_logits(self.max_logit_name, q, k, scale=scale, causal=True)
        rep = HEADS // GROUPS
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             is_causal=True, scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class GQABlock(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.self_attn = GQAAttention(f"layers.{index}.self_attn")
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GQALM(nn.Module):
    """``forward(tokens, targets) -> loss``: embedding, two GQA blocks, a final Muon matrix
    ``out_proj`` (after the blocks in the flat ZeRO order, which puts the DP-2 boundary inside
    ``layers.1.q_proj``), norm, LM head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(GQABlock(i) for i in range(2))
        self.out_proj = nn.Linear(HIDDEN, HIDDEN - 1, bias=False)
        self.norm = nn.LayerNorm(HIDDEN - 1)
        self.lm_head = nn.Linear(HIDDEN - 1, VOCAB, bias=False)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(self.out_proj(h))).float()
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    def qk_clip_layers(self) -> list[QKClipLayer]:
        return [QKClipLayer(name=f"layers.{i}.self_attn", layout="separate", num_heads=HEADS, num_query_groups=GROUPS,
                            head_dim=HEAD_DIM, q=f"layers.{i}.self_attn.q_proj.weight",
                            k=f"layers.{i}.self_attn.k_proj.weight") for i in range(2)]


def make_gqa_model(seed: int = 0) -> GQALM:
    """:class:`GQALM` drawn with ``seed``, its query heads' weights spread over a decade (as
    training spreads the heads' logit sizes) so that a threshold clips some heads of a group and
    not others."""
    torch.manual_seed(seed)
    model = GQALM()
    with torch.no_grad():
        for layer in model.layers:
            w = layer.self_attn.q_proj.weight.view(HEADS, HEAD_DIM, HIDDEN)
            # one small and one large head per key group, so a group has clipped and unclipped heads
            w *= torch.logspace(0, 1, HEADS)[[0, 2, 1, 3]].view(-1, 1, 1) * 2
            layer.self_attn.k_proj.weight.mul_(2)
    return model


def gqa_batch(step: int, micro: int, rank: int):
    """Tokens and targets of one micro-batch; a pure function of (step, micro, rank)."""
    g = torch.Generator().manual_seed(20_000 + 1_000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)


# ---- Moonlight-mini (MLA) ----------------------------------------------------------------------


def mla_spec():
    from muon_megatron.models import MOONLIGHT_MINI

    return MOONLIGHT_MINI.replace(num_layers=2, seq_length=SEQ)


def make_mla_model(seed: int = 0):
    """Moonlight-mini's torch model (two layers: one dense, one MoE) drawn with ``seed``, its query
    heads spread over a decade as in :func:`make_gqa_model`."""
    from muon_megatron.models.torch_model import MoonlightModel

    torch.manual_seed(seed)
    model = MoonlightModel(mla_spec())
    with torch.no_grad():
        for layer in model.layers:
            att = layer.self_attention
            w = att.linear_q_proj.weight.view(att.a.num_heads, -1, att.linear_q_proj.weight.shape[1])
            w *= torch.logspace(0, 1, att.a.num_heads).view(-1, 1, 1) * 3
    return model


def mla_batch(step: int, micro: int, rank: int):
    g = torch.Generator().manual_seed(30_000 + 1_000 * step + 10 * micro + rank)
    ids = torch.randint(0, 256, (MICRO, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def mla_loss(model, tokens, targets):
    logits = model(tokens).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gqa_loss(model, tokens, targets):
    return model(tokens, targets)


KINDS = {
    # kind: (make model, batch, loss(model, tokens, targets), attention module class name)
    "gqa": (make_gqa_model, gqa_batch, gqa_loss, "GQAAttention"),
    "mla": (make_mla_model, mla_batch, mla_loss, "MLA"),
}


def capture_attention_inputs(model, kind: str):
    """Forward pre-hooks appending each attention layer's input (float32, detached) to a list per
    recorder name; returns ``(inputs, handles)``."""
    cls = KINDS[kind][3]
    seen: dict[str, list] = {}
    handles = []
    for m in model.modules():
        if type(m).__name__ == cls:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=m.max_logit_name: seen.setdefault(_n, []).append(args[0].detach().clone())))
    return seen, handles


# ---- float64 references ------------------------------------------------------------------------


def _causal_max(logits: torch.Tensor) -> torch.Tensor:
    """``logits [b, heads, s, s]`` -> per-head max over keys j <= i."""
    s = logits.shape[-1]
    return logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf).amax(dim=(0, 2, 3))


def gqa_max_logits64(weights: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Per query head max of ``q_i . k_j / sqrt(d)`` (j <= i) in float64 from the weights."""
    x = x.to(F64)
    b, s, _ = x.shape
    Wq, Wk = weights[f"{name}.q_proj.weight"].to(F64), weights[f"{name}.k_proj.weight"].to(F64)
    q = rope((x @ Wq.T).view(b, s, HEADS, HEAD_DIM).transpose(1, 2))
    k = rope((x @ Wk.T).view(b, s, GROUPS, HEAD_DIM).transpose(1, 2))
    k = k.repeat_interleave(HEADS // GROUPS, 1)
    return _causal_max(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(HEAD_DIM))


def _rms64(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.to(F64)


def mla_max_logits64(weights: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Per head max MLA logit ``(q^C . k^C + q^R . k^R) / sqrt(nope + rope)`` in float64."""
    spec = mla_spec()
    a = spec.attention
    H, nope, rp, v = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    x = x.to(F64)
    b, s, _ = x.shape
    q = (x @ weights[f"{name}.linear_q_proj.weight"].to(F64).T).view(b, s, H, nope + rp).transpose(1, 2)
    kv_a = x @ weights[f"{name}.linear_kv_down_proj.weight"].to(F64).T
    latent, k_rope = kv_a[..., : a.kv_lora_rank], rope(kv_a[..., a.kv_lora_rank :], spec.rope_base)
    kv = _rms64(latent, weights[f"{name}.kv_layernorm.weight"], spec.norm_eps)
    kv = (kv @ weights[f"{name}.linear_kv_up_proj.weight"].to(F64).T).view(b, s, H, nope + v).transpose(1, 2)
    logits = (torch.einsum("bhid,bhjd->bhij", q[..., :nope], kv[..., :nope])
              + torch.einsum("bhid,bjd->bhij", rope(q[..., nope:], spec.rope_base), k_rope)) / math.sqrt(nope + rp)
    return _causal_max(logits)


MAX_LOGITS64 = {"gqa": gqa_max_logits64, "mla": mla_max_logits64}


def max_logits64(kind: str, weights: dict, inputs: dict) -> dict:
    """Per layer: the float64 per-head max logit over every captured input (all micro-batches,
    all ranks)."""
    fn = MAX_LOGITS64[kind]
    return {name: torch.stack([fn(weights, name, x) for x in xs]).amax(dim=0) for name, xs in inputs.items()}


def clip_rows64(kind: str, S: torch.Tensor, tau: float, alpha: float) -> dict:
    """Hand-built per-row factors (float64) for one layer: ``{"q": [rows], "k": [rows]}``."""
    gamma = torch.where(S > tau, tau / S, torch.ones_like(S))
    if kind == "gqa":
        gamma_g = gamma.view(GROUPS, HEADS // GROUPS).amin(dim=1)
        k = gamma_g ** (1 - alpha)
        q = gamma / k.repeat_interleave(HEADS // GROUPS)
        return {"q": q.repeat_interleave(HEAD_DIM), "k": k.repeat_interleave(HEAD_DIM)}
    a = mla_spec().attention
    q = torch.cat([(gamma ** alpha).unsqueeze(1).expand(-1, a.qk_nope_head_dim),
                   gamma.unsqueeze(1).expand(-1, a.qk_rope_head_dim)], dim=1).reshape(-1)
    k = torch.cat([(gamma ** (1 - alpha)).unsqueeze(1).expand(-1, a.qk_nope_head_dim),
                   torch.ones(a.num_heads, a.v_head_dim, dtype=F64)], dim=1).reshape(-1)
    return {"q": q, "k": k}


def qk_param_names(kind: str, layer: str) -> dict:
    if kind == "gqa":
        return {"q": f"{layer}.q_proj.weight", "k": f"{layer}.k_proj.weight"}
    return {"q": f"{layer}.linear_q_proj.weight", "k": f"{layer}.linear_kv_up_proj.weight"}


def reference_run(kind: str, *, world: int, gas: int, lrs, tau: float, alpha: float = 0.5, opt_kwargs: dict,
                  clip: float = 0.0) -> dict:
    """The single-process reference: per step, Muon on the full-batch gradient (mean over
    ``world`` ranks x ``gas`` micro-batches; step ``i`` at learning rate ``lrs[i]``), then the
    hand-built factors from the float64 max logits of that step's forward passes scale the q/k
    rows. Returns the weights after every step (``"weights"``) and the per-step float64 maxima
    (``"maxima"``)."""
    from muon_megatron import Muon, muon_param_groups

    make, batch, loss_fn, _ = KINDS[kind]
    model = make(0)
    opt = Muon(muon_param_groups(model), **opt_kwargs)
    out = {"weights": [], "maxima": []}
    for step, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        inputs, handles = capture_attention_inputs(model, kind)
        losses = [loss_fn(model, *batch(step, m, r)) for r in range(world) for m in range(gas)]
        for h in handles:
            h.remove()
        torch.stack(losses).mean().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        maxima = max_logits64(kind, before, inputs)
        opt.step()
        with torch.no_grad():
            params = dict(model.named_parameters())
            for layer, S in maxima.items():
                rows = clip_rows64(kind, S, tau, alpha)
                for part, name in qk_param_names(kind, layer).items():
                    p = params[name]
                    p.copy_((p.to(F64) * rows[part].unsqueeze(1)).to(p.dtype))
        out["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        out["maxima"].append(maxima)
    return out

