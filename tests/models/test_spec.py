"""The pure model descriptions: counts, logical matrices, registry, Megatron argument files."""

from __future__ import annotations

import pytest

from muon_megatron.core.splits import check_tiling
from muon_megatron.distributed.plan import ns_flops
from muon_megatron.models import (
    MODELS, MOONLIGHT_16B_A3B, MOONLIGHT_MINI, count_params, get_model, read_argument_file, spec_from_megatron_args,
    weights,
)
from muon_megatron.models.megatron_config import megatron_args
from muon_megatron.models.spec import MLASpec, MoESpec


def test_moonlight_counts_are_the_papers_within_1_percent():
    c = count_params(MOONLIGHT_16B_A3B)
    assert abs(c.total - 16.0e9) / 16.0e9 < 0.01
    assert abs(c.matrix_total - 15.29e9) / 15.29e9 < 0.01
    assert abs(c.matrix_active - 2.24e9) / 2.24e9 < 0.01
    assert c.embedding == 2 * 163840 * 2048  # untied


def test_moonlight_has_4992_routed_expert_matrices_of_1408_by_2048_holding_92_percent_of_ns_flops():
    mats = [m for w in weights(MOONLIGHT_16B_A3B) for m in w.matrices()]
    experts = [m for m in mats if m.name.startswith("expert")]
    assert len(experts) == 4992
    assert {tuple(sorted(m.shape)) for m in experts} == {(1408, 2048)}
    total = sum(ns_flops(*m.shape) for m in mats)
    assert abs(total / 1e12 - 590) < 1  # MOONLIGHT.md: about 590 TFLOP per step
    assert 0.91 < sum(ns_flops(*m.shape) for m in experts) / total < 0.93


def test_every_muon_weight_is_tiled_exactly_by_its_logical_matrices():
    for spec in MODELS.values():
        for w in weights(spec):
            if w.use_muon:
                check_tiling(w.matrices(), w.split.view_shape(w.shape), w.name)


def test_embeddings_head_and_norms_go_to_adamw_and_every_matrix_to_muon():
    for w in weights(MOONLIGHT_16B_A3B):
        assert w.use_muon == (w.kind not in ("embedding", "head", "norm")), w.name


def test_mini_keeps_the_family():
    m = MOONLIGHT_MINI
    assert m.first_dense_layers == 1 and m.moe.num_shared_experts >= 1 and m.moe.score_function == "sigmoid"
    assert m.moe.expert_bias and not m.tie_embeddings and m.vocab_size == 256
    assert count_params(m).total < 5e6  # trains on two CPU cores in minutes


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="moonlight-mini"):
        get_model("moonlight-17b")


def test_bad_spec_fields_are_named():
    with pytest.raises(ValueError, match="top_k"):
        MoESpec(num_experts=8, expert_ffn=16, top_k=9)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLASpec(num_heads=2, kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def test_megatron_argument_file_round_trips_the_spec(tmp_path):
    path = tmp_path / "args.sh"
    flags = megatron_args(MOONLIGHT_16B_A3B)
    lines = ["# Moonlight, as a launch script writes it"]
    lines += [" ".join(flags[i : i + 4]) + " \\" for i in range(0, len(flags), 4)]
    lines += ["--tensor-model-parallel-size 2 --expert-model-parallel-size 8  # parallel", "--lr 4.2e-4"]
    path.write_text("\n".join(lines) + "\n")
    spec, parallel = spec_from_megatron_args(read_argument_file(str(path)), name="moonlight-16b-a3b")
    assert spec == MOONLIGHT_16B_A3B
    assert (parallel.tp, parallel.pp, parallel.ep) == (2, None, 8)


def test_megatron_arguments_accept_an_integer_moe_layer_freq_and_refuse_non_mla():
    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "256",
            "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "1"]
    spec, _ = spec_from_megatron_args(base + ["--multi-latent-attention"])
    assert spec.moe_layer_pattern == [1, 1, 1, 1] and spec.first_dense_layers == 0
    with pytest.raises(ValueError, match="multi-latent-attention"):
        spec_from_megatron_args(base)
    with pytest.raises(ValueError, match="not an integer"):
        spec_from_megatron_args(["--multi-latent-attention", "--num-layers", "$LAYERS"])
