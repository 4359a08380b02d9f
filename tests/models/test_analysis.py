"""``muon-megatron analyze``: SVD entropy of weight matrices from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from muon_megatron import cli, analysis


def test_svd_entropy_is_one_for_an_orthogonal_matrix_and_zero_for_rank_one():
    Q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    assert analysis.svd_entropy(Q[:16]) == pytest.approx(1.0, abs=1e-12)
    u, v = torch.randn(16, 1), torch.randn(1, 24)
    assert analysis.svd_entropy(u @ v) == pytest.approx(0.0, abs=1e-6)


def test_groups_strip_layer_and_expert_indices_and_skip_embeddings_head_and_norms():
    state = {
        "embedding.word_embeddings.weight": torch.randn(64, 8),
        "output_layer.weight": torch.randn(64, 8),
        "decoder.layers.0.input_layernorm.weight": torch.ones(8),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(8, 8),
        "decoder.layers.1.self_attention.linear_proj.weight": torch.randn(8, 8),
        "layers.1.mlp.gate_proj": torch.randn(4, 6, 8),  # a stack of 4 experts
    }
    out = analysis.analyze_state_dict(state)
    assert set(out) == {"decoder.layers.*.self_attention.linear_proj.weight", "layers.*.mlp.gate_proj"}
    assert out["decoder.layers.*.self_attention.linear_proj.weight"]["matrices"] == 2
    assert out["layers.*.mlp.gate_proj"]["matrices"] == 4


def test_cli_reads_nested_checkpoints_prints_and_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    low = {"layers.0.w": torch.randn(16, 1) @ torch.randn(1, 16) + 0.01 * torch.randn(16, 16)}
    high = {"layers.0.w": torch.linalg.qr(torch.randn(16, 16))[0]}
    torch.save({"model": low}, tmp_path / "a.pt")
    torch.save({"state_dict": high}, tmp_path / "b.pt")
    status = cli.main(["analyze", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--labels", "adamw", "muon",
                            "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert status == 0
    assert "layers.*.w" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["muon"]["layers.*.w"]["mean"] > result["adamw"]["layers.*.w"]["mean"]
    assert (tmp_path / "e.png").stat().st_size > 0


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
