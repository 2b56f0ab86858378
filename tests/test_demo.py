"""`make demo` is the front door: its own code path, end to end, with what the user sees checked.

The demo runs as `make demo` runs it (`python -m actsparse.cli demo`), with a small calibration,
two levels and one bench repeat so it stays short; .ci/run also runs `make demo` itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli

PROMPT = "The three most important ideas in the history of science are"
LEVELS = (0.3, 0.5)


@pytest.fixture(scope="module")
def demo_run(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli(
        "demo", "--calib-tokens", 1024, "--levels", ",".join(map(str, LEVELS)), "--repeats", 1,
        "--chunks", 2, "-n", 24, "-o", out / "demo.sparse.gguf", "--json", out / "demo.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "demo.json").read_text())


def test_demo_shows_both_generated_texts(demo_run: tuple[str, dict]) -> None:
    stdout, report = demo_run
    dense = re.search(r"-- dense:\n(.+?)\n\n", stdout, re.S)
    sparse = re.search(r"-- sparse, level 0\.5:\n(.+?)\n\n", stdout, re.S)
    assert dense and sparse, stdout
    for text in (dense.group(1), sparse.group(1)):
        assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 10
    assert report["dense"]["text"] and report["sparse"]["text"]


def test_demo_reports_both_speeds_and_their_ratio(demo_run: tuple[str, dict]) -> None:
    stdout, report = demo_run
    m = re.search(r"decode runs at ([\d.]+) t/s against ([\d.]+) t/s dense: x(\d+\.\d+)", stdout)
    assert m, stdout
    sparse_tps, dense_tps, ratio = map(float, m.groups())
    assert sparse_tps > 0 and dense_tps > 0
    # one repeat: the median of ratios is the ratio of the speeds
    assert ratio == pytest.approx(sparse_tps / dense_tps, abs=0.02)
    rows = {row["level"]: row for row in report["levels"]}
    assert sorted(rows) == list(LEVELS)
    assert rows[0.5]["speedup"] == pytest.approx(ratio, abs=0.006)
    for row in rows.values():
        assert row["memory_bound"] > 0 and row["ceiling"] > 0


def test_demo_reports_quality_in_words_and_realized_sparsity(demo_run: tuple[str, dict]) -> None:
    stdout, report = demo_run
    m = re.search(r"realized FFN sparsity ([\d.]+)", stdout)
    assert m, stdout
    assert float(m.group(1)) == pytest.approx(0.5, abs=0.1)
    kld = re.search(r"mean KL divergence ([\d.]+), ([\d.]+)x what llama\.cpp's own q4_K_M", stdout)
    ppl = re.search(r"perplexity ([\d.]+) -> ([\d.]+) \(([-+][\d.]+)%\)", stdout)
    assert kld and ppl, stdout
    assert float(kld.group(1)) > 0 and float(kld.group(2)) == pytest.approx(
        float(kld.group(1)) / 0.031, rel=0.05
    )
    before, after, change = map(float, ppl.groups())
    assert change == pytest.approx(100 * (after / before - 1), abs=0.1)
    rows = {row["level"]: row for row in report["levels"]}
    # more sparsity costs more quality, measured on the same held-out text
    assert rows[0.5]["kld_mean"] > rows[0.3]["kld_mean"] > 0
    # the table has a line per level with its realized sparsity
    for level in LEVELS:
        assert re.search(rf"^\s*{level:g}\s+0\.\d{{3}}\s", stdout, re.M), stdout


def test_demo_explains_a_small_speedup(demo_run: tuple[str, dict]) -> None:
    stdout, report = demo_run
    rows = {row["level"]: row for row in report["levels"]}
    explained = "why not faster: " in stdout
    assert explained == (rows[0.5]["speedup"] < 1.15)
    if explained:
        bound = re.search(r"memory bound is x[\d.]+; decode reached (\d+)% of it", stdout)
        arithmetic = re.search(r"weight reads alone take (\d+)% of a decode step here, so decode is bound "
                               r"by arithmetic", stdout)  # fmt: skip
        assert bool(bound) != bool(arithmetic), stdout
        assert int((bound or arithmetic).group(1)) >= 60 if bound else int(arithmetic.group(1)) < 60


def test_demo_reports_generation_quality(demo_run: tuple[str, dict]) -> None:
    """The figure a generating tool pays (the prompt dense), beside the all-positions one."""
    stdout, report = demo_run
    m = re.search(r"the prompt dense, new tokens sparse\): mean KLD (\d+\.\d+)", stdout)
    assert m, stdout
    row = next(r for r in report["levels"] if r["level"] == 0.5)
    assert float(m.group(1)) == pytest.approx(row["generation_kld_mean"], abs=5e-4)
    assert 0 < row["generation_kld_mean"] < 2 * row["kld_mean"]
