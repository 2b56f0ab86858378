"""Architectures beyond llama: the converter and the runtime on qwen3, gemma, gemma2, gemma3 and
mistral3 graphs. No such model is in the registries, so each is SmolLM2's weights re-labelled as
that architecture (helpers.derive_arch): llama.cpp then builds that architecture's graph (its
norms, rope, attention scaling, GELU for the gemmas) around real weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from actsparse import engine, tool_output
from actsparse.data import calibration_corpus
from helpers import checked_decode_stats, derive_arch, run_cli, run_converter

ARCHS = ["qwen3", "gemma", "gemma2", "gemma3", "mistral3"]
LEVEL = 0.6


def prefill_rows(stats_file: Path) -> dict[int, list[float]]:
    """Per-layer prefill sparsity of a --sparse-stats-file: layer -> [ffn, attn_q_in, attn_o_in]."""
    layers = tool_output.sparsity_stats(stats_file, "prefill")["layers"]
    return {row["layer"]: [row["ffn"], row["attn_q_in"], row["attn_o_in"]] for row in layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_converts_and_runs_sparse(small_model_path: Path, tmp_path: Path, arch: str) -> None:
    src = tmp_path / f"{arch}.gguf"
    derive_arch(small_model_path, arch, src)
    out = tmp_path / f"{arch}.sparse.gguf"
    text = tmp_path / "calib.txt"
    text.write_text(calibration_corpus().text[:8000])  # about 7 windows of 256 tokens, all used
    run_converter(src, "-o", out, "--calib-file", text, "--calib-tokens", 4096, "--window", 256,
                  "--sparsity", f"0.3,{LEVEL}", "--transposed-type", "q8_0", "-q", check=True)  # fmt: skip

    info = json.loads(run_cli("inspect", out, "--json").stdout)
    assert info["arch"] == arch and info["n_layer"] == 30
    assert all(la["ffn_channels"] == 1536 and la["attn_q"] and la["attn_o"] for la in info["layers"])

    # On the calibration text itself every layer's FFN realizes its target: the runtime applies
    # the activation (GELU for the gemmas) and the thresholds as calibration measured them. The
    # attention inputs drift more (calibration ran dense; here every earlier layer is sparse).
    proc = subprocess.run(
        [str(engine.binary("llama-perplexity")), "-m", str(out), "-f", str(text), "-c", "256",
         "-t", "2", "--sparse", str(LEVEL), "--sparse-stats-file", str(tmp_path / "sparsity.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = prefill_rows(tmp_path / "sparsity.json")
    assert sorted(rows) == list(range(30))
    for layer, (ffn, q_in, o_in) in rows.items():
        assert abs(ffn - LEVEL) <= 0.03, (layer, ffn)
        assert abs(q_in - LEVEL) <= 0.15 and abs(o_in - LEVEL) <= 0.15, (layer, q_in, o_in)

    # Decode through the sparse kernels equals the dense product of the same masked inputs.
    stats = checked_decode_stats(out, LEVEL, threads=2, tokens=8)
    assert stats["decode_check"]["products"] >= 30 * 3 * 7
    assert stats["decode_check"]["max_rel_err"] < 1e-4
    assert stats["overall"]["ffn"] > 0.3


def test_fused_gate_up_is_refused_naming_the_architecture(small_model_path: Path, tmp_path: Path) -> None:
    """phi3 GGUFs carry gate and up fused in one ffn_up: no separate gate to threshold."""
    from actsparse import gguf_io

    src = tmp_path / "phi3.gguf"
    derive_arch(small_model_path, "phi3", src)
    fused = tmp_path / "phi3-fused.gguf"
    gguf_io.write_model(gguf_io.open_gguf(src), "phi3", fused, {}, [], drop=lambda n: ".ffn_gate." in n)
    proc = run_converter(fused, "-o", tmp_path / "out.gguf", "--calib-tokens", 1024, "-q")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "phi3" in lines[0] and "ffn_gate" in lines[0], proc.stderr
    assert not (tmp_path / "out.gguf").exists()


def _ggml_gelu(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU as the pinned tree computes it (ggml-cpu/vec.h, GGML_GELU_FP16): the input
    rounded to fp16 indexes a table of the tanh formula rounded to fp16; |x| >= 10 passes or zeroes."""
    h = x.astype(np.float16).astype(np.float32)
    c = np.float32(0.7978845608028654)
    table = (
        np.float32(0.5)
        * h
        * (np.float32(1) + np.tanh(c * h * (np.float32(1) + np.float32(0.044715) * h * h)))
    )
    y = table.astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, y))


def test_calibrator_computes_the_activation_as_the_runtime_does(
    small_model_path: Path, tmp_path: Path
) -> None:
    """On a GELU architecture the calibrator's activations are ggml's GELU of the gate (the op the
    runtime thresholds: an fp16 table), not the exact tanh formula, which differs from it."""
    from actsparse import calibration

    src = tmp_path / "gemma.gguf"
    derive_arch(small_model_path, "gemma", src)
    stats = calibration.collect(
        src, calibration_corpus().text[:20000], tokens=128, window=128, threads=2, chess=False,
        dump_layers=(0, 17), dump_tokens=128,
    )  # fmt: skip
    assert stats.activation == "gelu"
    for il in (0, 17):
        gate, act = stats.layers[il].dumps["ffn_gate"], stats.layers[il].dumps["ffn_act"]
        assert gate.shape == act.shape == (128, 1536)
        expected = _ggml_gelu(gate)
        same = np.mean(act == expected)
        assert same >= 0.999, same  # tanh's last bit may round an fp16 the other way, rarely
        np.testing.assert_allclose(act, expected, rtol=2e-3, atol=1e-6)
        c = 0.7978845608028654
        exact = 0.5 * gate * (1 + np.tanh(c * gate * (1 + 0.044715 * gate * gate)))
        assert np.mean(act != exact.astype(np.float32)) > 0.5  # the formula the calibrator used to apply
