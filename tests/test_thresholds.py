"""Threshold methods against their definitions (METHODS.md §1-2)."""

from __future__ import annotations

import numpy as np
import pytest

from actsparse import allocation, calibration, column_norms, convert, gguf_io, schema, thresholds, transpose
from actsparse.data import calibration_corpus

BIN_REL_WIDTH = 2.0**-7
CHESS_KINDS = schema.sparse_kinds("chess", True)


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_histogram_quantile_matches_exact_quantile(q: float) -> None:
    rng = np.random.default_rng(0)
    x = (rng.lognormal(-2.0, 1.5, 200_000) * rng.choice([-1, 1], 200_000)).astype(np.float32)
    exact = float(np.quantile(np.abs(x), q))
    approx = thresholds.quantile_from_histogram(thresholds.histogram_of(x), q)
    assert abs(approx - exact) <= BIN_REL_WIDTH * exact
    # what matters downstream: the fraction of values at or below the threshold
    assert abs(np.mean(np.abs(x) <= approx) - q) < 2e-3


def test_chess_thresholds_are_tau_over_m() -> None:
    rng = np.random.default_rng(1)
    m = rng.uniform(0.1, 2.0, 64)
    m[3] = 0.0  # a dead channel
    a = rng.standard_normal((1000, 64)).astype(np.float32)
    scores = np.abs(a) * m.astype(np.float32)
    t = thresholds.chess_thresholds(m, thresholds.histogram_of(scores), [0.25, 0.5])
    assert t.shape == (2, 64)
    for k, s in enumerate([0.25, 0.5]):
        tau = thresholds.quantile_from_histogram(thresholds.histogram_of(scores), s)
        live = m > 0
        np.testing.assert_allclose(t[k, live] * m[live], tau, rtol=1e-6)
        assert t[k, 3] == np.float32(thresholds.FLT_MAX)
        realized = np.mean(np.abs(a) <= t[k])
        assert abs(realized - s) < 0.01


def test_cats_is_one_threshold_per_level() -> None:
    x = np.linspace(-1, 1, 10001, dtype=np.float32)
    t = thresholds.cats_thresholds(thresholds.histogram_of(x), [0.5])
    assert t.shape == (1, 1)
    assert abs(float(t[0, 0]) - 0.5) < 0.5 * BIN_REL_WIDTH


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.2", "abc", "nan", ""])
def test_parse_levels_rejects_out_of_range(bad: str) -> None:
    with pytest.raises(ValueError):
        thresholds.parse_levels(bad)


def test_parse_levels_sorts_and_dedups() -> None:
    assert thresholds.parse_levels("0.7, 0.3,0.5,0.3") == [0.3, 0.5, 0.7]


def test_engine_thresholds_equal_their_definition(small_model_path, tmp_path) -> None:
    """Thresholds from the engine's histograms equal those recomputed exactly in numpy from the
    activations the engine dumped for the same tokens."""
    layers = (0, 11, 29)
    text = calibration_corpus().text[:20000]
    stats = calibration.collect(
        small_model_path, text, tokens=256, window=128, threads=2, chess=True,
        dump_layers=layers, dump_tokens=256,
    )  # fmt: skip
    assert stats.tokens == 256
    levels = [0.3, 0.5, 0.7]
    for il in layers:
        ls = stats.layers[il]
        a, u = ls.dumps["ffn_act"].astype(np.float64), ls.dumps["ffn_up"].astype(np.float64)
        assert a.shape == u.shape == (256, ls.mean_abs_up.size)
        m = np.abs(u).mean(axis=0)
        np.testing.assert_allclose(ls.mean_abs_up, m, rtol=1e-5)

        chess = thresholds.chess_thresholds(ls.mean_abs_up, ls.score_hist, levels)
        cats = thresholds.cats_thresholds(ls.act_hist, levels)
        q_in = thresholds.layer_thresholds(ls.q_in_hist, levels)
        o_in = thresholds.layer_thresholds(ls.o_in_hist, levels)
        for k, s in enumerate(levels):
            tau = np.quantile(np.abs(a) * m, s)
            np.testing.assert_allclose(chess[k], tau / m, rtol=BIN_REL_WIDTH)
            assert abs(np.mean(np.abs(a) <= chess[k]) - s) < 0.01
            assert cats[k, 0] == pytest.approx(np.quantile(np.abs(a), s), rel=BIN_REL_WIDTH)
            assert q_in[k, 0] == pytest.approx(
                np.quantile(np.abs(ls.dumps["attn_q_in"]), s), rel=BIN_REL_WIDTH
            )
            assert o_in[k, 0] == pytest.approx(
                np.quantile(np.abs(ls.dumps["attn_o_in"]), s), rel=BIN_REL_WIDTH
            )


