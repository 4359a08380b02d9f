"""``muon-megatron plan`` (:mod:`muon_megatron.sizing`): the simulated Megatron layouts fed to the distributed engine's planner."""

from __future__ import annotations

import json

import pytest

from muon_megatron import cli
from muon_megatron.distributed.plan import ns_flops
from muon_megatron.models import MOONLIGHT_16B_A3B, MOONLIGHT_MINI, weights
from muon_megatron.sizing import ParallelConfig, size_model, stage_layers

JSON_KEYS = {
    "total_params", "active_params", "ns_tflop_per_step", "max_rank_ns_tflop", "mean_rank_ns_tflop",
    "optimizer_state_bytes_per_rank", "adamw_optimizer_state_bytes_per_rank", "comm_bytes_per_rank",
}


def _spec_ns_tflop(spec) -> float:
    return sum(ns_flops(*m.shape) for w in weights(spec) for m in w.matrices()) / 1e12


@pytest.fixture(scope="module")
def moonlight_64():
    return size_model(MOONLIGHT_16B_A3B, ParallelConfig(tp=1, pp=1, ep=8, dp=64))


def test_moonlight_on_64_gpus_orthogonalises_all_5207_matrices_once_for_590_tflop(moonlight_64):
    r = moonlight_64
    assert r.matrices == 5207
    assert r.ns_tflop_per_step == pytest.approx(_spec_ns_tflop(MOONLIGHT_16B_A3B), rel=1e-12)
    assert r.mean_rank_ns_tflop * 64 == pytest.approx(r.ns_tflop_per_step, rel=1e-12)


def test_moonlight_on_64_gpus_balances_ns_within_5_percent(moonlight_64):
    assert moonlight_64.max_rank_ns_tflop / moonlight_64.mean_rank_ns_tflop < 1.05


def test_muon_state_is_about_half_of_adamw_and_traffic_at_most_1_25x(moonlight_64):
    r = moonlight_64
    assert 0.5 < r.optimizer_state_bytes_per_rank / r.adamw_optimizer_state_bytes_per_rank < 0.56
    assert 1.0 < r.comm_bytes_per_rank / r.adamw_comm_bytes_per_rank <= 1.25


@pytest.mark.parametrize(
    "par",
    [
        ParallelConfig(tp=2, pp=1, ep=4, dp=2),
        ParallelConfig(tp=1, pp=3, ep=4, dp=8, layout="flat"),
        ParallelConfig(tp=2, pp=2, ep=2, dp=2, etp=2, layout="aligned"),
        ParallelConfig(tp=4, pp=1, ep=8, dp=2, bucket_numel=5000),
    ],
    ids=["tp-ep", "pp-flat", "etp-aligned", "small-buckets"],
)
def test_every_layout_plans_each_mini_matrix_exactly_once(par):
    r = size_model(MOONLIGHT_MINI, par)
    n_matrices = sum(len(w.matrices()) for w in weights(MOONLIGHT_MINI))
    assert r.matrices == n_matrices
    assert r.ns_tflop_per_step == pytest.approx(_spec_ns_tflop(MOONLIGHT_MINI), rel=1e-12)
    assert len(r.per_rank["ns_tflop"]) == par.world_size


def test_one_gpu_sends_nothing_and_holds_the_whole_model():
    r = size_model(MOONLIGHT_MINI, ParallelConfig())
    assert r.comm_bytes_per_rank == 0 and r.adamw_comm_bytes_per_rank == 0
    assert r.params_per_rank == r.total_params
    assert r.max_rank_ns_tflop == r.ns_tflop_per_step


def test_aligned_layout_needs_no_muon_exchange_without_tensor_parallelism():
    r = size_model(MOONLIGHT_MINI, ParallelConfig(ep=2, dp=4, layout="aligned"))
    assert r.muon_exchange_bytes_per_rank == 0


def test_layouts_that_do_not_fit_the_model_name_the_flag():
    with pytest.raises(ValueError, match="--ep 3"):
        size_model(MOONLIGHT_16B_A3B, ParallelConfig(ep=3, dp=3))
    with pytest.raises(ValueError, match="--tp 3"):
        size_model(MOONLIGHT_16B_A3B, ParallelConfig(tp=3))
    with pytest.raises(ValueError, match="expert-parallel group"):
        ParallelConfig(tp=1, ep=8, dp=4)
    with pytest.raises(ValueError, match="--pp 28"):
        size_model(MOONLIGHT_16B_A3B, ParallelConfig(pp=28))


def test_stage_layers_are_contiguous_and_cover_every_layer():
    assert [len(r) for r in stage_layers(27, 4)] == [7, 7, 7, 6]
    assert [len(r) for r in stage_layers(27, 3, first=5)] == [5, 11, 11]
    assert [i for r in stage_layers(27, 4) for i in r] == list(range(27))


def test_cli_json_has_exactly_the_documented_keys(capsys):
    assert cli.main(["plan", "--model", "moonlight-mini", "--tp", "2", "--ep", "2", "--dp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(out)
    assert "per_rank" not in out
    assert out["total_params"] == 1_593_600


def test_cli_reads_model_and_tp_from_a_megatron_argument_file(tmp_path, capsys):
    from muon_megatron.models.megatron_config import megatron_args

    path = tmp_path / "mini.args"
    path.write_text(" ".join(megatron_args(MOONLIGHT_MINI)) + "\n--tensor-model-parallel-size 2\n")
    assert cli.main(["plan", "--megatron-args", str(path), "--dp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["tp"] == 2 and out["total_params"] == 1_593_600


def test_cli_text_report_names_the_layout(capsys):
    assert cli.main(["plan", "--model", "moonlight-mini", "--dp", "2"]) == 0
    text = capsys.readouterr().out
    assert "tp=1 pp=1 ep=1 etp=1 dp=2" in text and "Muon / AdamW" in text


def test_cli_bad_layout_or_model_exits_2_with_a_message(capsys):
    assert cli.main(["plan", "--model", "moonlight-mini", "--ep", "3", "--dp", "3"]) == 2
    assert "--ep 3" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "nope"]) == 2
    assert "known models" in capsys.readouterr().err


def test_plan_is_registered_in_the_muon_megatron_command(capsys):
    from muon_megatron import cli

    if "plan" not in cli.SUBCOMMANDS:
        pytest.skip("muon_megatron.cli has no 'plan' entry yet")
    assert cli.main(["plan", "--model", "moonlight-mini", "--dp", "2", "--json"]) == 0
    assert JSON_KEYS <= set(json.loads(capsys.readouterr().out))
