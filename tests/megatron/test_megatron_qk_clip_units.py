"""QK-Clip in the Megatron adapter, in one process (no process group): the flags and their mapping
from megatron-core's own, the settings' checks, the measuring hooks against float64 brute force,
and the inner optimizer's step (a skipped step's max logits never reach the next step)."""

from __future__ import annotations

import argparse
import importlib
import math
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from muon_megatron.core.qk_clip import clip_fused_qkv_  # noqa: E402
from muon_megatron.distributed import ParamLayout  # noqa: E402
from muon_megatron.megatron import MuonSettings  # noqa: E402
from muon_megatron.megatron.arguments import (  # noqa: E402
    add_muon_arguments,
    apply_megatron_qk_clip_,
    muon_settings_from_args,
)
from muon_megatron.megatron.inner import MegatronMuon, tensorboard_hook  # noqa: E402
from muon_megatron.megatron.qk_clip import ClipLayer, ClipTarget, MegatronQKClip, _local_pre_hook, _source  # noqa: E402


# --- settings and flags ------------------------------------------------------------------------------


def test_qk_clip_is_off_by_default():
    s = MuonSettings()
    assert (s.qk_clip_threshold, s.qk_clip_alpha, s.qk_clip_gqa_rule) == (None, 0.5, "per_head")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(qk_clip_threshold=0.0), "--muon-qk-clip-threshold"),
    (dict(qk_clip_threshold=-3.0), "--muon-qk-clip-threshold"),
    (dict(qk_clip_threshold=float("nan")), "--muon-qk-clip-threshold"),
    (dict(qk_clip_threshold=100.0, qk_clip_alpha=1.5), "--muon-qk-clip-alpha"),
    (dict(qk_clip_gqa_rule="max"), "--muon-qk-clip-gqa-rule"),
])
def test_bad_qk_clip_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MuonSettings(**kwargs)


def _plain():
    return add_muon_arguments(argparse.ArgumentParser(allow_abbrev=False))


