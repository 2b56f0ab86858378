"""`actsparse bench`: the bytes-per-token ceiling against its definition, and the command's output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse.benchmark import decode_reads, split_bytes, weight_bytes_per_token, weight_bytes_read
from helpers import run_cli

# realized sparsity per kind (the runtime's names)
REALIZED = {"ffn": 0.72, "attn_q_in": 0.66, "attn_o_in": 0.3}


@pytest.fixture(scope="module")
def sparse_model(small_sparse_model: Path) -> Path:
    """The session's default conversion (levels 0.3 .. 0.7; Q8_0 copies for this Q4_1 model)."""
    return small_sparse_model


def test_weight_bytes_follow_the_definition(sparse_model: Path) -> None:
    t = {x.name: x.n_bytes for x in GGUFReader(sparse_model).tensors}
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    per_layer = {k: sum(n for name, n in t.items() if name.endswith(f".{k}.weight")) for k in kinds}
    output = t.get("output.weight", t["token_embd.weight"])  # SmolLM2 ties the output to token_embd
    dense = sum(per_layer.values()) + output
    assert weight_bytes_per_token(sparse_model) == pytest.approx(dense)
    # Realized sparsity per kind; the target level decides, per tensor, whether the runtime reads the
    # transposed copy ((1 - level) of its bytes at most 0.8 of the original's) or the original.
    realized = {"ffn_up": 0.72, "ffn_down": 0.72, "attn_q": 0.66, "attn_output": 0.3}
    for level in (0.7, 0.3):
        expected = dense
        for name, n in t.items():
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            s = realized.get(kind)
            if s is None or not name.endswith(".weight"):
                continue
            if kind == "ffn_up":
                expected -= s * n
                continue
            copy = t[name.replace(f".{kind}.", f".{kind}_t.")]
            if (1 - level) * copy <= 0.8 * n:
                expected += (1 - s) * copy - n
        got = weight_bytes_per_token(sparse_model, REALIZED, level=level)
        assert got == pytest.approx(expected), level
        streamed, gathered = weight_bytes_read(sparse_model, REALIZED, level=level)
        assert streamed + gathered == pytest.approx(got) and gathered > 0
    assert weight_bytes_read(sparse_model) == (pytest.approx(dense), 0.0)
    # At 0.7 the Q8_0 copies of this Q4_1 model are read; at 0.3 only the up rows shrink.
    assert weight_bytes_per_token(sparse_model, REALIZED, level=0.7) < weight_bytes_per_token(
        sparse_model, REALIZED, level=0.3
    )


def test_gathered_reads_follow_each_channel_s_activity(sparse_model: Path) -> None:
    t = {x.name: x for x in GGUFReader(sparse_model).tensors}
    n_layer = sum(1 for name in t if name.endswith(".ffn_act_thresh"))
    rng = np.random.default_rng(0)
    ffn = [rng.uniform(0, 1, int(t[f"blk.{il}.ffn_up.weight"].shape[1])) for il in range(n_layer)]
    activity = {"ffn": ffn, "attn_q_in": [], "attn_o_in": []}  # attention inputs read whole
    reads = {r.name: r for r in decode_reads(sparse_model, 0.7, activity)}
    for il in range(n_layer):
        up = reads[f"blk.{il}.ffn_up.weight"]
        assert up.nbytes == pytest.approx(t[f"blk.{il}.ffn_up.weight"].n_bytes * ffn[il].mean())
        down_t = reads[f"blk.{il}.ffn_down_t.weight"]  # at 0.7 the copy is read, not the original
        assert f"blk.{il}.ffn_down.weight" not in reads
        assert down_t.row_bytes * down_t.rows == t[f"blk.{il}.ffn_down_t.weight"].n_bytes
        assert down_t.nbytes == pytest.approx(down_t.row_bytes * ffn[il].sum())
        assert reads[f"blk.{il}.attn_q.weight"].active is None
    dense = decode_reads(sparse_model)
    assert split_bytes(dense)[1] == 0 and not any(r.name.endswith("_t.weight") for r in dense)


