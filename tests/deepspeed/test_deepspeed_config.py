"""The ``optimizer`` section and the settings refused at initialize (no processes needed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

import muon_megatron.deepspeed as mmds  # noqa: E402
from muon_megatron.deepspeed.config import MuonConfig, split_config  # noqa: E402
from muon_megatron.deepspeed.optimizer import DeepSpeedMuon, ForeignOptimizerStateError  # noqa: E402
from _model import make_model  # noqa: E402


def muon_config(stage=1, **params):
    return {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "muon", "params": params},
            "zero_optimization": {"stage": stage}}


def test_defaults_are_moonlight():
    c = MuonConfig.from_params({})
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay) == (4.2e-4, 0.95, True, 0.1)
    assert (c.ns_steps, c.ns_coefficients, c.ns_dtype, c.update_scale) == (5, "moonlight", "bfloat16", "moonlight")
    assert (c.adamw_betas, c.adamw_eps) == ((0.9, 0.95), 1e-8)


def test_split_config_removes_optimizer_and_allows_client_optimizer_under_zero():
    ds, muon = split_config(muon_config(1, lr=1e-3, adamw=["*norm*"]))
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    assert muon.lr == 1e-3 and muon.adamw == ("*norm*",)


def test_other_optimizers_and_the_builtin_switch_pass_through_untouched():
    ds, muon = split_config({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}})
    assert muon is None and ds["optimizer"]["type"] == "AdamW"
    ds, muon = split_config(muon_config(1, lr=1.0, implementation="deepspeed"))
    assert muon is None and ds["optimizer"] == {"type": "muon", "params": {"lr": 1.0}}


@pytest.mark.parametrize("key, hint", [("betas", "adamw_betas"), ("eps", "adamw_eps"), ("ns_method", "ns_coefficients")])
def test_builtin_muon_keys_are_refused_with_our_spelling(key, hint):
    with pytest.raises(ValueError, match=hint):
        MuonConfig.from_params({key: 1})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys"):
        MuonConfig.from_params({"learning_rate": 1e-3})


@pytest.mark.parametrize("params, needle", [({"momentum": 1.0}, "momentum"), ({"ns_dtype": "int8"}, "ns_dtype"),
                                            ({"update_scale": "huge"}, "update_scale"),
                                            ({"adamw_betas": [0.9]}, "adamw_betas"),
                                            ({"ns_backend": "cublas"}, "ns_backend 'cublas'.*triton_symmetric")])
def test_bad_values_name_the_parameter(params, needle):
    with pytest.raises(ValueError, match=needle):
        MuonConfig.from_params(params)


def test_zero3_fails_at_initialize_with_the_fix():
    with pytest.raises(ValueError, match="stage 0, 1 and 2"):
        mmds.initialize(model=make_model(), config=muon_config(3))


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_offload_fails_at_initialize_with_the_fix(key):
    cfg = muon_config(2)
    cfg["zero_optimization"][key] = {"device": "cpu"}
    with pytest.raises(ValueError, match=f"zero_optimization.{key}"):
        mmds.initialize(model=make_model(), config=cfg)


def test_client_optimizer_and_muon_config_together_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="both optimizer="):
        mmds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=muon_config(1))


def test_param_groups_follow_moonlight_routing():
    groups = mmds.build_param_groups(make_model(), MuonConfig.from_params({}))
    muon = [n for g in groups if g["use_muon"] for n in g["names"]]
    adamw = [n for g in groups if not g["use_muon"] for n in g["names"]]
    assert sorted(muon) == ["fc1.weight", "fc2.weight", "proj.weight"]
    assert "embed.weight" in adamw and "lm_head.weight" in adamw and "norm.weight" in adamw


def test_adamw_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        mmds.build_param_groups(make_model(), MuonConfig.from_params({"adamw": ["*nothing*"]}))


def test_model_tagged_for_the_builtin_muon_is_refused():
    model = make_model()
    model.fc1.weight.use_muon = True
    with pytest.raises(ValueError, match="use_muon"):
        mmds.initialize(model=model, config=muon_config(1))


def test_state_of_deepspeed_builtin_muon_is_named_in_the_error():
    opt = DeepSpeedMuon(mmds.build_param_groups(make_model(), MuonConfig.from_params({})), MuonConfig.from_params({}))
    builtin = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"use_muon": True, "params": [0]}]}
    with pytest.raises(ForeignOptimizerStateError, match="built-in Muon"):
        opt.load_state_dict(builtin)


def test_step_before_bind_says_how_to_create_the_engine():
    opt = DeepSpeedMuon(mmds.build_param_groups(make_model(), MuonConfig.from_params({})), MuonConfig.from_params({}))
    with pytest.raises(RuntimeError, match="muon_megatron.deepspeed.initialize"):
        opt.step()


def test_universal_conversion_of_a_folder_without_zero_files_says_what_it_needs(tmp_path):
    from muon_megatron.deepspeed.universal import convert_to_universal

    with pytest.raises(FileNotFoundError, match="optim_states"):
        convert_to_universal(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["auto", "torch", "torch_reference"])
def test_ns_backend_selects_the_newton_schulz_implementation(name):
    from muon_megatron.kernels import AutoOrthogonalizer

    config = MuonConfig.from_params({"ns_backend": name})
    opt = DeepSpeedMuon(mmds.build_param_groups(make_model(), config), config)
    if name == "auto":
        assert isinstance(opt._orthogonalize, AutoOrthogonalizer)
    elif name == "torch":
        assert opt._orthogonalize is None  # DistributedMuon's default, the core's batched path
    else:
        assert opt._orthogonalize.backend == name
