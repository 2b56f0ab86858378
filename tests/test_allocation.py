"""--allocate: the dropped-energy curve against its definition, the allocation against its
constraint and objective, and a converted file against the schema and the runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse import allocation, calibration, convert, engine, schema, thresholds, tool_output
from actsparse.sparse_file import read_sparse_file
from helpers import run_cli, run_converter


def test_dropped_energy_follows_its_definition() -> None:
    rng = np.random.default_rng(0)
    values = np.abs(rng.standard_cauchy(200_000)).astype(np.float32)
    hist = thresholds.histogram_of(values)
    grid = [0.1, 0.3, 0.5, 0.7, 0.9]
    got = allocation.dropped_energy(hist, grid)
    v = np.sort(values.astype(np.float64))
    want = [np.square(v[: int(s * v.size)]).sum() / np.square(v).sum() for s in grid]
    np.testing.assert_allclose(got, want, rtol=0.02, atol=1e-6)
    assert allocation.dropped_energy(hist, [0.0])[0] == 0.0
    assert np.all(np.diff(allocation.dropped_energy(hist)) >= 0)


def _uniform_cost(cost: np.ndarray, level: float) -> float:
    i = int(np.argmin(np.abs(allocation.GRID - level)))
    return float(cost[:, i].sum())


def test_allocation_meets_the_budget_at_no_more_cost_than_uniform() -> None:
    rng = np.random.default_rng(1)
    n = 40
    saved = rng.uniform(1, 10, n)
    # convex costs of very different scales, as layers have
    scale = rng.lognormal(0, 1.5, n)
    power = rng.uniform(1.5, 4, n)
    cost = scale[:, None] * allocation.GRID[None, :] ** power[:, None]
    step = allocation.GRID[1]
    for level in (0.3, 0.5, 0.7):
        s = allocation.allocate(saved, cost, level)
        achieved = float(saved @ s / saved.sum())
        assert level - 1e-6 <= achieved <= level + step
        assert (
            cost[np.arange(n), np.searchsorted(allocation.GRID, s)].sum() <= _uniform_cost(cost, level) + 1e-9
        )
        # the cheap units take more than the level, the dear ones less
        assert np.corrcoef(s, np.log(scale))[0, 1] < -0.5
    # identical units share the saving alike
    same = allocation.allocate(np.ones(8), np.tile(allocation.GRID**2, (8, 1)), 0.5)
    np.testing.assert_allclose(same, 0.5, atol=step)


@pytest.fixture(scope="module")
def allocated(
    small_model_path: Path, small_sparse_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("allocated") / "smol.allocated.gguf"
    run_converter(
        small_model_path, "-o", out, "--load-stats", small_sparse_dir / "stats.gguf", "--sparsity", "0.3,0.5",
        "--no-attn", "--allocate", "--allocate-tokens", 128, "--refine-tokens", 0,
        "--transposed-type", "q8_0", "-q", check=True,
    )  # fmt: skip
    return out


def test_allocated_file_saves_each_level_and_holds_thresholds_at_its_targets(
    allocated: Path, small_sparse_dir: Path
) -> None:
    f = read_sparse_file(allocated)
    assert f.allocated and f.allocation is not None
    assert f.allocation.shape == (2, f.model.n_layer, len(schema.KINDS))
    stats = calibration.read_stats(small_sparse_dir / "stats.gguf")
    units = allocation.units(f.model, stats, "chess", f.kinds)
    saved = np.array([u.saved_bytes for u in units])
    tensors = {t.name: np.array(t.data) for t in GGUFReader(allocated).tensors if t.name.endswith("_thresh")}
    for row, level in enumerate(f.levels):
        s = np.array([f.target(u.kind, u.layer, level) for u in units])
        assert level - 1e-4 <= float(saved @ s / saved.sum()) <= level + allocation.GRID[1]
        assert s.std() > 0.02  # not uniform: layers differ in what their bytes cost
        for u in units[::7]:
            want = convert.kind_thresholds(
                stats.layers[u.layer], u.kind, [f.target(u.kind, u.layer, level)], "chess"
            )
            got = tensors[u.kind.thresh_name(u.layer)].reshape(len(f.levels), -1)[row]
            np.testing.assert_allclose(got, want[0], rtol=1e-6)
    # a higher level never lowers a unit's target
    assert np.all(np.diff(f.allocation, axis=0) >= 0)


def test_runtime_realizes_the_allocated_targets(allocated: Path, tmp_path: Path) -> None:
    from actsparse.data import heldout_corpus

    text = tmp_path / "heldout.txt"
    text.write_text(heldout_corpus().text[:40000])
    stats_file = tmp_path / "stats.json"
    cmd = [
        str(engine.binary("llama-perplexity")), "-m", str(allocated), "-f", str(text), "-c", "512",
        "--chunks", "4", "-t", "2", "--sparse", "0.5", "--sparse-stats-file", str(stats_file),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    layers = tool_output.sparsity_stats(stats_file, "prefill")["layers"]
    f = read_sparse_file(allocated)
    for kind in f.kinds:
        got = np.array([row[kind.name] for row in layers])
        targets = np.array([f.target(kind, row["layer"], 0.5) for row in layers])
        # held-out text: each layer within a few points of its own target
        assert np.max(np.abs(got - targets)) < 0.06, (kind.name, got.round(3), targets)


def test_malformed_allocation_is_refused(allocated: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(allocated.read_bytes())
    reader = GGUFReader(bad, "r+")
    f = reader.get_field(schema.KEY_ALLOCATION)
    f.parts[f.data[3]][0] = 1.5
    reader.data.flush()
    del reader
    proc = subprocess.run(
        [str(engine.binary("llama-completion")), "-m", str(bad), "-p", "hi", "-n", "1", "--sparse", "0.5"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0 and schema.KEY_ALLOCATION in proc.stderr
    inspect = run_cli("inspect", bad)
    assert inspect.returncode == 2 and schema.KEY_ALLOCATION in inspect.stderr
    assert len(inspect.stderr.strip().splitlines()) == 1


def test_allocate_refuses_too_few_probe_tokens(small_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    proc = run_converter(small_model_path, "-o", out, "--allocate", "--allocate-tokens", 1, "-q")
    assert proc.returncode == 2 and "--allocate-tokens" in proc.stderr and not out.exists()


def test_cost_curves_fit_the_whole_kind_measurements() -> None:
    rng = np.random.default_rng(2)
    units = [
        allocation.Unit(il, schema.FFN, 1.0, thresholds.histogram_of(np.abs(rng.standard_t(3 + il, 50_000))))
        for il in range(6)
    ]
    energy = [allocation.dropped_energy(u.score_hist) for u in units]
    ratio = np.array([e / np.interp(0.5, allocation.GRID, e) for e in energy])
    g = rng.uniform(0.001, 0.01, len(units))
    true_power = 1.7
    whole = {
        v: float(g @ np.array([np.interp(v, allocation.GRID, r) for r in ratio]) ** true_power)
        for v in (0.3, 0.5, 0.7)
    }
    sens = allocation.Sensitivity(0.5, g, {"ffn": whole})
    cost = allocation.cost_curves(units, sens)
    for v, w in whole.items():
        assert float(np.array([np.interp(v, allocation.GRID, c) for c in cost]).sum()) == pytest.approx(
            w, rel=0.1
        )
    # at the probe sparsity each unit costs what its probe measured
    np.testing.assert_allclose([np.interp(0.5, allocation.GRID, c) for c in cost], g, rtol=1e-6)
