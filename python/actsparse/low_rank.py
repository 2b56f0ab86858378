"""R-Sparse's low-rank term: what a rank-r correction of the dropped inputs wins back at equal bytes.

R-Sparse computes ``y = W (x * m) + U_r S_r V_r^T (x * (1 - m))``: the inputs whose score
``|x_i| ||W[:, i]||`` passes the threshold exactly, the rest through the best rank-r approximation
of W (its truncated SVD). The factors are read whole every token, ``r (d_in + d_out)`` F16 values,
so at equal bytes a rank r must drop ``factor_bytes(r) / copy_bytes`` more of the inputs. Whether
that trade pays is a property of the layer: how much of W's energy its top singular vectors hold
against how much output the extra dropped inputs carried. This module measures it on calibration
inputs (the dumped rows of ``actsparse-calibrate --dump-layers``), per layer and projection, by the
relative output error ``sum ||y - y_exact||^2 / sum ||y_exact||^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import thresholds

FACTOR_BYTES_PER_VALUE = 2  # the factors are F16
RANKS = (0, 8, 16, 32, 64, 128)


def factor_bytes(rank: int, d_in: int, d_out: int) -> int:
    """Bytes of the rank-r factors V_r^T [r, d_in] and U_r S_r [d_out, r]."""
    return rank * (d_in + d_out) * FACTOR_BYTES_PER_VALUE


@dataclass(frozen=True)
class Factors:
    """The thin SVD of a weight stored as ggml does ([d_out, d_in]): w = u @ diag(s) @ vt."""

    u: np.ndarray  # [d_out, k]
    s: np.ndarray  # [k]
    vt: np.ndarray  # [k, d_in]

    @staticmethod
    def of(w: np.ndarray) -> Factors:
        u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float32), full_matrices=False)
        return Factors(u, s, vt)

    def apply(self, x: np.ndarray, rank: int) -> np.ndarray:
        """x @ (U_r S_r V_r^T)^T for rows x [tokens, d_in]: the rank-r approximation's outputs."""
        if rank == 0:
            return np.zeros((x.shape[0], self.u.shape[0]), dtype=np.float32)
        return ((x @ self.vt[:rank].T) * self.s[:rank]) @ self.u[:, :rank].T


@dataclass(frozen=True)
class Split:
    """One choice for a layer's projection at a byte budget: the rank, the sparsity of the inputs
    sent through W exactly, and the relative output error it measured."""

    rank: int
    sparsity: float
    error: float


def output_error(
    w: np.ndarray, factors: Factors, x: np.ndarray, col_norm: np.ndarray, tau: float, rank: int
) -> float:
    """Relative output error on rows x when the inputs scoring |x_i| ||W[:, i]|| <= tau are dropped
    and sent through the rank-r approximation (rank 0: dropped outright), as the runtime masks."""
    dropped = np.where(np.abs(x) * col_norm <= tau, x, 0.0).astype(np.float32)
    residual = dropped @ w.T - factors.apply(dropped, rank)
    exact = x @ w.T
    return float(
        np.square(residual, dtype=np.float64).sum() / max(np.square(exact, dtype=np.float64).sum(), 1e-30)
    )


def splits_at_equal_bytes(
    w: np.ndarray,
    factors: Factors,
    x: np.ndarray,
    col_norm: np.ndarray,
    hist: np.ndarray,
    sparsity: float,
    copy_bytes: int,
    ranks: Sequence[int] = RANKS,
) -> list[Split]:
    """Every rank's split that reads what rank 0 reads at `sparsity`: (1 - s) of the copy's
    `copy_bytes`, the factors paid for by dropping more inputs. The thresholds come from the
    calibration histogram of the scores (`hist`), as the converter's do."""
    d_out, d_in = w.shape
    out = []
    for rank in ranks:
        if rank > min(d_in, d_out):
            break
        s = sparsity + factor_bytes(rank, d_in, d_out) / copy_bytes
        if s >= 1.0:
            break
        tau = thresholds.quantile_from_histogram(hist, s)
        out.append(Split(rank, s, output_error(w, factors, x, col_norm, tau, rank)))
    return out


def best_split(splits: Sequence[Split]) -> Split:
    """The split of least output error (rank 0 on ties: it costs no extra reads)."""
    return min(splits, key=lambda sp: (sp.error, sp.rank))
