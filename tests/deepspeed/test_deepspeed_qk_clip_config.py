"""QK-Clip's ``optimizer.params`` keys, the layer declarations and the refusals at initialize
(no processes needed: every refusal happens before DeepSpeed builds anything)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("deepspeed")

import muon_megatron.deepspeed as mmds  # noqa: E402
from muon_megatron.core.qk_clip import QKClipLayer  # noqa: E402
from muon_megatron.deepspeed.config import MuonConfig, split_config  # noqa: E402
from _model import make_model  # noqa: E402
from _qk_clip_model import GROUPS, HEAD_DIM, HEADS, make_gqa_model, make_mla_model  # noqa: E402

F64 = torch.float64


def qk_config(stage=1, **params):
    return {"train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "muon", "params": {"qk_clip_threshold": 100.0, **params}},
            "zero_optimization": {"stage": stage}}


# --- optimizer.params -----------------------------------------------------------------------------


def test_qk_clip_is_off_by_default_and_alpha_defaults_to_half():
    c = MuonConfig.from_params({})
    assert (c.qk_clip_threshold, c.qk_clip_alpha, c.qk_clip_gqa_rule, c.qk_clip) == (None, 0.5, "per_head", False)
    c = MuonConfig.from_params({"qk_clip_threshold": 50, "qk_clip_alpha": 0.25, "qk_clip_gqa_rule": "group"})
    assert (c.qk_clip_threshold, c.qk_clip_alpha, c.qk_clip_gqa_rule, c.qk_clip) == (50, 0.25, "group", True)
    assert "qk_clip_threshold" not in c.optimizer_kwargs()  # not a hyper-parameter of the Muon step


@pytest.mark.parametrize("params, needle", [
    ({"qk_clip_threshold": 0}, "optimizer.params.qk_clip_threshold=0"),
    ({"qk_clip_threshold": -5.0}, "optimizer.params.qk_clip_threshold=-5.0"),
    ({"qk_clip_threshold": math.inf}, "optimizer.params.qk_clip_threshold=inf"),
    ({"qk_clip_threshold": True}, "optimizer.params.qk_clip_threshold=True"),
    ({"qk_clip_threshold": "100"}, "optimizer.params.qk_clip_threshold='100'"),
    ({"qk_clip_threshold": "auto"}, 'optimizer.params.qk_clip_threshold is "auto"'),
    ({"qk_clip_alpha": 1.5}, "optimizer.params.qk_clip_alpha=1.5"),
    ({"qk_clip_alpha": None}, "optimizer.params.qk_clip_alpha=None"),
    ({"qk_clip_gqa_rule": "mean"}, "optimizer.params.qk_clip_gqa_rule='mean'"),
])
def test_bad_qk_clip_values_name_the_key(params, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        MuonConfig.from_params(params)


def test_qk_clip_with_deepspeeds_builtin_muon_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"optimizer.params.qk_clip_threshold: QK-Clip is muon_megatron's"):
        split_config(qk_config(implementation="deepspeed"))


# --- declarations -------------------------------------------------------------------------------


def test_layer_declarations_check_their_fields():
    with pytest.raises(ValueError, match="layout must be one of"):
        QKClipLayer(name="a", layout="gqa", num_heads=4, q="q", k="k", head_dim=8)
    with pytest.raises(ValueError, match="layout 'separate' needs k"):
        QKClipLayer(name="a", layout="separate", num_heads=4, q="q", head_dim=8)
    with pytest.raises(ValueError, match="qkv do not apply to layout 'mla'"):
        QKClipLayer(name="a", layout="mla", num_heads=4, q="q", k="k", qkv="x", qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8)
    with pytest.raises(ValueError, match="num_query_groups=3 must divide num_heads=4"):
        QKClipLayer(name="a", layout="fused_qkv", num_heads=4, num_query_groups=3, qkv="w", head_dim=8)
    assert QKClipLayer(name="a", layout="separate", num_heads=4, q="q", k="k", head_dim=8).num_query_groups == 4


def _gamma(heads: int, seed: int) -> torch.Tensor:
    g = torch.rand(heads, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.9 + 0.05
    g[::3] = 1.0  # some heads unclipped
    return g


def test_declared_row_factors_equal_hand_built_ones():
    """Each layout's row factors against factors written out head by head (alpha 0.3, float64)."""
    alpha, H, G, d = 0.3, 6, 2, 4
    gamma = _gamma(H, 1)
    rep = H // G
    gamma_g = [min(gamma[g * rep : (g + 1) * rep].tolist()) for g in range(G)]
    q_rows = [gamma[h].item() / gamma_g[h // rep] ** (1 - alpha) for h in range(H) for _ in range(d)]
    k_rows = [gamma_g[g] ** (1 - alpha) for g in range(G) for _ in range(d)]

    sep = QKClipLayer(name="s", layout="separate", num_heads=H, num_query_groups=G, head_dim=d, q="q", k="k")
    got = sep.row_scales(gamma, alpha=alpha, dtype=F64)
    assert torch.allclose(got["q"], torch.tensor(q_rows, dtype=F64), rtol=1e-14)
    assert torch.allclose(got["k"], torch.tensor(k_rows, dtype=F64), rtol=1e-14)
    assert sep.rows() == {"q": H * d, "k": G * d}

    fused = QKClipLayer(name="f", layout="fused_qkv", num_heads=H, num_query_groups=G, head_dim=d, qkv="w")
    want = []
    for g in range(G):
        want += q_rows[g * rep * d : (g + 1) * rep * d] + k_rows[g * d : (g + 1) * d] + [1.0] * d
    assert torch.allclose(fused.row_scales(gamma, alpha=alpha, dtype=F64)["w"], torch.tensor(want, dtype=F64),
                          rtol=1e-14)
    assert fused.rows() == {"w": (H + 2 * G) * d}

    nope, rope, v = 5, 3, 4
    mla = QKClipLayer(name="m", layout="mla", num_heads=H, q="q", k="kv", qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                      v_head_dim=v)
    got = mla.row_scales(gamma, alpha=alpha, dtype=F64)
    q_want = [x for h in range(H) for x in [gamma[h].item() ** alpha] * nope + [gamma[h].item()] * rope]
    kv_want = [x for h in range(H) for x in [gamma[h].item() ** (1 - alpha)] * nope + [1.0] * v]
    assert torch.allclose(got["q"], torch.tensor(q_want, dtype=F64), rtol=1e-14)
    assert torch.allclose(got["kv"], torch.tensor(kv_want, dtype=F64), rtol=1e-14)
    assert mla.rows() == {"q": H * (nope + rope), "kv": H * (nope + v)}


@pytest.mark.parametrize("q_lora", [False, True])
def test_moonlight_mini_declares_its_mla_layers(q_lora):
    from muon_megatron.models import MOONLIGHT_MINI
    from muon_megatron.models.torch_model import MoonlightModel

    spec = MOONLIGHT_MINI
    if q_lora:
        spec = spec.replace(attention=dataclasses.replace(spec.attention, q_lora_rank=48))
    model = MoonlightModel(spec)
    layers = model.qk_clip_layers()
    params = dict(model.named_parameters())
    assert [layer.name for layer in layers] == [f"layers.{i}.self_attention" for i in range(spec.num_layers)]
    for i, layer in enumerate(layers):
        q = "linear_q_up_proj" if q_lora else "linear_q_proj"
        assert (layer.q, layer.k) == (f"layers.{i}.self_attention.{q}.weight",
                                      f"layers.{i}.self_attention.linear_kv_up_proj.weight")
        assert layer.name == model.get_submodule(layer.name).max_logit_name
        for name, rows in layer.rows().items():
            assert params[name].shape[0] == rows


# --- refusals at initialize -------------------------------------------------------------------


def _refused(model, needle, config=None, **kwargs):
    with pytest.raises(ValueError, match=needle):
        mmds.initialize(model=model, config=config or qk_config(), **kwargs)


def test_qk_clip_on_a_model_that_declares_no_layers_is_refused_naming_it():
    _refused(make_model(0), r"the model TinyLM declares no attention layers for QK-Clip.*qk_clip_layers")
    _refused(make_gqa_model(0), r"qk_clip_layers=.*declares no attention layer of the model GQALM",
             qk_clip_layers=[])


def _separate(i=0, **changes):
    fields = dict(name=f"layers.{i}.self_attn", layout="separate", num_heads=HEADS, num_query_groups=GROUPS,
                  head_dim=HEAD_DIM, q=f"layers.{i}.self_attn.q_proj.weight", k=f"layers.{i}.self_attn.k_proj.weight")
    fields.update(changes)
    return QKClipLayer(**fields)


def test_a_declared_parameter_that_does_not_exist_is_refused_naming_it():
    _refused(make_gqa_model(0), r"GQALM has no parameter 'layers.0.attn.q_proj.weight'.*layers.0.self_attn.q_proj",
             qk_clip_layers=[_separate(q="layers.0.attn.q_proj.weight")])


def test_head_counts_that_do_not_fit_the_weight_are_refused():
    _refused(make_gqa_model(0), r"'layers.0.self_attn.k_proj.weight' of GQALM has shape \(12, 20\).* 24 rows",
             qk_clip_layers=[_separate(num_query_groups=HEADS)])


def test_a_query_weight_routed_to_adamw_is_refused_naming_the_key():
    _refused(make_gqa_model(0),
             r"'layers.1.self_attn.q_proj.weight' of GQALM is routed to AdamW.*optimizer.params.adamw",
             config=qk_config(adamw=["layers.1.self_attn.q_proj.weight"]))


def test_a_frozen_key_weight_is_refused():
    model = make_gqa_model(0)
    model.layers[0].self_attn.k_proj.weight.requires_grad_(False)
    _refused(model, r"'layers.0.self_attn.k_proj.weight' of GQALM is not trained")


def test_two_layers_under_one_recorder_name_are_refused():
    _refused(make_gqa_model(0), "two layers share the recorder name 'layers.0.self_attn'",
             qk_clip_layers=[_separate(0), _separate(1, name="layers.0.self_attn")])


def test_entries_that_are_not_declarations_are_refused():
    _refused(make_gqa_model(0), "must give muon_megatron.core.qk_clip.QKClipLayer entries",
             qk_clip_layers=[{"name": "layers.0.self_attn"}])


class _TensorParallel2:
    def get_tensor_model_parallel_world_size(self):
        return 2

    def get_tensor_model_parallel_rank(self):
        return 0

    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank


def test_qk_clip_with_tensor_or_sequence_parallelism_is_refused():
    _refused(make_mla_model(0),
             r"qk_clip_threshold with tensor parallelism \(tensor-parallel size 2\) is not supported",
             mpu=_TensorParallel2())
    config = dict(qk_config(), sequence_parallel_size=2)
    _refused(make_mla_model(0), r"qk_clip_threshold with sequence parallelism", config=config)

