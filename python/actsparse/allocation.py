"""Each level's saving spread over layers and kinds by measured sensitivity (`--allocate`).

Uniform sparsity gives every layer's FFN channels, q input and o input the level's fraction, yet
layers differ widely in what a skipped byte costs. Here a *unit* is one layer's one kind. What a
unit costs at sparsity s is modelled from measurements with the real runtime (llama-perplexity's
KL divergence against dense, on calibration text):
- each unit alone sparse at the probe sparsity, the rest of the model dense: how the units of one
  kind compare;
- each kind sparse at the probe sparsity in every layer: what the kind costs as a whole. The costs
  of the kinds add (on SmolLM2-135M: FFN alone 0.164, attention alone 0.061, both 0.230), those of
  one kind's layers do not (the single-layer figures sum to 1.5x the whole FFN's, 3-4x the whole
  q or o input's), so each kind's single-layer figures are scaled to sum to its whole figure;
- in s, a unit's cost follows its dropped energy, the share of its squared scores below the
  s-quantile (to first order the KL divergence grows with the squared output error the skipped
  inputs carry; on SmolLM2 it predicts uniform 0.3 at 0.22x the cost of 0.5, measured 0.21x).
Each level then minimises the summed cost subject to skipping the weight bytes uniform sparsity at
the level skips (a level's name stays its model-wide saving): a Lagrange multiplier, bisected until
the saving is met.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema
from .calibration import CalibrationStats
from .gguf_io import ModelInfo
from .kld_probe import KLDProbe, ProbeText
from .thresholds import N_BINS, bin_edges

MAX_SPARSITY = 0.9  # no unit is allocated more: the cost curve is extrapolated beyond the probe
GRID = np.round(np.linspace(0.0, MAX_SPARSITY, 73), 6)  # steps of 0.0125
DEFAULT_PROBE = 0.5
DEFAULT_PROBE_TOKENS = 512


@dataclass(frozen=True)
class Unit:
    """One layer's one kind of sparse input."""

    layer: int
    kind: schema.Kind
    saved_bytes: float  # weight bytes per token it skips at sparsity 1 (its original products)
    score_hist: np.ndarray  # the histogram its thresholds are quantiles of


def units(info: ModelInfo, stats: CalibrationStats, method: str, kinds: Sequence[schema.Kind]) -> list[Unit]:
    """The units of a model: each layer's `kinds`, in that order."""
    nbytes = {name: float(t.n_bytes) for name, t in info.tensors.items()}
    out = []
    for il, ls in enumerate(stats.layers):
        for kind in kinds:
            if kind is schema.FFN:
                hist = ls.score_hist if method == "chess" else ls.act_hist
                if hist is None:
                    raise ValueError("CHESS scores missing from the statistics")
                ffn = nbytes[f"blk.{il}.ffn_up.weight"] + nbytes[schema.FFN.weight_name(il)]
                out.append(Unit(il, schema.FFN, ffn, hist))
            elif (hist := ls.input_hist(kind)) is not None:
                out.append(Unit(il, kind, nbytes[kind.weight_name(il)], hist))
    return out


def units_of(info: ModelInfo, kinds: Sequence[schema.Kind]) -> list[tuple[int, schema.Kind]]:
    """(layer, kind) of each unit, without statistics (to count the probes)."""
    return [(il, k) for il in range(info.n_layer) for k in kinds]


def probe_runs(info: ModelInfo, kinds: Sequence[schema.Kind], options: ProbeOptions) -> int:
    """llama-perplexity runs of measure_sensitivity: dense, the floor, each unit, each kind."""
    return 2 + len(units_of(info, kinds)) + len(kinds) * len(whole_kind_sparsities(options))


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


@dataclass
class Sensitivity:
    """What the probes measured (mean KL divergence against dense, the floor taken off)."""

    probe: float  # the probe sparsity
    unit: np.ndarray  # each unit's share of its kind's cost at the probe sparsity
    whole: dict[str, dict[float, float]]  # kind name -> sparsity -> the whole kind's cost


EXPONENTS = np.linspace(0.5, 4.0, 36)


