"""The --muon-* flags: Moonlight defaults, megatron-core's same-meaning flags honoured, bad values
refused at start-up with the flag named. Runs in-process (no model, no process group)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core")

from muon_megatron.megatron import MuonSettings  # noqa: E402
from muon_megatron.megatron.arguments import add_muon_arguments, default_notes, muon_settings_from_args  # noqa: E402


def _megatron_parser():
    training_arguments = pytest.importorskip("megatron.training.arguments")
    return training_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def _plain_parser():
    return add_muon_arguments(argparse.ArgumentParser(allow_abbrev=False))


@pytest.mark.parametrize("make", [_plain_parser, lambda: add_muon_arguments(_megatron_parser())])
def test_defaults_are_moonlight(make):
    settings = muon_settings_from_args(make().parse_args([]))
    assert settings == MuonSettings()
    assert (settings.momentum, settings.nesterov, settings.ns_steps) == (0.95, True, 5)
    assert (settings.ns_coefficients, settings.update_scale, settings.ns_dtype) == ("moonlight", "moonlight", "bfloat16")


def test_megatron_core_defaults_replaced_are_logged_once():
    parser = add_muon_arguments(_megatron_parser())
    notes = default_notes()
    assert any(n.startswith("--muon-momentum: megatron-core's default is 0.9") for n in notes)
    assert any(n.startswith("--muon-nesterov:") for n in notes)
    assert any(n.startswith("--muon-tp-mode:") for n in notes)
    assert parser.parse_args([]).muon_momentum == 0.95


def test_megatron_core_flags_are_honoured():
    parser = add_muon_arguments(_megatron_parser())
    args = parser.parse_args(
        ["--muon-momentum", "0.9", "--muon-no-split-qkv", "--muon-num-ns-steps", "6", "--muon-tp-mode", "duplicated"]
    )
    settings = muon_settings_from_args(args)
    assert (settings.momentum, settings.split_qkv, settings.ns_steps) == (0.9, False, 6)


@pytest.mark.parametrize("make", [_plain_parser, lambda: add_muon_arguments(_megatron_parser())])
def test_our_flags_parse(make):
    args = make().parse_args(
        ["--muon-no-nesterov", "--muon-ns-dtype", "float32", "--muon-scale-mode", "keller", "--muon-no-split-fc1",
         "--muon-adamw-params", "*router*", "*linear_proj*", "--muon-coefficient-type", "polar_express"]
    )
    s = muon_settings_from_args(args)
    assert (s.nesterov, s.ns_dtype, s.update_scale, s.split_fc1) == (False, "float32", "keller", False)
    assert s.adamw_params == ("*router*", "*linear_proj*") and s.ns_coefficients == "polar_express"
    assert s.ns_backend == "auto"
    s = muon_settings_from_args(make().parse_args(["--muon-ns-backend", "triton_symmetric"]))
    assert s.ns_backend == "triton_symmetric"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--muon-coefficient-type", "quintic"], "--muon-coefficient-type"),
        (["--muon-momentum", "1.5"], "--muon-momentum"),
        (["--muon-num-ns-steps", "0"], "--muon-num-ns-steps"),
        (["--muon-extra-scale-factor", "2"], "--muon-extra-scale-factor"),
        (["--muon-tp-mode", "blockwise"], "--muon-tp-mode"),
        (["--muon-scale-mode", "unit_rms_norm"], "--muon-scale-mode"),
        (["--muon-ns-backend", "cublas"], "--muon-ns-backend"),
    ],
)
def test_bad_values_name_the_flag(argv, flag):
    parser = add_muon_arguments(_megatron_parser())
    with pytest.raises(ValueError, match=flag):
        muon_settings_from_args(parser.parse_args(argv))


def test_unknown_choice_is_refused_by_argparse():
    with pytest.raises(SystemExit):
        _plain_parser().parse_args(["--muon-ns-dtype", "int8"])


def test_adding_twice_is_harmless():
    parser = _plain_parser()
    assert add_muon_arguments(parser) is parser