def _megatron():
    training_arguments = pytest.importorskip("megatron.training.arguments")
    return add_muon_arguments(training_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


@pytest.mark.parametrize("make", [_plain, _megatron])
def test_our_qk_clip_flags_parse(make):
    args = make().parse_args(["--muon-qk-clip-threshold", "50", "--muon-qk-clip-alpha", "0.3",
                              "--muon-qk-clip-gqa-rule", "group"])
    s = muon_settings_from_args(args)
    assert (s.qk_clip_threshold, s.qk_clip_alpha, s.qk_clip_gqa_rule) == (50.0, 0.3, "group")
    assert muon_settings_from_args(make().parse_args([])).qk_clip_threshold is None


def test_megatron_cores_qk_clip_flags_are_honoured_and_its_own_clip_turned_off():
    """--qk-clip --qk-clip-threshold T --qk-clip-alpha A (megatron-core 0.19's spelling, same rule and
    alpha convention) clips with T and A in the optimizer; megatron-core's args.qk_clip is turned
    off so it neither clips a second time nor asks for Transformer Engine."""
    args = _megatron().parse_args(["--qk-clip", "--qk-clip-threshold", "40", "--qk-clip-alpha", "0.25"])
    s = muon_settings_from_args(args)
    assert (s.qk_clip_threshold, s.qk_clip_alpha) == (40.0, 0.25)
    apply_megatron_qk_clip_(args)
    assert args.qk_clip is False
    assert (args.muon_qk_clip_threshold, args.muon_qk_clip_alpha) == (40.0, 0.25)
    assert muon_settings_from_args(args) == s
    default = _megatron().parse_args(["--qk-clip"])
    assert muon_settings_from_args(default).qk_clip_threshold == 100.0  # megatron-core's default threshold


def test_megatron_cores_threshold_without_qk_clip_changes_nothing():
    args = _megatron().parse_args(["--qk-clip-threshold", "40"])
    assert muon_settings_from_args(args).qk_clip_threshold is None


def test_both_spellings_disagreeing_are_refused_naming_both():
    args = _megatron().parse_args(["--qk-clip", "--qk-clip-threshold", "40", "--muon-qk-clip-threshold", "50"])
    with pytest.raises(ValueError, match="--qk-clip-threshold 40.*--muon-qk-clip-threshold 50"):
        muon_settings_from_args(args)
    agreeing = _megatron().parse_args(["--qk-clip", "--qk-clip-threshold", "40", "--muon-qk-clip-threshold", "40"])
    assert muon_settings_from_args(agreeing).qk_clip_threshold == 40.0


def test_qk_clip_with_transformer_engine_attention_needs_te_2_9_and_turns_on_its_max_logits(monkeypatch):
    from megatron.core import utils

    measure = importlib.import_module("muon_megatron.megatron.install")._measure_with_transformer_engine

    local = argparse.Namespace(transformer_impl="local", log_max_attention_logit=False)
    measure(local)
    assert local.log_max_attention_logit is False
    from packaging.version import Version

    for found, ok in (("0.0.0", False), ("2.8.1", False), ("2.9.0", True), ("2.10.0", True)):
        monkeypatch.setattr(utils, "get_te_version", lambda v=found: Version(v))
        args = argparse.Namespace(transformer_impl="transformer_engine", log_max_attention_logit=False)
        if ok:
            measure(args)
            assert args.log_max_attention_logit is True
        else:
            with pytest.raises(ValueError, match="Transformer Engine >= 2.9.*--transformer-impl local"):
                measure(args)


# --- measuring -------------------------------------------------------------------------------------


class _Softmax:
    def __init__(self, scale):
        self.scale = scale
        self.window_size = None


class FakeLocalAttention(torch.nn.Module):
    """What the hook reads of megatron-core's DotProductAttention."""

    def __init__(self, softmax_scale, coeff=None, mask_type="causal"):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.scale_mask_softmax = _Softmax(coeff)
        self.attn_mask_type = type("AttnMaskType", (), {"name": mask_type})()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        return query


def _brute(q, k, scale, masked):
    """[heads] float64 max of q_i . k_j * scale where allowed; q [s, b, h, d], k [s, b, g, d]."""
    rep = q.shape[2] // k.shape[2]
    logits = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double().repeat_interleave(rep, dim=2)) * scale
    return logits.masked_fill(masked, -math.inf).amax(dim=(0, 2, 3))


