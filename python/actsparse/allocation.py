"""Each level's saving spread over layers and kinds by measured sensitivity (`--allocate`).

Uniform sparsity gives every layer's FFN channels, q input and o input the level's fraction, yet
layers differ widely in what a skipped byte costs. Here a *unit* is one layer's one kind. Its cost
at sparsity s, alone sparse in an otherwise dense model, is the model's mean KL divergence against
dense on calibration text, measured with the real runtime (llama-perplexity) once, at the probe
sparsity. Its shape in s follows the unit's dropped energy: the share of its squared scores that
fall below the s-quantile (to first order the KL divergence grows with the squared output error
the skipped inputs carry). Units' costs add, to first order. Each level then minimises the summed
cost subject to skipping the weight bytes uniform sparsity at the level skips (a level's name stays
its model-wide saving): a Lagrange multiplier, bisected until the saving is met.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema
from .calibration import CalibrationStats
from .gguf_io import ModelInfo
from .thresholds import N_BINS, bin_edges

MAX_SPARSITY = 0.9  # no unit is allocated more: the cost curve is extrapolated beyond the probe
GRID = np.round(np.linspace(0.0, MAX_SPARSITY, 73), 6)  # steps of 0.0125
DEFAULT_PROBE = 0.5


@dataclass(frozen=True)
class Unit:
    """One layer's one kind of sparse input."""

    layer: int
    kind: schema.Kind
    saved_bytes: float  # weight bytes per token it skips at sparsity 1 (its original products)
    score_hist: np.ndarray  # the histogram its thresholds are quantiles of


def units(info: ModelInfo, stats: CalibrationStats, method: str, attn: bool) -> list[Unit]:
    """The units of a model, FFN then q input then o input of each layer."""
    nbytes = {name: float(t.n_bytes) for name, t in info.tensors.items()}
    out = []
    for il, ls in enumerate(stats.layers):
        hist = ls.score_hist if method == "chess" else ls.act_hist
        if hist is None:
            raise ValueError("CHESS scores missing from the statistics")
        ffn = nbytes[f"blk.{il}.ffn_up.weight"] + nbytes[schema.FFN.weight_name(il)]
        out.append(Unit(il, schema.FFN, ffn, hist))
        if attn and ls.q_in_hist is not None and ls.o_in_hist is not None:
            out.append(Unit(il, schema.ATTN_Q_IN, nbytes[schema.ATTN_Q_IN.weight_name(il)], ls.q_in_hist))
            out.append(Unit(il, schema.ATTN_O_IN, nbytes[schema.ATTN_O_IN.weight_name(il)], ls.o_in_hist))
    return out


def units_of(info: ModelInfo, attn: bool) -> list[tuple[int, schema.Kind]]:
    """(layer, kind) of each unit, without statistics (to count the probes)."""
    kinds = schema.KINDS if attn else (schema.FFN,)
    return [(il, k) for il in range(info.n_layer) for k in kinds]


def _bin_values() -> np.ndarray:
    edges = bin_edges()
    with np.errstate(invalid="ignore", over="ignore"):
        mid = np.sqrt(np.maximum(edges[:-1], 0.0) * np.maximum(edges[1:], 0.0))
    mid[~np.isfinite(mid)] = 0.0
    return mid[:N_BINS]


_VALUES = _bin_values()


def dropped_energy(hist: np.ndarray, grid: Sequence[float] = GRID) -> np.ndarray:
    """Share of the histogram's squared values below each grid quantile (0 at 0, rising to 1)."""
    h = np.asarray(hist, dtype=np.float64)
    count, energy = np.cumsum(h), np.cumsum(h * _VALUES**2)
    if count[-1] <= 0 or energy[-1] <= 0:
        return np.zeros(len(grid))
    b = np.searchsorted(count, np.asarray(grid) * count[-1], side="left").clip(0, len(h) - 1)
    # within the quantile's bin, a share of its energy in proportion to the count taken from it
    below_count = np.where(b > 0, count[b - 1], 0.0)
    below_energy = np.where(b > 0, energy[b - 1], 0.0)
    take = np.where(h[b] > 0, (np.asarray(grid) * count[-1] - below_count) / np.where(h[b] > 0, h[b], 1), 0)
    out = (below_energy + take.clip(0, 1) * h[b] * _VALUES[b] ** 2) / energy[-1]
    return np.where(np.asarray(grid) > 0, out, 0.0)


