"""--sparsity kld:X: parsing, the bisection against its definition, and a converted file whose
budget level holds its own thresholds and loads in the runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse import calibration, convert, engine, quality_budget, schema
from actsparse.sparse_file import read_sparse_file
from helpers import run_cli, run_converter


def test_sparsity_parses_levels_and_budgets() -> None:
    assert quality_budget.parse_sparsity("0.5,kld:0.05, 0.3,kld:0.1,kld:0.05") == ([0.3, 0.5], [0.05, 0.1])
    assert quality_budget.parse_sparsity("kld:0.2") == ([], [0.2])
    for bad in ("kld:x", "kld:-1", "kld:0", "kld:nan", "", "0.5,1.5"):
        with pytest.raises(ValueError):
            quality_budget.parse_sparsity(bad)
    levels = quality_budget.provisional_levels([0.05, 0.3], 3)
    assert len(levels) == 5 and levels == sorted(levels) and len(set(levels)) == 5


def test_bisection_finds_the_largest_level_within_the_budget() -> None:
    def kld(s: float) -> float:
        return 0.8 * s**3

    for budget in (0.01, 0.05, 0.2):
        found = quality_budget.search_level(budget, kld)
        exact = (budget / 0.8) ** (1 / 3)
        assert found.kld <= budget and found.kld == kld(found.level)
        assert exact - 0.0075 <= found.level <= exact
    assert quality_budget.search_level(1.0, kld).level == quality_budget.MAX_SPARSITY
    with pytest.raises(ValueError, match="cannot be met"):
        quality_budget.search_level(1e-9, kld)
    # a found level that meets a numeric one moves just below it
    levels, budgets = quality_budget.final_levels([0.3, 0.5], [quality_budget.Found(0.05, 0.5, 0.04)])
    assert levels[:2] == [0.3, 0.499] and levels[2] == 0.5 and budgets == [0.0, 0.05, 0.0]


def test_budget_level_is_found_written_and_selectable(
    small_model_path: Path, small_sparse_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "budget.gguf"
    proc = run_converter(
        small_model_path, "-o", out, "--load-stats", small_sparse_dir / "stats.gguf", "--no-attn",
        "--sparsity", "0.3,kld:0.08", "--allocate-tokens", 256, "--refine-tokens", 0,
        "--transposed-type", "q8_0", check=True,
    )  # fmt: skip
    f = read_sparse_file(out)
    assert f.level_budgets is not None and sorted(f.level_budgets) == [0.0, 0.08]
    row = f.level_budgets.index(0.08)
    level = f.levels[row]
    assert 0.02 <= level <= quality_budget.MAX_SPARSITY and not schema.same_level(level, 0.3)
    assert f"kld:0.08: level {level:g}" in proc.stderr
    assert f.levels == sorted(f.levels) and f.default_level in f.levels
    # the row holds the thresholds of the found level, by their definition
    stats = calibration.read_stats(small_sparse_dir / "stats.gguf")
    tensors = {t.name: np.array(t.data) for t in GGUFReader(out).tensors if t.name.endswith("_thresh")}
    for il in (0, 15, 29):
        want = convert.kind_thresholds(stats.layers[il], schema.FFN, [level], "chess")[0]
        got = tensors[schema.FFN.thresh_name(il)].reshape(len(f.levels), -1)[row]
        np.testing.assert_allclose(got, want, rtol=2e-6)
    shown = run_cli("inspect", out)
    assert f"{level:g} (kld:0.08)" in shown.stdout
    gen = subprocess.run(
        [str(engine.binary("llama-completion")), "-m", str(out), "-p", "The capital of France is", "-n", "4",
         "--sparse", f"{level:g}", "-no-cnv"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-1500:]


def test_budgets_that_cannot_be_met_or_parsed_are_refused(small_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    for sparsity, words in (("kld:zero", "kld:NUMBER"), ("kld:-0.1", "positive")):
        proc = run_converter(small_model_path, "-o", out, "--sparsity", sparsity, "-q")
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_converter(
        small_model_path, "-o", out, "--sparsity", "kld:1e-7", "--calib-tokens", 512,
        "--allocate-tokens", 256, "--refine-tokens", 0, "--no-attn", "--transposed-type", "q8_0", "-q",
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot be met" in proc.stderr and not out.exists()