def test_bench_reports_json_and_png(sparse_model: Path, tmp_path: Path) -> None:
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_cli(
        "bench",
        sparse_model,
        "--levels",
        "0.5,0.7",
        "--repeats",
        3,
        "-p",
        32,
        "-n",
        8,
        "--json",
        js,
        "--png",
        png,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(js.read_text())
    assert [e["level"] for e in report["levels"]] == [0.0, 0.5, 0.7]
    assert report["machine"]["cores"] >= 1 and report["machine"]["read_bandwidth_gbs"] > 0
    for e in report["levels"]:
        assert e["decode_median"] > 0 and e["prefill_median"] > 0 and e["peak_rss_mb"] > 0
    dense = report["levels"][0]
    for e in report["levels"][1:]:
        assert abs(e["realized"]["ffn"] - e["level"]) < 0.15
        assert e["ceiling"] > 1.0
        # the speed-up is the median of the ratios within each interleaved repeat
        per_repeat = sorted(a / b for a, b in zip(e["decode_tps"], dense["decode_tps"], strict=True))
        assert len(per_repeat) == 3 and e["decode_ratio"] == pytest.approx(per_repeat[1])
        assert e["efficiency"] == pytest.approx(e["decode_ratio"] / e["ceiling"])
        # the memory bound: the level's weight reads alone, timed on this machine, against decode
        dense_bytes = report["dense_weight_bytes_per_token"]
        streamed, gathered = e["streamed_bytes"], e["gathered_bytes"]
        assert gathered > 0 and e["reads_seconds"] > 0 and e["gathered_read_cost"] > 0
        assert e["ceiling"] == pytest.approx(dense_bytes / (streamed + gathered))
        assert e["of_memory_bound"] == pytest.approx(e["reads_seconds"] * e["decode_median"])
        assert e["memory_bound"] == pytest.approx(e["decode_ratio"] / e["of_memory_bound"])
    # dense reads everything streamed, which sets the stream rate the gathered cost is priced against
    rate = report["stream_rate_gbs"] * 1e9
    assert dense["gathered_bytes"] == 0
    assert dense["reads_seconds"] == pytest.approx(dense["streamed_bytes"] / rate)
    assert png.stat().st_size > 1000
    assert "ceiling" in proc.stdout and "mem bound" in proc.stdout and "GB/s" in proc.stdout


def test_bench_refuses_unknown_levels_and_dense_models(sparse_model: Path, small_model_path: Path) -> None:
    proc = run_cli("bench", sparse_model, "--levels", "0.45")
    assert proc.returncode == 2 and "available" in proc.stderr
    proc = run_cli("bench", small_model_path)
    assert proc.returncode == 2 and "convert_with_thresholds.py" in proc.stderr


def test_reads_bench_splits_streamed_and_gathered_reads(tmp_path: Path) -> None:
    from actsparse import engine
    from actsparse.benchmark import WeightRead, time_reads

    rows, row_bytes = 512, 1024
    always = WeightRead("g1", row_bytes, rows, np.ones(rows))
    never = WeightRead("g0", row_bytes, rows, np.zeros(rows))
    timing = time_reads([WeightRead("s", 4 << 20, 1), always, never], threads=2, repeats=1)
    assert timing.stream_bytes == 4 << 20 and timing.gather_bytes == rows * row_bytes
    assert timing.stream_seconds > 0 and timing.gather_seconds > 0
    assert timing.seconds == pytest.approx(timing.stream_seconds + timing.gather_seconds, rel=0.5)
    assert timing.gathered_read_cost > 0
    tool = str(engine.binary("actsparse-bench-reads"))
    plan = tmp_path / "bad.txt"
    for text, words in (("gather 64 2 0.5\n", "expected"), ("stream 0\n", "expected"), ("", "no reads")):
        plan.write_text(text)
        proc = subprocess.run([tool, str(plan)], capture_output=True, text=True)
        assert proc.returncode != 0 and words in proc.stderr and len(proc.stderr.splitlines()) == 1
