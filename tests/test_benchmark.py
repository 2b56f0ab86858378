"""`actsparse bench`: the bytes-per-token ceiling against its definition, and the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from actsparse.benchmark import weight_bytes_per_token
from helpers import run_cli, run_converter


@pytest.fixture(scope="module")
def sparse_model(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "smol.sparse.gguf"
    run_converter(
        small_model_path, "-o", out, "--calib-tokens", 1024, "--sparsity", "0.5,0.7", "-q", check=True
    )
    return out


def test_weight_bytes_follow_the_definition(sparse_model: Path) -> None:
    t = {x.name: x.n_bytes for x in GGUFReader(sparse_model).tensors}
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    per_layer = {k: sum(n for name, n in t.items() if name.endswith(f".{k}.weight")) for k in kinds}
    output = t.get("output.weight", t["token_embd.weight"])  # SmolLM2 ties the output to token_embd
    dense = sum(per_layer.values()) + output
    assert weight_bytes_per_token(sparse_model) == pytest.approx(dense)
    copies = {k: sum(n for name, n in t.items() if name.endswith(f".{k}_t.weight")) for k in kinds}
    s_ffn, s_q, s_o = 0.5, 0.4, 0.3
    sparse = (
        dense
        - per_layer["ffn_up"] * s_ffn
        - per_layer["ffn_down"] + (1 - s_ffn) * copies["ffn_down"]
        - per_layer["attn_q"] + (1 - s_q) * copies["attn_q"]
        - per_layer["attn_output"] + (1 - s_o) * copies["attn_output"]
    )  # fmt: skip
    assert weight_bytes_per_token(sparse_model, s_ffn, s_q, s_o) == pytest.approx(sparse)


def test_bench_reports_json_and_png(sparse_model: Path, tmp_path: Path) -> None:
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_cli("bench", sparse_model, "--repeats", 1, "-p", 32, "-n", 8, "--json", js, "--png", png)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(js.read_text())
    assert [e["level"] for e in report["levels"]] == [0.0, 0.5, 0.7]
    assert report["machine"]["cores"] >= 1 and report["machine"]["read_bandwidth_gbs"] > 0
    for e in report["levels"]:
        assert e["decode_median"] > 0 and e["prefill_median"] > 0 and e["peak_rss_mb"] > 0
    for e in report["levels"][1:]:
        assert abs(e["realized"]["ffn"] - e["level"]) < 0.15
        assert e["ceiling"] > 1.0
    assert png.stat().st_size > 1000
    assert "ceiling" in proc.stdout


def test_bench_refuses_unknown_levels_and_dense_models(sparse_model: Path, small_model_path: Path) -> None:
    proc = run_cli("bench", sparse_model, "--levels", "0.45")
    assert proc.returncode == 2 and "available" in proc.stderr
    proc = run_cli("bench", small_model_path)
    assert proc.returncode == 2 and "convert_with_thresholds.py" in proc.stderr
