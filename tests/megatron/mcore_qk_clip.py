"""Workers for ``test_megatron_qk_clip.py``: QK-Clip through megatron-core against float64 (tests only).

``reference_worker`` (one process, TP1): trains the tiny model with ``muon_megatron.Muon`` and
applies QK-Clip by hand after every step: the max logits of each head are computed in float64
from each attention layer's input and weights (the projections, RoPE and the causal mask
re-derived here; :func:`float64_max_logits`), and the factors in float64 from the rule as Kimi K2
and megatron-core state it (:func:`row_factors`), independently of ``muon_megatron.core.qk_clip``.
As a check of this reference itself, the same maxima are also computed from the q and k that
megatron-core's core attention actually receives.

``parallel_worker``: the same model under a parallel layout, trained with
``muon_megatron.megatron.get_muon_optimizer(settings with qk_clip_threshold)`` through Megatron's
DDP and optimizer wrappers; returns per-parameter errors against the reference, the maxima and
clipped heads the adapter reported each step, and on request (learning rate 0) the float64 max
logits after the step recomputed from the new weights and the step's own layer inputs, and the
bf16 model copies against the fp32 main parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

import mcore_models as mm
import mcore_parity as mp

# q/k weights are multiplied by these after initialisation, so that the tiny model's logits are
# of order 1-10 (at init std 0.02 they are ~0.03) and a threshold can sit among them.
GAIN_QKV = 15.0
GAIN_MLA = 6.0


# --- model ---------------------------------------------------------------------------------------


def build(spec: mm.TinySpec, bf16: bool = False):
    """The tiny GPT of :mod:`mcore_models`; MLA with muon_megatron's ``SDPACoreAttention`` (which
    the adapter knows); ``bf16``: built in bf16 for megatron-core's fp32-main-param wrappers."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from muon_megatron.models.mla_attention import SDPACoreAttention

    config = mm.transformer_config(spec, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    if bf16:
        config = dataclasses.replace(config, bf16=True, params_dtype=torch.bfloat16)
    torch.manual_seed(spec.seed)
    layer_spec = get_gpt_layer_local_spec(multi_latent_attention=spec.multi_latent_attention, normalization="RMSNorm")
    if spec.multi_latent_attention:
        layer_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
                     max_sequence_length=spec.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        model = model.cuda()  # as megatron.training does; built on the CPU (use_cpu_initialization)
    return model


def attention_layers(model) -> list:
    from megatron.core.transformer.attention import Attention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def _is_mla(m) -> bool:
    return hasattr(m, "linear_kv_up_proj")


def boost_(model) -> None:
    """Scale the q/k projections up (see GAIN_*), in place."""
    with torch.no_grad():
        for _, m in attention_layers(model):
            if _is_mla(m):
                for lin in (m.linear_q_proj, m.linear_kv_down_proj, m.linear_kv_up_proj):
                    lin.weight.mul_(GAIN_MLA)
            else:
                m.linear_qkv.weight.mul_(GAIN_QKV)


# --- float64 references ----------------------------------------------------------------------------


def _rotate(t: torch.Tensor, positions: torch.Tensor, interleaved_storage: bool) -> torch.Tensor:
    """RoPE, base 10000, rotate-half on the last dim of ``t`` [s, b, heads, dim]. MLA stores its
    rotary channels interleaved (x0, y0, x1, y1, ...) and megatron-core regroups them first."""
    dim = t.shape[-1]
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(positions.double(), inv)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :].to(t.device)
    if interleaved_storage:
        t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    rotated = torch.cat([-t[..., dim // 2:], t[..., : dim // 2]], dim=-1)
    return t * angles.cos() + rotated * angles.sin()


def _causal_max(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[heads] float64 max over batch and causal (i, j) of q_i . k_j * scale; q, k [s, b, heads, d]."""
    s = q.shape[0]
    logits = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) * scale
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return logits.amax(dim=(0, 2, 3))


def float64_max_logits(m, x: torch.Tensor) -> torch.Tensor:
    """Per-head max logit of attention layer ``m`` (this rank's heads) on input ``x`` [s, b, hidden],
    in float64 from its weights: fused QKV (GQA/MHA, RoPE on the whole head) or MLA (no q LoRA,
    no latent norm: the tiny model's)."""
    x = x.double()
    s, b, _ = x.shape
    positions = torch.arange(s)
    heads = m.num_attention_heads_per_partition
    if _is_mla(m):
        cfg = m.config
        nope, rope, v = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        q = (x @ m.linear_q_proj.weight.double().T).view(s, b, heads, nope + rope)
        latent, k_rope = (x @ _full_kv_down(m).double().T).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = (latent @ m.linear_kv_up_proj.weight.double().T).view(s, b, heads, nope + v)
        q = torch.cat([q[..., :nope], _rotate(q[..., nope:], positions, True)], dim=-1)
        k_rope = _rotate(k_rope[:, :, None, :], positions, True).expand(s, b, heads, rope)
        k = torch.cat([kv[..., :nope], k_rope], dim=-1)
        return _causal_max(q, k, m.softmax_scale)
    groups = m.num_query_groups_per_partition
    d = m.hidden_size_per_attention_head
    rep = heads // groups
    W = m.linear_qkv.weight.double().view(groups, rep + 2, d, -1)
    q = torch.einsum("sbh,grdh->sbgrd", x, W[:, :rep]).reshape(s, b, heads, d)
    k = torch.einsum("sbh,gdh->sbgd", x, W[:, rep]).repeat_interleave(rep, dim=2)
    return _causal_max(_rotate(q, positions, False), _rotate(k, positions, False), 1.0 / math.sqrt(d))


def _full_kv_down(m) -> torch.Tensor:
    """MLA's ``linear_kv_down_proj`` weight, whole: the local spec splits its rows over
    tensor-parallel ranks (megatron-core gathers its output)."""
    from megatron.core import parallel_state as ps

    w = m.linear_kv_down_proj.weight.detach()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(m.linear_kv_down_proj.weight, "tensor_model_parallel", False):
        return w
    parts = [torch.empty_like(w) for _ in range(tp)]
    torch.distributed.all_gather(parts, w.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=0)


def row_factors(m, gamma: torch.Tensor, alpha: float, rule: str) -> dict:
    """Float64 factors per row of each q/k weight of ``m`` from its heads' gamma = min(1, tau / S)
    (this rank's heads): q by gamma**alpha and k by gamma**(1 - alpha) per head; with GQA the key
    of a group takes the group's smallest gamma g and each query head gamma / g**(1 - alpha)
    ("per_head") or g**alpha ("group", megatron-core's); MLA: q^C gamma**alpha, q^R gamma, k^C
    gamma**(1 - alpha), values and the shared rotary key untouched."""
    gamma = gamma.double()
    if _is_mla(m):
        cfg = m.config
        nope, rope, v = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        q = torch.cat([gamma[:, None].pow(alpha).expand(-1, nope), gamma[:, None].expand(-1, rope)], dim=1)
        kv = torch.cat([gamma[:, None].pow(1 - alpha).expand(-1, nope), torch.ones_like(gamma)[:, None].expand(-1, v)],
                       dim=1)
        return {"linear_q_proj": q.reshape(-1), "linear_kv_up_proj": kv.reshape(-1)}
    groups = m.num_query_groups_per_partition
    d = m.hidden_size_per_attention_head
    per_group = gamma.view(groups, -1)
    g = per_group.min(dim=1).values[:, None]
    q = per_group / g.pow(1 - alpha) if rule == "per_head" else g.pow(alpha).expand_as(per_group)
    rows = torch.cat([q, g.pow(1 - alpha), torch.ones_like(g)], dim=1)  # [groups, rep + 2]
    return {"linear_qkv": rows.repeat_interleave(d, dim=1).reshape(-1)}


def _targets(name: str, m) -> dict:
    if _is_mla(m):
        return {f"{name}.linear_q_proj.weight": "linear_q_proj",
                f"{name}.linear_kv_up_proj.weight": "linear_kv_up_proj"}
    return {f"{name}.linear_qkv.weight": "linear_qkv"}


class Capture:
    """Forward hooks recording each attention layer's input and its core attention's q, k and mask
    (training forwards, in order)."""

    def __init__(self, model):
        self.inputs: dict = {}
        self.core: dict = {}
        self.handles = []
        for name, m in attention_layers(model):
            self.handles.append(m.register_forward_pre_hook(self._attention(name), with_kwargs=True))
            self.handles.append(m.core_attention.register_forward_pre_hook(self._core(name), with_kwargs=True))

    def _attention(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.inputs.setdefault(name, []).append(x.detach().clone())

        return hook

    def _core(self, name):
        def hook(module, args, kwargs):
            q, k = (args[i] if len(args) > i else kwargs[key] for i, key in ((0, "query"), (1, "key")))
            self.core.setdefault(name, []).append((q.detach().clone(), k.detach().clone()))

        return hook

    def clear(self):
        self.inputs.clear()
        self.core.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def measured(model, capture: Capture) -> tuple[dict, float]:
    """(layer name -> float64 per-head max logit of this rank's heads over the captured forwards,
    computed from the layer inputs and current weights; the largest relative difference between
    that and the same max computed from the q and k the core attention received)."""
    out, worst = {}, 0.0
    for name, m in attention_layers(model):
        S = torch.stack([float64_max_logits(m, x) for x in capture.inputs[name]]).amax(0)
        scale = m.softmax_scale if _is_mla(m) else 1.0 / math.sqrt(m.hidden_size_per_attention_head)
        rep = 1 if _is_mla(m) else m.num_attention_heads_per_partition // m.num_query_groups_per_partition
        seen = torch.stack([_causal_max(q, k.repeat_interleave(rep, dim=2), scale) for q, k in capture.core[name]])
        worst = max(worst, float(((S - seen.amax(0)).abs() / S.abs().clamp_min(1e-3)).max()))
        out[name] = S
    return out, worst


# --- the single-process reference ---------------------------------------------------------------------


def pick_tau(maxima: dict) -> float:
    """A threshold in the middle of the step's per-head maxima: about half the heads clip."""
    values = torch.cat(list(maxima.values())).sort().values
    mid = len(values) // 2
    return float((values[mid - 1] + values[mid]) / 2)


def reference_worker(rank, world, spec, steps, path, alpha=0.5, rule="per_head", lr=mp.LR):
    """Train ``steps`` steps with Muon + QK-Clip by hand (see the module docstring); tau is
    :func:`pick_tau` of step 0. Saves initial/final weights, per-step float64 maxima, tau and
    the reference's own consistency figure."""
    from muon_megatron import Muon
    from muon_megatron.core.routing import muon_param_groups

    mp._init_parallel()
    model = build(spec)
    boost_(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Muon(muon_param_groups(model, splits=mp.reference_splits(spec, model)), lr=lr, weight_decay=mp.WD,
               adamw_betas=mp.BETAS, adamw_eps=mp.EPS, ns_dtype=torch.float32)
    capture = Capture(model)
    params = dict(model.named_parameters())
    tau, history, worst = None, [], 0.0
    for step in range(steps):
        capture.clear()
        model.zero_grad(set_to_none=True)
        mm.loss_of(model, mm.batch(step, spec)).backward()
        S, discrepancy = measured(model, capture)
        worst = max(worst, discrepancy)
        if tau is None:
            tau = pick_tau(S)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], mp.CLIP)
        opt.step()
        with torch.no_grad():
            for name, m in attention_layers(model):
                gamma = torch.clamp(tau / S[name], max=1.0)
                factors = row_factors(m, gamma, alpha, rule)
                for pname, key in _targets(name, m).items():
                    p = params[pname]
                    p.copy_((p.double() * factors[key][:, None]).to(p.dtype))
        history.append(S)
    capture.remove()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"initial": initial, "final": final, "maxima": history, "tau": tau, "self_check": worst}, path)
    return tau


def references_worker(rank, world, jobs):
    """Several references in one process: ``jobs`` is a list of keyword dicts."""
    from megatron.core import parallel_state as ps

    out = []
    for kwargs in jobs:
        out.append(reference_worker(rank, world, **kwargs))
        ps.destroy_model_parallel()
    return out


# --- the adapter under a parallel layout --------------------------------------------------------------


def _main_params(wrapper) -> list:
    """(model param, main tensor, flat start or None) as megatron-core's wrapper keeps them."""
    from megatron.core.optimizer import DistributedOptimizer

    if isinstance(wrapper, DistributedOptimizer):
        out = []
        for model_param, (gi, order) in wrapper.model_param_group_index_map.items():
            main = wrapper.optimizer.param_groups[gi]["params"][order]
            out.append((model_param, main, wrapper._get_model_param_range_map(model_param)["param"].start))
        return out
    if hasattr(wrapper, "float16_groups"):
        return [(m, f, None) for mg, fg in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups)
                for m, f in zip(mg, fg)]
    return []


def parallel_worker(rank, world, spec, steps, ref_path, layout, settings=None, lr=mp.LR, bf16=False,
                    start=0, save_dir=None, load_dir=None, recompute_after=False):
    """Train ``start .. steps - 1`` under ``layout`` (dict: tp, distopt) with QK-Clip at the
    reference's tau (``settings`` overrides MuonSettings fields; ``qk_clip_threshold=None`` turns
    it off). Returns a dict: ``errors`` (relative Frobenius error per parameter against the
    reference's final weights; fp32 only), ``stats`` (per step: the adapter's full per-head
    maxima per layer and clipped-head counts), ``weights`` (this rank's final tensors),
    ``heads`` (layer -> head offset of this rank); with ``recompute_after``: ``after`` (float64
    max logits of this rank's heads from the new weights and the step's inputs, last step);
    with ``bf16``: ``main_vs_model`` (largest difference between a bf16 model tensor and its fp32
    main tensor rounded to bf16) and ``main_vs_expected`` (largest relative difference between
    the clipped main tensors and the initial ones times factors computed here, in float64, from
    the adapter's reported maxima; meaningful with lr 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.megatron import MuonSettings, get_muon_optimizer

    mp._init_parallel(layout.get("tp", 1))
    ref = torch.load(ref_path)
    model = build(spec, bf16=bf16)
    names = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            names[p] = name
            p.copy_(mp.shard_of(ref["initial"][name], p, name, model))
    chunk = model
    if bf16:
        from megatron.core.transformer.module import Float16Module

        chunk = Float16Module(model.config, model)
    distopt = layout.get("distopt", False)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True,
                                               bucket_size=layout.get("bucket", 1000))
    ddp = DDP(model.config, ddp_config, chunk)
    config = OptimizerConfig(optimizer="muon", lr=lr, min_lr=0.0, weight_decay=mp.WD if lr else 0.0,
                             adam_beta1=mp.BETAS[0], adam_beta2=mp.BETAS[1], adam_eps=mp.EPS, clip_grad=mp.CLIP,
                             use_distributed_optimizer=distopt, bf16=bf16, fp16=False)
    kwargs = dict(ns_dtype="float32", qk_clip_threshold=ref["tau"])
    kwargs.update(settings or {})
    opt = get_muon_optimizer(config, [ddp], MuonSettings(**kwargs))
    if load_dir:
        mp._load(model, opt, load_dir)
    wrapper = opt.chained_optimizers[0]
    inner = wrapper.optimizer
    capture = Capture(model)
    mains_before = {id(m): main.detach().clone() for m, main, _ in _main_params(wrapper)}
    stats = []
    for step in range(start, steps):
        capture.clear()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens = mm.local_batch(mm.batch(step, spec), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        mm.loss_of(ddp, tokens).backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok, "optimizer step reported failure"
        clip = inner.qk_clip
        stats.append(None if clip is None else {
            "maxima": {k: v.detach().cpu().double().tolist() for k, v in clip.last_maxima.items()},
            "clipped": dict(inner.last_qk_clip.clipped_heads),
            "max_logit": dict(inner.last_qk_clip.max_logit),
        })
    if save_dir:
        mp._save(model, opt, save_dir)
    layers = attention_layers(model)
    out = {
        "stats": stats,
        "weights": {names[p]: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
                    for p in model.parameters()},
        "heads": {f"layer{m.layer_number}": ps.get_tensor_model_parallel_rank() * m.num_attention_heads_per_partition
                  for _, m in layers},
    }
    if not bf16:
        errors = {}
        for p, name in names.items():
            expected = mp.shard_of(ref["final"][name], p, name, model)
            errors[name] = float((p.detach() - expected).norm() / expected.norm().clamp_min(1e-12))
        out["errors"] = errors
    if recompute_after:
        with torch.no_grad():
            out["after"] = {f"layer{m.layer_number}": torch.stack([float64_max_logits(m, x) for x in capture.inputs[n]]
                                                                 ).amax(0).tolist() for n, m in layers}
    if bf16:
        out.update(_bf16_checks(wrapper, model, layers, names, mains_before, stats[-1], ref["tau"], kwargs))
    capture.remove()
    return out


def parallel_case(rank, world, kwargs):
    """:func:`parallel_worker` with keyword arguments (a case of ``mcore_suite.run_cases``)."""
    return parallel_worker(rank, world, **kwargs)


def _bf16_checks(wrapper, model, layers, names, mains_before, last, tau, kwargs) -> dict:
    """See :func:`parallel_worker` (``bf16``)."""
    from megatron.core import parallel_state as ps

    alpha, rule = kwargs.get("qk_clip_alpha", 0.5), kwargs.get("qk_clip_gqa_rule", "per_head")
    factors = {}
    for name, m in layers:
        full = torch.tensor(last["maxima"][f"layer{m.layer_number}"], dtype=torch.float64)
        first = ps.get_tensor_model_parallel_rank() * m.num_attention_heads_per_partition
        gamma = torch.clamp(tau / full[first : first + m.num_attention_heads_per_partition], max=1.0)
        for pname, key in _targets(name, m).items():
            factors[pname] = row_factors(m, gamma, alpha, rule)[key]
    vs_model, vs_expected = 0.0, 0.0
    for model_param, main, start in _main_params(wrapper):
        flat_model = model_param.detach().view(-1)
        piece = flat_model if start is None else flat_model[start : start + main.numel()]
        vs_model = max(vs_model, float((piece.float() - main.detach().view(-1).to(torch.bfloat16).float()).abs().max()))
        name = names[model_param]
        if name in factors:
            rows = model_param.shape[0]
            per_element = factors[name].repeat_interleave(model_param.numel() // rows)
            if start is not None:
                per_element = per_element[start : start + main.numel()]
            expected = mains_before[id(model_param)].double().view(-1) * per_element.to(main.device)
            diff = (main.detach().double().view(-1) - expected).abs().max() / expected.abs().max()
            vs_expected = max(vs_expected, float(diff))
    return {"main_vs_model": vs_model, "main_vs_expected": vs_expected}


# --- refusals ---------------------------------------------------------------------------------------


def _optimizer_for(model, **settings):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.megatron import MuonSettings, get_muon_optimizer

    ddp = DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    config = OptimizerConfig(optimizer="muon", lr=mp.LR, weight_decay=mp.WD, use_distributed_optimizer=False)
    return get_muon_optimizer(config, [ddp], MuonSettings(ns_dtype="float32", **settings))


def refusals_worker(rank, world):
    """{case: None or "ExceptionType: message"} for building the optimizer with QK-Clip on
    models it must refuse, and on the plain model (which it must accept)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    mp._init_parallel()
    spec = mm.TinySpec()
    out = {}

    def attempt(case, model):
        try:
            _optimizer_for(model, qk_clip_threshold=10.0)
            out[case] = None
        except Exception as err:  # the message is what the test checks
            out[case] = f"{type(err).__name__}: {err}"

    def gpt(config, layer_spec):
        torch.manual_seed(spec.seed)
        return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
                        max_sequence_length=spec.seq_length, position_embedding_type="rope")

    attempt("plain", build(spec))
    attempt("qk_layernorm", gpt(mm.transformer_config(spec, qk_layernorm=True),
                                get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")))
    foreign = get_gpt_layer_local_spec(normalization="RMSNorm")
    foreign.submodules.self_attention.submodules.core_attention = mm.SdpaCoreAttention
    attempt("foreign_core_attention", gpt(mm.transformer_config(spec), foreign))
    return out


# --- Megatron's own training loop -------------------------------------------------------------------


def pretrain_qk_clip_worker(rank, world, extra_args):
    """``mcore_pretrain.pretrain_worker`` (Megatron's ``pretrain()`` after ``install()``) recording
    every QK-Clip step of the optimizer: returns its result plus ``qk`` (per step: tau, total
    clipped heads, largest max logit) and megatron-core's own ``qk_clip`` argument after
    validation."""
    import mcore_pretrain

    from muon_megatron.megatron import qk_clip

    steps = []
    original = qk_clip.MegatronQKClip.apply_

    def recording(self):
        stats = original(self)
        steps.append((self.tau, stats.clipped_heads_total, stats.max_logit_overall))
        return stats

    qk_clip.MegatronQKClip.apply_ = recording
    out = mcore_pretrain.pretrain_worker(rank, world, extra_args)
    from megatron.training import get_args

    out["qk"] = steps
    out["megatron_qk_clip"] = get_args().qk_clip
    return out