def test_one_pass_scores_match_the_exact_score_histogram(small_model_path, tmp_path) -> None:
    """The dense pass builds the CHESS score histogram from per-channel histograms of |a_i| (E|u_i|
    is known only at the end). Collecting the scores exactly, with that E|u_i| given up front
    (--mean-abs-up, the sparse-aware pass's mode) over the same tokens, gives the same quantiles:
    the fraction of exact scores below each one-pass tau stays within 0.002 of the level."""
    text = calibration_corpus().text[:60000]
    one_pass = calibration.collect(
        small_model_path, text, save_to=tmp_path / "dense.gguf", tokens=2048, window=256, threads=2
    )
    exact = calibration.collect(
        small_model_path, text, tokens=2048, window=256, threads=2,
        mean_abs_up_from=tmp_path / "dense.gguf",
    )  # fmt: skip
    edges = thresholds.bin_edges()
    worst = 0.0
    for approx, ref in zip(one_pass.layers, exact.layers, strict=True):
        np.testing.assert_array_equal(approx.act_hist, ref.act_hist)  # the same activations
        cum = np.concatenate([[0.0], np.cumsum(ref.score_hist)]) / ref.score_hist.sum()
        for s in (0.3, 0.5, 0.7):
            tau = thresholds.quantile_from_histogram(approx.score_hist, s)
            b = int(np.searchsorted(edges, tau, side="right")) - 1
            below = cum[b] + (cum[b + 1] - cum[b]) * (tau - edges[b]) / (edges[b + 1] - edges[b])
            worst = max(worst, abs(below - s))
    assert worst < 0.002, f"largest quantile-rank error {worst:.4f}"


def test_weighted_thresholds_equal_their_definition(small_model_path, tmp_path) -> None:
    """--weighted-scores: thresholds from the engine's histograms of |a_i| E|u_i| ||W_down[:, i]||
    and |x_i| ||W[:, i]|| equal those recomputed in numpy from the dumped activations and the
    weights' column norms, and each skips the level's fraction of the weighted scores."""
    info = gguf_io.describe_model(gguf_io.open_gguf(small_model_path), small_model_path)
    norms = column_norms.column_norms(info, CHESS_KINDS)
    norms_file = tmp_path / "norms.gguf"
    column_norms.write_column_norms(norms_file, norms)
    layers = (0, 17, 29)
    stats = calibration.collect(
        small_model_path, calibration_corpus().text[:20000], tokens=256, window=128, threads=2,
        dump_layers=layers, dump_tokens=256, column_norms=norms_file,
    )  # fmt: skip
    assert stats.weighted_scores
    levels = [0.3, 0.5, 0.7]
    targets = allocation.uniform(levels, info.n_layer)
    made = {t.name: t.make() for t in convert.threshold_tensors(info, stats, targets, "chess", True)}
    for il in layers:
        ls = stats.layers[il]
        w = {kind.name: norms[column_norms.tensor_name(kind, il)].astype(np.float64) for kind in CHESS_KINDS}
        for kind in CHESS_KINDS:  # the statistics carry the norms they were weighted by
            np.testing.assert_array_equal(ls.col_norms[kind.name], w[kind.name])
        a, u = ls.dumps["ffn_act"].astype(np.float64), ls.dumps["ffn_up"].astype(np.float64)
        scale = np.abs(u).mean(axis=0) * w["ffn"]
        inputs = {
            schema.FFN: (np.abs(a), scale),
            schema.ATTN_Q_IN: (np.abs(ls.dumps["attn_q_in"]).astype(np.float64), w["attn_q_in"]),
            schema.ATTN_O_IN: (np.abs(ls.dumps["attn_o_in"]).astype(np.float64), w["attn_o_in"]),
        }
        for kind, (x, factor) in inputs.items():
            t = made[kind.thresh_name(il)]
            assert t.shape == (len(levels), x.shape[1])
            for k, s in enumerate(levels):
                tau = np.quantile(x * factor, s)
                np.testing.assert_allclose(t[k], tau / factor, rtol=2 * BIN_REL_WIDTH)
                assert abs(np.mean(x <= t[k]) - s) < 0.01, (kind.name, il, s)


def test_column_norms_are_the_weight_columns_norms(small_model_path) -> None:
    """||W[:, i]|| per input of each sparse product, from the file's own quantized weights."""
    info = gguf_io.describe_model(gguf_io.open_gguf(small_model_path), small_model_path)
    norms = column_norms.column_norms(info, CHESS_KINDS)
    assert len(norms) == 3 * info.n_layer
    for kind in CHESS_KINDS:
        w = transpose.dequantized(info.tensor(kind.weight_name(5))).astype(np.float64)
        n = norms[column_norms.tensor_name(kind, 5)]
        assert n.shape == (w.shape[1],) and (n > 0).all()
        np.testing.assert_allclose(n, [np.linalg.norm(w[:, i]) for i in range(w.shape[1])], rtol=1e-5)