def cost_curves(unit_list: Sequence[Unit], probe_kld: np.ndarray, probe: float) -> np.ndarray:
    """[units, GRID]: each unit's modelled KL divergence at each grid sparsity."""
    out = np.empty((len(unit_list), len(GRID)))
    at_probe = dropped_energy_at(unit_list, probe)
    for i, u in enumerate(unit_list):
        shape = dropped_energy(u.score_hist)
        out[i] = max(float(probe_kld[i]), 0.0) * (shape / at_probe[i] if at_probe[i] > 0 else GRID / probe)
    return out


def dropped_energy_at(unit_list: Sequence[Unit], s: float) -> np.ndarray:
    return np.array([dropped_energy(u.score_hist, [s])[0] for u in unit_list])


def allocate(saved_bytes: np.ndarray, cost: np.ndarray, level: float) -> np.ndarray:
    """Per unit, the grid sparsity minimising the summed cost while skipping at least the bytes
    uniform `level` skips."""
    share = saved_bytes / saved_bytes.sum()
    need = level - 1e-9

    def choose(lam: float) -> np.ndarray:
        return GRID[np.argmin(cost - lam * share[:, None] * GRID[None, :], axis=1)]

    lo, hi = 0.0, 1.0
    while float(share @ choose(hi)) < need and hi < 1e12:
        hi *= 4.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(share @ choose(mid)) < need:
            lo = mid
        else:
            hi = mid
    return choose(hi)


def allocation(
    unit_list: Sequence[Unit], probe_kld: np.ndarray, probe: float, levels: Sequence[float], n_layer: int
) -> np.ndarray:
    """[levels, n_layer, kinds] targets (schema.KEY_ALLOCATION), each level's no lower than the
    previous one's (the runtime's thresholds rise with the level)."""
    cost = cost_curves(unit_list, probe_kld, probe)
    saved = np.array([u.saved_bytes for u in unit_list])
    out = np.zeros((len(levels), n_layer, len(schema.KINDS)))
    prev = np.zeros(len(unit_list))
    for k, level in enumerate(levels):
        s = np.maximum(allocate(saved, cost, level), prev)
        prev = s
        for u, v in zip(unit_list, s, strict=True):
            out[k, u.layer, schema.KINDS.index(u.kind)] = v
    return out


def uniform(levels: Sequence[float], n_layer: int) -> np.ndarray:
    """The targets of uniform sparsity, in the allocation's shape."""
    return np.broadcast_to(
        np.asarray(levels, dtype=np.float64)[:, None, None], (len(levels), n_layer, len(schema.KINDS))
    ).copy()


@dataclass(frozen=True)
class ProbeOptions:
    """How the units' sensitivity is measured."""

    probe: float = DEFAULT_PROBE
    tokens: int = 1024
    window: int = 512
    threads: int = 2


def measure_sensitivity(
    model: Path,
    level_slot: float,
    unit_list: Sequence[Unit],
    unit_thresholds: Callable[[Unit, float], tuple[str, np.ndarray]],
    write: Callable[[dict[str, np.ndarray]], None],
    zeros: dict[str, np.ndarray],
    text: str,
    options: ProbeOptions,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Each unit's mean KL divergence alone sparse at the probe sparsity.

    `model` is the converted file, its thresholds at `level_slot` rewritten per probe through
    `write` (all `zeros` first: a dense model; then one unit's `unit_thresholds` at a time). What
    the runtime costs with every threshold 0 is measured first and taken off each unit's figure."""
    from . import evaluate

    window = min(options.window, max(2, options.tokens))
    chunks = max(2, -(-options.tokens // window))  # llama-perplexity scores half of each window
    write(zeros)
    out = np.zeros(len(unit_list))
    with tempfile.TemporaryDirectory(prefix="actsparse-alloc-") as tmp:
        text_file, base = Path(tmp) / "probe.txt", Path(tmp) / "dense.kld"
        text_file.write_text(text, encoding="utf-8")
        evaluate.dense_text_metrics(model, text_file, base, window, chunks, options.threads)
        if on_progress is not None:
            on_progress(1)
        # the floor: every threshold 0 yet the sparse runtime on (ffn_up unrepacked, say)
        floor, _ = evaluate.sparse_text_metrics(
            model, level_slot, text_file, base, window, chunks, options.threads
        )
        for i, u in enumerate(unit_list):
            name, values = unit_thresholds(u, options.probe)
            write({name: values})
            metrics, _ = evaluate.sparse_text_metrics(
                model, level_slot, text_file, base, window, chunks, options.threads
            )
            write({name: zeros[name]})
            out[i] = max(metrics["kld_mean"] - floor["kld_mean"], 0.0)
            if on_progress is not None:
                on_progress(i + 3)
    return out
