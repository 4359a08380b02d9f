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


@pytest.mark.parametrize("key, hint", [("muon_lr", "lr"), ("adam_lr", "lr"), ("ns_method", "ns_coefficients")])
def test_builtin_muon_keys_are_refused_with_our_spelling(key, hint):
    with pytest.raises(ValueError, match=f"optimizer.params.{key} is a key of DeepSpeed's built-in Muon.*{hint}"):
        MuonConfig.from_params({key: 1})


def test_betas_and_eps_are_the_adamw_betas_and_eps():
    c = MuonConfig.from_params({"betas": [0.8, 0.9], "eps": 1e-6})
    assert (c.adamw_betas, c.adamw_eps) == ((0.8, 0.9), 1e-6)
    with pytest.raises(ValueError, match="both betas and adamw_betas"):
        MuonConfig.from_params({"betas": [0.8, 0.9], "adamw_betas": [0.8, 0.9]})
    with pytest.raises(ValueError, match=r"optimizer.params.betas=\[0.8, 1.5\]"):
        MuonConfig.from_params({"betas": [0.8, 1.5]})


@pytest.mark.parametrize("key", ["lr", "weight_decay", "betas", "eps", "momentum"])
def test_unfilled_auto_is_refused_naming_the_key(key):
    with pytest.raises(ValueError, match=f'optimizer.params.{key} is "auto", which nothing filled in'):
        MuonConfig.from_params({key: "auto"})


def test_auto_is_a_value_of_ns_backend():
    assert MuonConfig.from_params({"ns_backend": "auto"}).ns_backend == "auto"


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


class _TensorParallelMpu:
    """An mpu that reports tensor parallelism of 2 (nothing else is asked before the refusal)."""

    def get_tensor_model_parallel_world_size(self):
        return 2

    def get_tensor_model_parallel_rank(self):
        return 0

    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank


def test_zero3_with_tensor_parallelism_fails_at_initialize_naming_the_stage():
    with pytest.raises(ValueError, match="zero_optimization.stage 3 with tensor parallelism"):
        mmds.initialize(model=make_model(), config=muon_config(3), mpu=_TensorParallelMpu())


def test_zero3_and_cpu_offload_pass_the_config_check_and_let_deepspeed_take_our_optimizer():
    ds, muon = split_config(muon_config(3))
    assert muon is not None and ds["zero_allow_untested_optimizer"] is True
    assert "zero_force_ds_cpu_optimizer" not in ds
    for stage in (1, 2, 3):
        cfg = muon_config(stage)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds, _ = split_config(cfg)
        # without it DeepSpeed refuses any client optimizer but its CPU Adam under offload
        assert ds["zero_force_ds_cpu_optimizer"] is False
    cfg = muon_config(3)
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    split_config(cfg)


@pytest.mark.parametrize("stage, section, needle", [
    (2, {"offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "zero_optimization.offload_optimizer.device 'nvme'"),
    (3, {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}, "zero_optimization.offload_optimizer.ratio 0.5"),
    (3, {"offload_optimizer": {"device": "cpu", "super_offload": True}}, "offload_optimizer.super_offload"),
    (0, {"offload_optimizer": {"device": "cpu"}}, "offload_optimizer needs zero_optimization.stage 1, 2 or 3"),
    (2, {"offload_param": {"device": "cpu"}}, "zero_optimization.offload_param .* at zero_optimization.stage 3 only"),
    (3, {"offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "zero_optimization.offload_param \\(device 'nvme'\\)"),
    (3, {"mics_shard_size": 2}, "zero_optimization.mics_shard_size"),
    (1, {"elastic_checkpoint": True}, "zero_optimization.elastic_checkpoint"),
])
def test_unsupported_zero_settings_fail_at_initialize_naming_the_key(stage, section, needle):
    cfg = muon_config(stage)
    cfg["zero_optimization"].update(section)
    with pytest.raises(ValueError, match=needle):
        mmds.initialize(model=make_model(), config=cfg)


def test_forcing_deepspeeds_cpu_adam_under_offload_is_refused_naming_the_key():
    cfg = muon_config(2)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    cfg["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer is true"):
        mmds.initialize(model=make_model(), config=cfg)


def test_partitioned_parameters_are_routed_by_ds_shape():
    """Parameters partitioned by ZeRO-3 hold 1-D placeholders and keep their shape in ds_shape (set
    by hand here; the engine tests build a model under deepspeed.zero.Init): routing reads ds_shape,
    keeps Moonlight's rule (embedding and head on AdamW) and a shared parameter once."""
    model = make_model()
    model.lm_head.weight = model.embed.weight  # tied, as many models are
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    groups = mmds.build_param_groups(model, MuonConfig.from_params({}))
    muon = {n: p for g in groups if g["use_muon"] for n, p in zip(g["names"], g["params"])}
    adamw = [n for g in groups if not g["use_muon"] for n in g["names"]]
    assert sorted(muon) == ["fc1.weight", "fc2.weight", "proj.weight"]
    assert muon["fc1.weight"] is model.fc1.weight  # the model's own parameters, not stand-ins
    assert "embed.weight" in adamw and "lm_head.weight" not in adamw  # tied: listed once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


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


def test_newton_schulz_on_another_device_than_the_tensors_gives_the_same_step():
    """Optimizer offload keeps the tensors on the CPU and runs Newton-Schulz where ``ns_device`` says
    (the accelerator): the inputs travel in the NS dtype, to which the exchange casts them anyway,
    and the results come back to the tensors' device. On the CPU (``ns_device="cpu"``) that path
    must give bitwise the step of the plain one, here with bf16 Newton-Schulz over two steps."""
    from muon_megatron.distributed import DistributedMuon, ParamLayout

    torch.manual_seed(0)
    weight, grads = torch.randn(24, 16), [torch.randn(24, 16) for _ in range(2)]
    results = []
    for ns_device in (None, "cpu"):
        p = weight.clone()
        opt = DistributedMuon([{"params": [p], "layouts": [ParamLayout("w", (24, 16))]}], lr=1e-2,
                              ns_dtype=torch.bfloat16, ns_device=ns_device)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p)
    assert not torch.equal(results[0], weight)
    assert torch.equal(results[0], results[1])


def test_builtin_muon_kept_by_the_config_is_said_in_one_line():
    from muon_megatron.deepspeed.activation import builtin_muon_notice

    kept = muon_config(1, implementation="deepspeed")
    line = builtin_muon_notice(kept)
    assert "\n" not in line and "implementation" in line and "built-in" in line and "Keller" in line
    assert builtin_muon_notice(muon_config(1)) is None
    assert builtin_muon_notice({"optimizer": {"type": "AdamW", "params": {}}}) is None