def cost_curves(unit_list: Sequence[Unit], sens: Sensitivity) -> np.ndarray:
    """[units, GRID]: each unit's modelled KL divergence at each grid sparsity: its figure at the
    probe times its dropped energy relative to the probe's, to a power fitted per kind so that the
    kind's units together cost what the whole kind measured at each probed sparsity."""
    out = np.empty((len(unit_list), len(GRID)))
    for kind in dict.fromkeys(u.kind for u in unit_list):
        members = [i for i, u in enumerate(unit_list) if u.kind is kind]
        ratio = np.empty((len(members), len(GRID)))
        for j, i in enumerate(members):
            e = dropped_energy(unit_list[i].score_hist)
            at = dropped_energy(unit_list[i].score_hist, [sens.probe])[0]
            ratio[j] = e / at if at > 0 else GRID / sens.probe
        g = np.maximum(sens.unit[members], 0.0)
        measured = {v: w for v, w in sens.whole.get(kind.name, {}).items() if w > 0}
        best, power = np.inf, 1.0
        for pw in EXPONENTS:
            modelled = {v: float(g @ _at(ratio, v) ** pw) for v in measured}
            err = sum((np.log(max(modelled[v], 1e-12)) - np.log(w)) ** 2 for v, w in measured.items())
            if err < best - 1e-12:
                best, power = err, float(pw)
        out[members] = g[:, None] * ratio**power
    return out


def _at(curves: np.ndarray, s: float) -> np.ndarray:
    """Each row of [n, GRID] curves at sparsity s, linearly interpolated."""
    return np.array([np.interp(s, GRID, row) for row in curves])


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
    unit_list: Sequence[Unit], sens: Sensitivity, levels: Sequence[float], n_layer: int
) -> np.ndarray:
    """[levels, n_layer, kinds] targets (schema.KEY_ALLOCATION), each level's no lower than the
    previous one's (the runtime's thresholds rise with the level)."""
    cost = cost_curves(unit_list, sens)
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


def whole_kind_sparsities(options: ProbeOptions) -> list[float]:
    return sorted({options.probe, *(v for v in options.fit if 0 < v <= MAX_SPARSITY)})


@dataclass(frozen=True)
class ProbeOptions:
    """How the units' sensitivity is measured."""

    probe: float = DEFAULT_PROBE
    fit: tuple[float, ...] = (0.3, 0.7)  # the whole kinds are also measured here, to fit the curve
    text: ProbeText = ProbeText(DEFAULT_PROBE_TOKENS)


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
) -> Sensitivity:
    """Each unit's share of the mean KL divergence at the probe sparsity (module docstring): its
    kind's whole cost, split between the kind's units as they cost alone; and each kind's whole
    cost at the fit sparsities.

    `model` is the converted file, its thresholds at `level_slot` rewritten per probe through
    `write` (all `zeros` first: a dense model; then one unit's `unit_thresholds` at a time, then
    every unit of one kind). What the runtime costs with every threshold 0 is measured first and
    taken off each figure."""

    def done(n: int) -> None:
        if on_progress is not None:
            on_progress(n)

    write(zeros)
    out = np.zeros(len(unit_list))
    whole: dict[str, dict[float, float]] = {}
    with KLDProbe(model, level_slot, text, options.text) as probe:
        done(1)
        floor = probe.kld()  # every threshold 0 yet the sparse runtime on (ffn_up unrepacked, say)
        done(2)
        for i, u in enumerate(unit_list):
            name, values = unit_thresholds(u, options.probe)
            write({name: values})
            out[i] = max(probe.kld() - floor, 0.0)
            write({name: zeros[name]})
            done(i + 3)
        runs = 2 + len(unit_list)
        for kind in dict.fromkeys(u.kind for u in unit_list):
            members = [i for i, u in enumerate(unit_list) if u.kind is kind]
            for v in whole_kind_sparsities(options):
                probes = dict(unit_thresholds(unit_list[i], v) for i in members)
                write(probes)
                whole.setdefault(kind.name, {})[v] = max(probe.kld() - floor, 0.0)
                write({name: zeros[name] for name in probes})
                runs += 1
                done(runs)
            alone, at_probe = out[members].sum(), whole[kind.name][options.probe]
            out[members] = out[members] * (at_probe / alone) if alone > 0 else at_probe / len(members)
    return Sensitivity(options.probe, out, whole)
