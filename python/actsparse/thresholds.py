"""Threshold methods (pure functions of calibration statistics).

CHESS (METHODS.md §1): per FFN channel i, t_i = tau / m_i with m_i = E|u_i| and tau the s-quantile
of the scores |a_i| * m_i over all calibration tokens and channels of the layer.
CATS (§2): one threshold per layer, the s-quantile of |a|.
Selective attention: one threshold per layer, the s-quantile of |x| at the q input / o input.

Statistics arrive as histograms with one bin per bfloat16 bit pattern of |value| (see
docs/gguf-format.md); quantiles interpolate linearly inside the bin that holds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BINS = 1 << 15
FLT_MAX = float(np.finfo(np.float32).max)


def bin_edges() -> np.ndarray:
    """Lower edge of every bin and the upper edge of the last: float64, length N_BINS + 1."""
    lo_bits = (np.arange(N_BINS + 1, dtype=np.uint64) << np.uint64(16)).astype(np.uint32)
    with np.errstate(invalid="ignore"):
        edges = lo_bits.view(np.float32).astype(np.float64)
    edges[~np.isfinite(edges)] = FLT_MAX  # bins past the largest finite float hold inf/NaN
    return edges


_EDGES = bin_edges()


def histogram_of(values: np.ndarray) -> np.ndarray:
    """The histogram actsparse-calibrate builds, computed in numpy (for tests and references)."""
    bits = np.abs(np.asarray(values, dtype=np.float32)).view(np.uint32) >> np.uint32(16)
    return np.bincount(bits.ravel().astype(np.int64), minlength=N_BINS).astype(np.float64)


def quantile_from_histogram(hist: np.ndarray, q: float) -> float:
    """Value v such that a fraction q of the histogram's mass is <= v."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level {q} is outside (0, 1)")
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    cum = np.cumsum(hist)
    target = q * total
    b = int(np.searchsorted(cum, target, side="left"))
    below = cum[b - 1] if b > 0 else 0.0
    frac = (target - below) / hist[b] if hist[b] > 0 else 0.0
    lo, hi = _EDGES[b], _EDGES[b + 1]
    return float(lo + frac * (hi - lo))


def cats_thresholds(act_hist: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """One threshold per level on |act(gate)|: shape [L, 1]."""
    return np.array([[quantile_from_histogram(act_hist, s)] for s in levels], dtype=np.float32)


def chess_thresholds(mean_abs_up: np.ndarray, score_hist: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Channel-wise thresholds t_i = tau(s) / m_i: shape [L, n_ff].

    A channel whose up output is always zero (m_i = 0) never changes the output, so it is always
    skipped (FLT_MAX).
    """
    m = np.asarray(mean_abs_up, dtype=np.float64)
    out = np.empty((len(levels), m.size), dtype=np.float32)
    with np.errstate(divide="ignore"):
        for k, s in enumerate(levels):
            tau = quantile_from_histogram(score_hist, s)
            t = np.where(m > 0, tau / np.where(m > 0, m, 1.0), FLT_MAX)
            out[k] = np.minimum(t, FLT_MAX)
    return out


def layer_thresholds(hist: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """One magnitude threshold per level (attention inputs): shape [L, 1]."""
    return cats_thresholds(hist, levels)


def parse_levels(text: str) -> list[float]:
    """'0.3,0.5' -> [0.3, 0.5], sorted, unique, each in (0, 1)."""
    levels: list[float] = []
    for item in text.split(","):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"sparsity level '{item}' is not a number") from None
        if not 0.0 < v < 1.0 or not np.isfinite(v):
            raise ValueError(f"sparsity level {item} is outside (0, 1)")
        levels.append(v)
    if not levels:
        raise ValueError("no sparsity level given")
    return sorted(set(levels))
