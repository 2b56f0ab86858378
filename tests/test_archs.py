"""Architectures beyond llama: the converter and the runtime on qwen3, gemma, gemma2, gemma3 and
mistral3 graphs. No such model is in the registries, so each is SmolLM2's weights re-labelled as
that architecture (helpers.derive_arch): llama.cpp then builds that architecture's graph (its
norms, rope, attention scaling, GELU for the gemmas) around real weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actsparse import engine
from actsparse.data import calibration_corpus
from helpers import REPO, derive_arch, run_cli, run_converter

ARCHS = ["qwen3", "gemma", "gemma2", "gemma3", "mistral3"]
LEVEL = 0.6


def prefill_table(stderr: str) -> dict[int, list[float]]:
    """Per-layer rows of --sparse-stats' prefill table: layer -> [ffn, attn_q_in, attn_o_in]."""
    table = stderr.split("realized sparsity during prefill", 1)[1]
    rows = {}
    for m in re.finditer(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$", table, re.M):
        rows[int(m.group(1))] = [float(m.group(i)) for i in (2, 3, 4)]
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_converts_and_runs_sparse(small_model_path: Path, tmp_path: Path, arch: str) -> None:
    src = tmp_path / f"{arch}.gguf"
    derive_arch(small_model_path, arch, src)
    out = tmp_path / f"{arch}.sparse.gguf"
    text = tmp_path / "calib.txt"
    text.write_text(calibration_corpus().text[:8000])  # about 7 windows of 256 tokens, all used
    run_converter(src, "-o", out, "--calib-file", text, "--calib-tokens", 4096, "--window", 256,
                  "--sparsity", f"0.3,{LEVEL}", "-q", check=True)  # fmt: skip

    info = json.loads(run_cli("inspect", out, "--json").stdout)
    assert info["arch"] == arch and info["n_layer"] == 30
    assert all(la["ffn_channels"] == 1536 and la["attn_q"] and la["attn_o"] for la in info["layers"])

    # On the calibration text itself every layer's FFN realizes its target: the runtime applies
    # the activation (GELU for the gemmas) and the thresholds as calibration measured them. The
    # attention inputs drift more (calibration ran dense; here every earlier layer is sparse).
    proc = subprocess.run(
        [str(engine.binary("llama-perplexity")), "-m", str(out), "-f", str(text), "-c", "256",
         "-t", "2", "--sparse", str(LEVEL), "--sparse-stats"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = prefill_table(proc.stderr)
    assert sorted(rows) == list(range(30))
    for layer, (ffn, q_in, o_in) in rows.items():
        assert abs(ffn - LEVEL) <= 0.03, (layer, ffn)
        assert abs(q_in - LEVEL) <= 0.15 and abs(o_in - LEVEL) <= 0.15, (layer, q_in, o_in)

    # Decode through the sparse kernels equals the dense product of the same masked inputs.
    code = (
        "import sys, json, actsparse\n"
        f"llm = actsparse.Llama(sys.argv[1], sparse={LEVEL}, n_ctx=256, n_threads=2, verbose=False)\n"
        "llm('The history of the city', max_tokens=8, temperature=0.0)\n"
        "print(json.dumps(actsparse.sparse_stats(llm)))\n"
    )
    env = {
        **os.environ, "ACTSPARSE_CHECK_DECODE": "1", "ACTSPARSE_DECODE_KERNELS": "all",
        "PYTHONPATH": str(REPO / "python"),
    }  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
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