def test_local_attention_hook_measures_what_the_softmax_sees():
    """GQA q/k in Megatron's [s, b, heads, d]: causal without a mask; under a given mask (two
    documents in sample 0) only the allowed logits; the softmax's own scale factor
    (apply_query_key_layer_scaling) included; nothing in evaluation mode."""
    from muon_megatron.core.qk_clip import MaxLogitRecorder

    g = torch.Generator().manual_seed(3)
    s, b, h, groups, d = 9, 2, 4, 2, 8
    q, k = torch.randn(s, b, h, d, generator=g), torch.randn(s, b, groups, d, generator=g)
    v = torch.randn(s, b, groups, d, generator=g)
    q[6, 0] = 10 * k[1, 0].repeat_interleave(h // groups, dim=0)  # the largest logits: query 6, key 1, sample 0
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    documents = causal.expand(b, 1, s, s).clone()
    documents[0, 0, 4:, :4] = True
    rec = MaxLogitRecorder()
    module = FakeLocalAttention(0.1, coeff=3.0)
    module.register_forward_pre_hook(lambda m, a, kw: _local_pre_hook(rec, "causal", m, a, kw), with_kwargs=True)
    module(q, k, v, None)
    want = _brute(q, k, 0.3, causal)
    assert torch.allclose(rec.get("causal").double(), want, rtol=1e-6)
    masked = FakeLocalAttention(0.1)
    masked.register_forward_pre_hook(lambda m, a, kw: _local_pre_hook(rec, "documents", m, a, kw), with_kwargs=True)
    masked(q, k, v, attention_mask=documents)
    want = _brute(q, k, 0.1, documents)
    assert torch.allclose(rec.get("documents").double(), want, rtol=1e-6)
    assert (_brute(q, k, 0.1, causal) > 1.2 * want).all()  # the document mask hides them
    masked.eval()
    masked(q * 100, k, v, attention_mask=documents)
    assert torch.allclose(rec.get("documents").double(), want, rtol=1e-6)


class TEDotProductAttention(torch.nn.Module):
    """Stands in for megatron-core's TEDotProductAttention built with log_max_attention_logit: its
    forward folds Transformer Engine's per-head max logits into ``current_max_attn_logits``."""

    def __init__(self):
        super().__init__()
        self.current_max_attn_logits = None
        self.next = None

    def forward(self, x):
        batch = self.next
        self.current_max_attn_logits = batch if self.current_max_attn_logits is None else torch.maximum(
            self.current_max_attn_logits, batch)
        return x


def _layer(core, source, targets=(), heads=2, groups=1, head_dim=2):
    return ClipLayer(name="layer1", module_name="decoder.layers.0.self_attention", kind="fused_qkv", source=source,
                     core=core, total_heads=heads, head_offset=0, local_heads=heads, local_groups=groups,
                     head_dim=head_dim, targets=tuple(targets))


def test_transformer_engine_max_logits_move_into_the_recorder_per_training_forward():
    core = TEDotProductAttention()
    clip = MegatronQKClip([_layer(core, "te")], tau=5.0).attach()
    x = torch.zeros(1)
    core.next = torch.tensor([1.0, 7.0])
    core(x)
    assert core.current_max_attn_logits is None  # megatron-core's running max never spans steps
    core.next = torch.tensor([3.0, 2.0])
    core(x)
    assert torch.equal(clip.recorder.get("layer1"), torch.tensor([3.0, 7.0]))
    core.eval()
    core.next = torch.tensor([50.0, 50.0])
    core(x)
    assert core.current_max_attn_logits is None
    assert torch.equal(clip.recorder.get("layer1"), torch.tensor([3.0, 7.0]))
    clip.detach()
    core.train()
    core(x)
    assert core.current_max_attn_logits is not None  # hooks removed


def test_transformer_engine_attention_without_max_logits_is_refused_naming_the_flag():
    core = TEDotProductAttention()
    del core.current_max_attn_logits
    problems = []
    assert _source(core, "decoder.layers.3.self_attention", problems) is None
    assert "decoder.layers.3.self_attention.core_attention" in problems[0]
    assert "--log-max-attention-logit" in problems[0] and "2.9" in problems[0]


# --- the step ----------------------------------------------------------------------------------------


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = value


def _optimizer(lr=0.0):
    """One fused QKV weight (1 group of 2 query heads, head dim 2: rows q0 q0 q1 q1 k k v v) in a
    single-process MegatronMuon with QK-Clip at tau 5 (measurements fed to the recorder directly)."""
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(8, 4, generator=g))
    b = torch.nn.Parameter(torch.randn(4, generator=g))
    opt = MegatronMuon([{"params": [w], "use_muon": True, "layouts": [ParamLayout("w", (8, 4))], "names": ["w"]},
                        {"params": [b], "use_muon": False, "names": ["b"]}], lr=lr, weight_decay=0.0,
                       ns_dtype=torch.float32)
    clip = MegatronQKClip([_layer(torch.nn.Identity(), "local", [ClipTarget("w", w, "qkv")])], tau=5.0)
    clip.bind_main_params([(w, w, None), (b, b, None)], sharded=False)
    opt.qk_clip = clip
    return opt, clip, w, b


