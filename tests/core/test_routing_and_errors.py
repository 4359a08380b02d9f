"""Routing (one rule, every parameter once, overrides) and every ValueError the core promises."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import pytest
import torch

from muon_megatron import (
    NS_COEFFICIENTS,
    UPDATE_SCALES,
    Block,
    ExpertStack,
    FusedQKV,
    GateUp,
    LogicalMatrix,
    Muon,
    SplitSpec,
    Whole,
    is_muon_parameter,
    muon_param_groups,
    route_parameters,
    update_scale,
)


class MoEBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 16)
        self.input_layernorm = torch.nn.LayerNorm(16)
        self.qkv = torch.nn.Linear(16, 2 * (2 + 2) * 4, bias=True)
        self.proj = torch.nn.Linear(16, 16, bias=False)
        self.router = torch.nn.Linear(16, 4, bias=False)
        self.experts_fc1 = torch.nn.Parameter(torch.randn(4, 2 * 8, 16))
        self.experts_fc2 = torch.nn.Parameter(torch.randn(4, 16, 8))
        self.frozen = torch.nn.Parameter(torch.randn(16, 16), requires_grad=False)
        self.output_layer = torch.nn.Linear(16, 50, bias=False)


def group_of(groups, name):
    hits = [g for g in groups if name in g["names"]]
    assert len(hits) == 1, name
    return hits[0]


# --- routing -------------------------------------------------------------------------------------


def test_moonlight_routing_assigns_every_trainable_parameter_once():
    model = MoEBlock()
    groups = muon_param_groups(model, splits={"qkv.weight": FusedQKV(2, 2, 4), "experts_fc1": ExpertStack(4, inner=GateUp())})
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)  # each once, frozen ones left out
    for g in groups:
        assert len(g["names"]) == len(g["params"])
    muon = {n for g in groups if g["use_muon"] for n in g["names"]}
    assert muon == {"qkv.weight", "proj.weight", "router.weight", "experts_fc1", "experts_fc2"}
    assert group_of(groups, "qkv.weight")["split"] == FusedQKV(2, 2, 4)
    assert group_of(groups, "experts_fc1")["split"] == ExpertStack(4, inner=GateUp())
    assert group_of(groups, "experts_fc2")["split"] == ExpertStack(4)  # 3-D default
    assert group_of(groups, "proj.weight")["split"] == Whole()
    Muon(groups, lr=1e-3)  # and the optimizer accepts them


def test_user_overrides_route_by_name():
    model = MoEBlock()
    groups = muon_param_groups(model, adamw=["router.*"], muon=["embed_tokens.weight"])
    assert not group_of(groups, "router.weight")["use_muon"]
    assert group_of(groups, "embed_tokens.weight")["use_muon"]


def test_adamw_pattern_wins_over_muon_pattern():
    model = MoEBlock()
    routes = route_parameters(model.named_parameters(), adamw=["proj.*"], muon=["proj.weight"])
    assert routes["proj.weight"] is False


def test_is_muon_parameter_is_the_rule():
    assert is_muon_parameter("layers.0.mlp.fc1.weight", torch.empty(4, 4))
    assert is_muon_parameter("experts", torch.empty(2, 4, 4))
    assert not is_muon_parameter("layers.0.norm.weight", torch.empty(4))
    assert not is_muon_parameter("model.embed_tokens.weight", torch.empty(4, 4))
    assert not is_muon_parameter("lm_head.weight", torch.empty(4, 4))
    assert not is_muon_parameter("output_layer.weight", torch.empty(4, 4))
    assert not is_muon_parameter("anything", torch.empty(4, 4), is_embedding_or_head=True)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_routing_pattern_matching_nothing_raises(kind):
    with pytest.raises(ValueError, match=rf"{kind} pattern 'nope\.\*' matches no trainable parameter"):
        muon_param_groups(MoEBlock(), **{kind: ["nope.*"]})


def test_routing_pattern_matching_only_frozen_parameter_raises():
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        muon_param_groups(MoEBlock(), adamw=["frozen"])


def test_split_pattern_matching_nothing_raises():
    with pytest.raises(ValueError, match="split pattern 'nope' matches no trainable parameter"):
        muon_param_groups(MoEBlock(), splits={"nope": GateUp()})


def test_second_split_pattern_matching_an_already_split_parameter_counts_as_used():
    """Regression: a second pattern matching a parameter another pattern already split was reported
    as matching nothing."""
    spec = FusedQKV(2, 2, 4)
    groups = muon_param_groups(MoEBlock(), splits={"qkv.weight": spec, "qkv.w*": spec})
    (group,) = [g for g in groups if g.get("split") == spec]
    assert group["names"] == ["qkv.weight"]


def test_split_patterns_giving_one_parameter_different_specs_raise():
    with pytest.raises(ValueError, match=r"split patterns \['qkv.weight', 'qkv.w\*'\] all match 'qkv.weight'"):
        muon_param_groups(MoEBlock(), splits={"qkv.weight": FusedQKV(2, 2, 4), "qkv.w*": GateUp()})


def test_split_on_adamw_parameter_raises():
    with pytest.raises(ValueError, match="routed to AdamW"):
        muon_param_groups(MoEBlock(), splits={"output_layer.weight": GateUp()})


# --- logical matrices that are not 2-D ----------------------------------------------------------


def test_bias_forced_onto_muon_names_it_and_says_route_to_adamw():
    with pytest.raises(ValueError) as err:
        muon_param_groups(MoEBlock(), muon=["qkv.bias"])
    message = str(err.value)
    assert "'qkv.bias'" in message and "AdamW" in message and "adamw=['qkv.bias']" in message


def test_bias_in_a_hand_made_muon_group_names_it_and_says_route_to_adamw():
    bias = torch.nn.Parameter(torch.zeros(32))
    with pytest.raises(ValueError) as err:
        Muon([{"params": [bias], "names": ["qkv.bias"]}], lr=1e-3)
    message = str(err.value)
    assert "'qkv.bias'" in message and "AdamW" in message and "use_muon=False" in message


def test_one_dim_tensor_in_unnamed_muon_group_raises_with_shape():
    with pytest.raises(ValueError, match=r"shape \(8,\).*Route it to AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(8))], lr=1e-3)


def test_four_dim_tensor_without_split_raises():
    with pytest.raises(ValueError, match=r"'conv\.weight'.*no default split.*Route it to AdamW"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 3, 4, 4))], "names": ["conv.weight"]}], lr=1e-3)


def test_whole_split_on_3d_tensor_raises():
    with pytest.raises(ValueError, match=r"'e'.*Whole needs a 2-D parameter"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 4, 4))], "names": ["e"], "split": Whole()}], lr=1e-3)


# --- bad splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,split,message",
    [
        ((30, 16), FusedQKV(2, 2, 4), r"FusedQKV.*expects 32 rows, the parameter has 30"),
        ((15, 16), GateUp(), r"not divisible by 2"),
        ((12, 12), GateUp(num_shards=4), r"not divisible by 8"),
        ((3, 4, 4), ExpertStack(4), r"stacks 3 experts"),
        ((8, 10), ExpertStack(3, layout="columns"), r"10 columns do not divide into 3 experts"),
        ((12, 4), ExpertStack(2), r"needs expert_shape"),
        ((12, 4), ExpertStack(2, expert_shape=(5, 4)), r"do not fill"),
        ((2, 10, 16), ExpertStack(2, inner=FusedQKV(2, 2, 4)), r"expects 32 rows"),
    ],
)
def test_bad_split_for_shape_raises_naming_parameter(shape, split, message):
    with pytest.raises(ValueError, match=rf"'w'.*{message}"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(shape))], "names": ["w"], "split": split}], lr=1e-3)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: FusedQKV(0, 2, 4), "num_query_groups must be >= 1"),
        (lambda: GateUp(num_shards=0), "num_shards >= 1"),
        (lambda: GateUp(axis=2), "axis 0 or 1"),
        (lambda: ExpertStack(0), "num_experts must be >= 1"),
        (lambda: ExpertStack(2, layout="rows"), "'stacked' or 'columns'"),
    ],
)
def test_bad_split_arguments_raise_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@dataclass(frozen=True)
class _Overlapping(SplitSpec):
    """A hand-written spec whose two matrices claim the same rows."""

    def matrices(self, shape):
        R, C = self.view_shape(shape)
        return (LogicalMatrix("a", (R, C), (Block(0, 0, 0, 0, R, C),)),
                LogicalMatrix("b", (R, C), (Block(0, 0, 0, 0, R, C),)))


@dataclass(frozen=True)
class _Gappy(SplitSpec):
    """A hand-written spec leaving the last row to no matrix."""

    def matrices(self, shape):
        R, C = self.view_shape(shape)
        return (LogicalMatrix("a", (R - 1, C), (Block(0, 0, 0, 0, R - 1, C),)),)


@pytest.mark.parametrize("split,message", [(_Overlapping(), "covers 128 of the parameter's 64"),
                                           (_Gappy(), "covers 56 of the parameter's 64")])
def test_split_that_does_not_tile_parameter_raises(split, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "names": ["w"], "split": split}], lr=1e-3)


def test_split_that_is_not_a_split_spec_raises():
    with pytest.raises((ValueError, AttributeError)):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "split": "gate_up"}], lr=1e-3)


def test_split_on_adamw_group_raises():
    with pytest.raises(ValueError, match="cannot carry a 'split'"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "use_muon": False, "split": GateUp()}], lr=1e-3)


# --- names of coefficient sets, scales, dtypes; hyper-parameters ---------------------------------


def test_optimizer_with_unknown_coefficient_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_coefficients="quintic")
    assert all(repr(name) in str(err.value) for name in NS_COEFFICIENTS)


def test_unknown_coefficient_name_in_a_group_raises():
    with pytest.raises(ValueError, match="valid names"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "ns_coefficients": "cubic"}], lr=1e-3)


def test_unknown_update_scale_lists_valid_names():
    with pytest.raises(ValueError) as err:
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, update_scale="adam")
    assert all(repr(name) in str(err.value) for name in UPDATE_SCALES)
    with pytest.raises(ValueError, match="valid names"):
        update_scale("adam", 4, 4)


def test_unknown_ns_dtype_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown ns_dtype 'float8'.*'bfloat16'"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_dtype="float8")


def test_ns_dtype_by_name_is_accepted():
    opt = Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_dtype="float32")
    assert opt.param_groups[0]["ns_dtype"] is torch.float32


@pytest.mark.parametrize("kwargs,name", [({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                                         ({"weight_decay": -0.1}, "weight_decay"), ({"adamw_eps": 0.0}, "adamw_eps"),
                                         ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"), ({"ns_steps": 0}, "ns_steps"),
                                         ({"nonfinite": "ignore"}, "nonfinite")])
def test_bad_hyperparameter_raises_naming_it(kwargs, name):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_names_list_of_wrong_length_raises():
    with pytest.raises(ValueError, match="one name per parameter"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "names": ["a", "b"]}], lr=1e-3)


def test_update_scale_values():
    assert update_scale("moonlight", 1408, 2048) == pytest.approx(0.2 * 2048**0.5)
    assert update_scale("keller", 2048, 1408) == pytest.approx((2048 / 1408) ** 0.5)
    assert update_scale("keller", 1408, 2048) == 1.0
    assert update_scale("spectral", 1408, 2048) == pytest.approx((1408 / 2048) ** 0.5)
    assert update_scale("none", 3, 5) == 1.0


def test_default_patterns_are_fnmatch_style():
    """Guard for the routing docs: patterns are fnmatch (shell) patterns on the full name."""
    assert fnmatch.fnmatchcase("decoder.layers.0.mlp.router.weight", "*router*")
