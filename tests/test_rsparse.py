"""R-Sparse (--method r-sparse): the input of every projection sparsified by the weight-aware score
|x_i| ||W[:, i]||, through the same runtime as CHESS's attention inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse import (
    allocation,
    calibration,
    column_norms,
    convert,
    engine,
    gguf_io,
    schema,
    thresholds,
    tool_output,
)
from actsparse.benchmark import weight_bytes_per_token
from actsparse.data import calibration_corpus, heldout_corpus
from actsparse.sparse_file import read_sparse_file
from helpers import DECODE_CHECK_TOLERANCE, checked_decode_stats, run_cli, run_converter

RSPARSE_KINDS = schema.sparse_kinds("r-sparse", True)
BIN_REL_WIDTH = 2.0**-7


def test_the_file_carries_every_projection_s_input_thresholds_and_copies(
    small_rsparse_model: Path, small_model_path: Path
) -> None:
    f = read_sparse_file(small_rsparse_model)
    assert f.method == "r-sparse" and f.weighted_scores and f.levels == [0.3, 0.5]
    assert {k.name for k in f.kinds} == {"attn_q_in", "attn_k_in", "attn_v_in", "attn_o_in",
                                         "ffn_gate_in", "ffn_up_in", "ffn_down_in"}  # fmt: skip
    tensors = {t.name: t for t in GGUFReader(small_rsparse_model).tensors}
    source = {t.name: t for t in GGUFReader(small_model_path).tensors}
    for il in range(f.model.n_layer):
        assert schema.FFN.thresh_name(il) not in tensors  # no CHESS channels beside ffn_down's input
        for kind in f.kinds:
            w = source[kind.weight_name(il)]
            t = tensors[kind.thresh_name(il)]
            # one threshold per input of the product, per level (ggml [ne0, ne1] = [inputs, levels])
            assert [int(x) for x in t.shape] == [int(w.shape[0]), 2], kind.name
            copy = tensors[kind.copy_name(il)]
            assert [int(x) for x in copy.shape] == [int(w.shape[1]), int(w.shape[0])], kind.name
        # the originals are kept byte for byte
        for kind in f.kinds:
            name = kind.weight_name(il)
            assert np.array_equal(np.asarray(tensors[name].data), np.asarray(source[name].data))


def test_thresholds_equal_their_definition(small_model_path: Path, tmp_path: Path) -> None:
    """k and v read the q input's node: their thresholds from the engine's histograms equal the
    quantiles of |x_i| ||W[:, i]|| recomputed in numpy from the dumped inputs and the weights."""
    info = gguf_io.describe_model(gguf_io.open_gguf(small_model_path), small_model_path)
    norms = column_norms.column_norms(info, RSPARSE_KINDS)
    norms_file = tmp_path / "norms.gguf"
    column_norms.write_column_norms(norms_file, norms)
    layers = (0, 29)
    stats = calibration.collect(
        small_model_path, calibration_corpus().text[:20000], tokens=256, window=128, threads=2, chess=False,
        dump_layers=layers, dump_tokens=256, column_norms=norms_file,
    )  # fmt: skip
    levels = [0.3, 0.5, 0.7]
    made = {
        t.name: t.make()
        for t in convert.threshold_tensors(
            info, stats, allocation.uniform(levels, info.n_layer), "r-sparse", True
        )
    }
    for il in layers:
        x = np.abs(stats.layers[il].dumps["attn_q_in"]).astype(np.float64)
        for kind in (schema.ATTN_Q_IN, schema.ATTN_K_IN, schema.ATTN_V_IN):
            w = norms[column_norms.tensor_name(kind, il)].astype(np.float64)
            t = made[kind.thresh_name(il)]
            for k, s in enumerate(levels):
                tau = np.quantile(x * w, s)
                np.testing.assert_allclose(t[k], tau / w, rtol=2 * BIN_REL_WIDTH)
                assert abs(np.mean(x <= t[k]) - s) < 0.01, (kind.name, il, s)
        # every other kind: thresholds are tau / ||W[:, i]||, tau its histogram's s-quantile
        ls = stats.layers[il]
        for kind in RSPARSE_KINDS:
            hist, w = ls.input_hist(kind), ls.col_norms[kind.name]
            assert hist is not None and hist.sum() == 256 * w.size, kind.name
            t = made[kind.thresh_name(il)]
            for k, s in enumerate(levels):
                np.testing.assert_allclose(t[k] * w, thresholds.quantile_from_histogram(hist, s), rtol=1e-5)


def test_decode_kernels_equal_the_dense_product_with_the_same_mask(small_rsparse_model: Path) -> None:
    """Every sparse decode product (seven per layer) computed a second time densely from the same
    masked input."""
    stats = checked_decode_stats(small_rsparse_model, 0.5, threads=3, tokens=12)
    check = stats["decode_check"]
    assert check["products"] >= 30 * 7 * 11
    assert check["max_rel_err"] < DECODE_CHECK_TOLERANCE["q8_0"], check
    for kind in RSPARSE_KINDS:
        assert 0.3 < stats["overall"][kind.name] < 0.7, (kind.name, stats["overall"])
    assert stats["overall"]["ffn"] is None


def test_held_out_text_realizes_each_kind_s_level(small_rsparse_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text(heldout_corpus().text[:60000])
    stats_file = tmp_path / "stats.json"
    cmd = [str(engine.binary("llama-perplexity")), "-m", str(small_rsparse_model), "-f", str(text),
           "-c", "256", "--chunks", "8", "-t", "2", "--sparse", "0.5",
           "--sparse-stats", "--sparse-stats-file", str(stats_file)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    layers = tool_output.sparsity_stats(stats_file, "prefill")["layers"]
    for kind in RSPARSE_KINDS:
        got = np.array([row[kind.name] for row in layers])
        # 2,048 calibration tokens: the worst layer missed by 0.101 (o input), the mean by 0.006
        assert abs(got.mean() - 0.5) < 0.03 and np.max(np.abs(got - 0.5)) < 0.15, (kind.name, got.round(3))
    assert "ffn_gate_in" in proc.stderr  # the printed table has a column per kind of the file


def test_decode_bytes_count_every_projection_s_copy(small_rsparse_model: Path) -> None:
    tensors = {t.name: t for t in GGUFReader(small_rsparse_model).tensors}
    dense = weight_bytes_per_token(small_rsparse_model)
    # Q8_0 copies of Q4_1 weights pay from about 0.53 on (the copy-cost rule): 0.5 reads the originals
    for s in (0.5, 0.7):
        expected = dense
        for il in range(30):
            for kind in RSPARSE_KINDS:
                w, copy = tensors[kind.weight_name(il)].n_bytes, tensors[kind.copy_name(il)].n_bytes
                if schema.sparse_kernel_pays(s, copy, w):
                    expected += (1 - s) * copy - w
        got = weight_bytes_per_token(small_rsparse_model, {k.name: s for k in RSPARSE_KINDS}, level=s)
        assert got == pytest.approx(expected), s
    assert got < dense


def test_bench_prices_a_level_where_no_copy_pays(small_rsparse_model: Path) -> None:
    """At 0.5 no Q8_0 copy of these Q4_1 weights pays: decode multiplies the originals by the masked
    inputs, gathers nothing, and the bytes model reads the dense bytes."""
    from actsparse.benchmark import decode_reads, realized_sparsity

    overall, activity = realized_sparsity(small_rsparse_model, 0.5, threads=2)
    assert all(abs(overall[k.name] - 0.5) < 0.2 for k in RSPARSE_KINDS), overall
    assert all(layers == [] for layers in activity.values())
    reads = decode_reads(small_rsparse_model, 0.5, activity)
    assert all(r.active is None for r in reads)
    assert sum(r.nbytes for r in reads) == pytest.approx(weight_bytes_per_token(small_rsparse_model))


def test_inspect_names_the_kinds(small_rsparse_model: Path) -> None:
    proc = run_cli("inspect", small_rsparse_model)
    assert proc.returncode == 0, proc.stderr
    assert "method:      r-sparse" in proc.stdout and "s@gate" in proc.stdout and "s@down" in proc.stdout


def test_statistics_of_another_method_are_refused(
    small_model_path: Path, small_sparse_dir: Path, tmp_path: Path
) -> None:
    """CHESS's saved statistics lack the weighted scores R-Sparse needs: one line, exit 2."""
    out = tmp_path / "x.gguf"
    proc = run_converter(
        small_model_path,
        "-o",
        out,
        "--method",
        "r-sparse",
        "--load-stats",
        small_sparse_dir / "stats.gguf",
        "-q",
    )
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )


def test_decode_and_batched_prefill_compute_the_same_function(small_rsparse_model: Path) -> None:
    """Token-by-token decode through the input-sparse kernels against one batched prefill replaying
    the masks decode applied (test_runtime's check, on every projection's input)."""
    from test_runtime import stepwise_vs_batched

    m = stepwise_vs_batched(small_rsparse_model, "all", kinds=tuple(k.name for k in RSPARSE_KINDS))
    assert all(c["max_diff"] == 0.0 for c in m["dense_after_layout"]), m
    assert m["replay_zeroed"] == pytest.approx(m["decode_zeroed"], abs=1e-9), m
    assert all(abs(z - 0.5) < 0.1 for z in m["decode_zeroed"]), m
    dense, same = m["dense"], m["same_masks"]
    assert same["kld"] <= 1.5 * dense["kld"] + 1e-3, m
    assert same["top1"] >= dense["top1"] - 0.04, m
    assert same["kld"] < 0.25 * m["own_masks"]["kld"], m
