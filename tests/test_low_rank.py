"""R-Sparse's low-rank term measured against its definition, on a real weight of the test model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actsparse import gguf_io, low_rank, schema, thresholds, transpose


@pytest.fixture(scope="module")
def weight(small_model_path: Path) -> np.ndarray:
    info = gguf_io.describe_model(gguf_io.open_gguf(small_model_path), small_model_path)
    return transpose.dequantized(info.tensor(schema.ATTN_O_IN.weight_name(3)))


def test_factors_are_the_best_approximation_of_each_rank(weight: np.ndarray) -> None:
    f = low_rank.Factors.of(weight)
    x = np.random.default_rng(0).standard_normal((16, weight.shape[1])).astype(np.float32)
    np.testing.assert_allclose(f.apply(x, len(f.s)), x @ weight.T, rtol=1e-3, atol=1e-3)
    assert not f.apply(x, 0).any()
    total = np.square(weight, dtype=np.float64).sum()
    for r in (1, 8, 64):
        approx = f.apply(np.eye(weight.shape[1], dtype=np.float32), r).T  # the rank-r matrix itself
        # Eckart-Young: what a rank-r approximation misses is the energy of the dropped singular values
        missed = np.square(weight - approx, dtype=np.float64).sum()
        assert missed == pytest.approx(np.square(f.s[r:], dtype=np.float64).sum(), rel=1e-3)
        assert missed < total


def test_output_error_follows_the_runtime_mask(weight: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, weight.shape[1])).astype(np.float32)
    c = np.sqrt(np.square(weight).sum(axis=0))
    f = low_rank.Factors.of(weight)
    assert low_rank.output_error(weight, f, x, c, -1.0, 0) == 0.0  # nothing dropped
    assert low_rank.output_error(weight, f, x, c, np.inf, 0) == pytest.approx(1.0)  # everything dropped
    assert low_rank.output_error(weight, f, x, c, np.inf, len(f.s)) < 1e-5  # all of it recovered
    tau = float(np.quantile(np.abs(x) * c, 0.5))
    kept = np.where(np.abs(x) * c > tau, x, 0.0)
    want = np.square((x - kept) @ weight.T).sum() / np.square(x @ weight.T).sum()
    assert low_rank.output_error(weight, f, x, c, tau, 0) == pytest.approx(want, rel=1e-4)
    # a rank recovers part of the dropped output, more with more rank
    errors = [low_rank.output_error(weight, f, x, c, tau, r) for r in (0, 8, 64)]
    assert errors[0] > errors[1] > errors[2]


def test_splits_read_what_rank_0_reads(weight: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, weight.shape[1])).astype(np.float32)
    c = np.sqrt(np.square(weight).sum(axis=0))
    hist = thresholds.histogram_of((np.abs(x) * c).reshape(-1))
    d_out, d_in = weight.shape
    copy_bytes = d_in * d_out  # an 8-bit copy, give or take its scales
    splits = low_rank.splits_at_equal_bytes(weight, low_rank.Factors.of(weight), x, c, hist, 0.5, copy_bytes)
    assert [sp.rank for sp in splits][:2] == [0, low_rank.RANKS[1]]
    for sp in splits:
        extra = low_rank.factor_bytes(sp.rank, d_in, d_out)
        assert (1 - sp.sparsity) * copy_bytes + extra == pytest.approx(0.5 * copy_bytes)
        assert sp.sparsity < 1.0
    best = low_rank.best_split(splits)
    assert best.error == min(sp.error for sp in splits)
