"""The readers of llama.cpp tools' output (actsparse.tool_output), on the real tools' output."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from actsparse import engine, schema, tool_output
from actsparse.data import heldout_corpus

LEVEL = 0.5


def _run(*cmd: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*map(str, cmd)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def perplexity_runs(small_sparse_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("tool-output")
    text = tmp / "heldout.txt"
    text.write_text(heldout_corpus().text[:50_000])
    ppl = [
        engine.binary("llama-perplexity"),
        "-m",
        small_sparse_model,
        "-f",
        text,
        "-c",
        256,
        "--chunks",
        2,
        "-t",
        2,
    ]
    dense = _run(*ppl, "--kl-divergence-base", tmp / "base.kld")
    stats_file = tmp / "sparsity.json"
    sparse = _run(*ppl, "--kl-divergence-base", tmp / "base.kld", "--kl-divergence", "--sparse", LEVEL,
                  "--sparse-stats", "--sparse-stats-file", stats_file)  # fmt: skip
    return {"dense": dense, "sparse": sparse, "stats_file": stats_file}


def test_perplexity_and_kl_divergence_are_read(perplexity_runs: dict) -> None:
    dense = tool_output.perplexity(perplexity_runs["dense"].stdout + perplexity_runs["dense"].stderr)
    sparse = perplexity_runs["sparse"]
    kld = tool_output.kl_divergence(sparse.stdout + sparse.stderr)
    assert 1.0 < dense < 1000.0 and kld["ppl"] > 1.0
    assert 0.0 < kld["kld_mean"] < kld["kld_p99"] and 0.0 < kld["same_top"] < 1.0
    with pytest.raises(tool_output.ToolOutputError, match=r"printed no PPL\(Q\)"):
        tool_output.kl_divergence(perplexity_runs["dense"].stderr)


def test_sparsity_file_agrees_with_the_printed_table(perplexity_runs: dict) -> None:
    """The JSON the runtime writes and the table it prints for people carry the same figures."""
    stats = tool_output.sparsity_stats(perplexity_runs["stats_file"], "prefill")
    assert [row["layer"] for row in stats["layers"]] == list(range(30))
    table = perplexity_runs["sparse"].stderr.split("realized sparsity during prefill", 1)[1]
    printed = re.search(r"^\s+all\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$", table, re.M)
    assert printed, table[:2000]
    for kind, value in zip(schema.sparse_kinds("chess", True), printed.groups(), strict=True):
        assert stats["overall"][kind.name] == pytest.approx(float(value), abs=5e-4)
    assert stats["overall"]["ffn"] == pytest.approx(LEVEL, abs=0.05)
    # llama-perplexity decodes no single tokens: the decode phase is there, with nothing counted
    decode = tool_output.sparsity_stats(perplexity_runs["stats_file"], "decode")
    assert all(v is None for v in decode["overall"].values())


def test_completion_speed_and_decode_sparsity_are_read(small_sparse_model: Path, tmp_path: Path) -> None:
    stats_file = tmp_path / "sparsity.json"
    proc = _run(engine.binary("llama-completion"), "-m", small_sparse_model, "-p", "The city of", "-n", 16,
                "-t", 2, "--temp", 0, "-no-cnv", "--no-warmup", "--sparse", LEVEL,
                "--sparse-stats-file", stats_file)  # fmt: skip
    tps = tool_output.decode_tokens_per_second(proc.stderr)
    assert tps is not None and tps > 0
    stats = tool_output.sparsity_stats(stats_file, "decode")
    assert stats["overall"]["ffn"] == pytest.approx(LEVEL, abs=0.1)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed
    # each channel's share of the decoded tokens, whose mean is the layer's active fraction
    activity = tool_output.channel_activity(stats_file)
    assert len(activity["ffn"]) == len(stats["layers"])
    for layer, row in zip(activity["ffn"], stats["layers"], strict=True):
        assert layer.size > 0 and ((layer >= 0) & (layer <= 1)).all()
        assert layer.mean() == pytest.approx(1 - row["ffn"], abs=1e-6)
    tokens = json.loads(stats_file.read_text())["decode_tokens"]
    assert 14 <= tokens <= 16  # whole tokens of the 16 generated, the first one's batch the prompt's
    assert all(np.allclose(layer * tokens, np.round(layer * tokens), atol=1e-6) for layer in activity["ffn"])


def test_a_missing_or_damaged_stats_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(tool_output.ToolOutputError, match="no readable sparsity statistics"):
        tool_output.sparsity_stats(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"layers": []}')
    with pytest.raises(tool_output.ToolOutputError, match="has no prefill statistics"):
        tool_output.sparsity_stats(tmp_path / "bad.json", "prefill")