def test_a_skipped_steps_max_logits_never_reach_the_next_step():
    """A step skipped for non-finite gradients clips nothing and forgets its max logits: the next
    step, whose heads stay below tau, changes nothing."""
    opt, clip, w, b = _optimizer()
    before = w.detach().clone()
    clip.recorder.record("layer1", torch.tensor([10.0, 1.0]))
    w.grad, b.grad = torch.full_like(w, float("nan")), torch.zeros_like(b)
    clip.take()  # what the wrapper's prepare_grads does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_qk_clip is None
    assert torch.equal(w.detach(), before)
    clip.recorder.record("layer1", torch.tensor([2.0, 1.0]))
    w.grad = torch.zeros_like(w)
    clip.take()
    opt.step()
    assert opt.last_qk_clip.clipped_heads == {"layer1": 0}
    assert torch.equal(w.detach(), before)


def test_a_taken_step_clips_the_heads_above_tau_and_reports_them():
    """Learning rate 0: the step changes only what the clip changes, which is the core rule on
    the whole weight; the telemetry reaches the TensorBoard hook."""
    opt, clip, w, b = _optimizer()
    before = w.detach().clone()
    expected = w.detach().clone()
    clip_fused_qkv_(expected, torch.tensor([10.0, 1.0]), tau=5.0, num_query_groups=1, head_dim=2)
    writer = FakeWriter()
    opt.step_hooks.append(tensorboard_hook(lambda: writer, lambda: 3))
    clip.recorder.record("layer1", torch.tensor([10.0, 1.0]))
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert torch.equal(w.detach(), expected)
    assert torch.allclose(w.detach()[4:6], before[4:6] / math.sqrt(2))  # the key, by sqrt(gamma) = sqrt(1/2)
    assert torch.equal(w.detach()[6:], before[6:])  # the value rows untouched
    assert opt.last_qk_clip.clipped_heads == {"layer1": 1}
    assert writer.scalars["muon/qk-clip/max-logit"] == 10.0
    assert writer.scalars["muon/qk-clip/max-logit/layer1"] == 10.0
    assert writer.scalars["muon/qk-clip/clipped-heads"] == 1
    assert writer.scalars["muon/qk-clip/clipped-heads/layer1"] == 1


def test_a_step_without_measurements_says_how_to_get_them():
    opt, clip, w, b = _optimizer()
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    with pytest.raises(RuntimeError, match="no max logits were recorded this step for \\['layer1'\\].*training mode"):
        opt.step()


def test_megatrons_own_max_logit_log_reports_what_the_optimizer_measured(monkeypatch):
    """Under --log-max-attention-logit Megatron calls its clip_qk after the step; with --optimizer
    muon the wrapped one clips nothing more and returns the step's largest max logit."""
    training = pytest.importorskip("megatron.training")
    install = importlib.import_module("muon_megatron.megatron.install")

    opt, clip, w, b = _optimizer()
    clip.recorder.record("layer1", torch.tensor([10.0, 1.0]))
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    after = w.detach().clone()
    monkeypatch.setattr(training, "get_args", lambda: argparse.Namespace(optimizer="muon"))
    monkeypatch.setattr(install, "_QK_CLIPPED", [opt])
    assert install._clip_qk([], log_max_only=False) == 10.0
    assert torch.equal(w.detach(), after)


def test_non_finite_max_logits_clip_nothing_in_their_layer_and_a_fully_masked_head_counts_as_below_tau(caplog):
    opt, clip, w, b = _optimizer()
    before = w.detach().clone()
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    clip.recorder.record("layer1", torch.tensor([float("inf"), 1.0]))
    with caplog.at_level("WARNING"):
        opt.step()
    assert torch.equal(w.detach(), before) and "non-finite max logits" in caplog.text
    expected = before.clone()
    clip_fused_qkv_(expected, torch.tensor([0.0, 10.0]), tau=5.0, num_query_groups=1, head_dim=2)
    clip.recorder.record("layer1", torch.tensor([-float("inf"), 10.0]))
    opt.step()
    assert torch.equal(w.detach(), expected)
    assert opt.last_qk_clip.clipped_heads == {"layer1": 1}
