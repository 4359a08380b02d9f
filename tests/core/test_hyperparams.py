"""Muon's hyper-parameters: one set of defaults (Moonlight's), one validation, messages in the
caller's spelling."""

from __future__ import annotations

import re

import pytest
import torch

from muon_megatron import Muon, MuonHyperparams, check_hyperparameters
from muon_megatron.core.hyperparams import HYPERPARAMETERS
from muon_megatron.distributed import DistributedMuon, ParamLayout


def test_defaults_are_moonlights():
    h = MuonHyperparams()
    assert (h.lr, h.momentum, h.nesterov, h.weight_decay) == (4.2e-4, 0.95, True, 0.1)
    assert (h.ns_steps, h.ns_coefficients, h.ns_dtype, h.update_scale) == (5, "moonlight", torch.bfloat16, "moonlight")
    assert (h.adamw_betas, h.adamw_eps) == ((0.9, 0.95), 1e-8)


@pytest.mark.parametrize("make", [
    lambda p: Muon([p]),
    lambda p: DistributedMuon([{"params": [p], "layouts": [ParamLayout("w", tuple(p.shape))]}]),
])
def test_every_optimizer_takes_its_defaults_from_the_one_object(make):
    opt = make(torch.nn.Parameter(torch.zeros(4, 6)))
    assert {k: opt.defaults[k] for k in HYPERPARAMETERS} == MuonHyperparams().as_dict()
    assert {k: opt.param_groups[0][k] for k in HYPERPARAMETERS} == MuonHyperparams().as_dict()


@pytest.mark.parametrize("key, value, rule", [
    ("lr", -1.0, "must be a number >= 0"),
    ("lr", "auto", "must be a number >= 0"),
    ("momentum", 1.0, r"must be a number in \[0, 1\)"),
    ("weight_decay", -0.5, "must be a number >= 0"),
    ("adamw_eps", 0.0, "must be a number > 0"),
    ("adamw_betas", (0.9,), r"must be two numbers in \[0, 1\)"),
    ("adamw_betas", "0.9,0.95", r"must be two numbers in \[0, 1\)"),
    ("nesterov", "yes", "must be true or false"),
    ("ns_steps", 0, "must be a positive integer"),
    ("ns_steps", True, "must be a positive integer"),
])
def test_a_bad_value_is_named_in_the_callers_spelling(key, value, rule):
    with pytest.raises(ValueError, match="^" + re.escape(f"--my-{key}={value!r}: ") + rule):
        check_hyperparameters({key: value}, spelling={key: f"--my-{key}"})
    with pytest.raises(ValueError, match=rule):
        MuonHyperparams(**{key: value})


@pytest.mark.parametrize("key, value, needle", [
    ("ns_coefficients", "quintic", "unknown ns_coefficients 'quintic'"),
    ("ns_dtype", "int8", "unknown ns_dtype 'int8'"),
    ("update_scale", "adam", "unknown update_scale 'adam'"),
])
def test_named_choices_list_the_valid_names_after_the_callers_spelling(key, value, needle):
    with pytest.raises(ValueError, match=f"^optimizer.params.{key}: {needle}; valid names"):
        check_hyperparameters({key: value}, spelling={key: f"optimizer.params.{key}"})


def test_values_come_back_normalised():
    out = check_hyperparameters({"ns_dtype": "float32", "adamw_betas": [0.8, 0.9], "lr": 1e-3, "other": object()})
    assert out == {"ns_dtype": torch.float32, "adamw_betas": (0.8, 0.9), "lr": 1e-3}


def test_param_group_values_are_validated_too():
    with pytest.raises(ValueError, match="momentum=1.5"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "momentum": 1.5}])
