"""The F16 workflow real users start from: F16 GGUF -> thresholds -> llama-quantize once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from actsparse import engine, gguf_io
from actsparse.transpose import dequantized
from helpers import run_converter

Q = GGMLQuantizationType


def export_f16(src: Path, dst: Path) -> None:
    """Re-export a GGUF with every 2-D weight as F16 (values keep the source's rounding)."""
    r = GGUFReader(src)
    arch = str(gguf_io.field_value(r, "general.architecture"))
    w = GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        value = f.contents()
        if f.name == "general.file_type":
            value = 1  # MOSTLY_F16
        w.add_key_value(f.name, value, vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        x = dequantized(t)
        w.add_tensor(t.name, x.astype(np.float16) if x.ndim == 2 and x.shape[0] > 1 else x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def f16_model(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("f16") / "smol-f16.gguf"
    export_f16(small_model_path, out)
    return out


def test_f16_input_keeps_exact_transposed_copies(f16_model: Path, tmp_path: Path) -> None:
    sparse = tmp_path / "smol-f16.sparse.gguf"
    # no sparse-aware pass: it moves thresholds only, which this test does not look at
    run_converter(f16_model, "-o", sparse, "--calib-tokens", 1024, "--refine-tokens", 0, "-q", check=True)
    t = {x.name: x for x in GGUFReader(sparse).tensors}
    for kind in ("ffn_down", "attn_q", "attn_output"):
        orig, tr = t[f"blk.2.{kind}.weight"], t[f"blk.2.{kind}_t.weight"]
        assert orig.tensor_type == tr.tensor_type == Q.F16
        assert np.array_equal(dequantized(tr), dequantized(orig).T), "an F16 transpose must be exact"

    quantized = tmp_path / "smol-q8.sparse.gguf"
    proc = subprocess.run(
        [str(engine.binary("llama-quantize")), str(sparse), str(quantized), "Q4_0", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    q = {x.name: x for x in GGUFReader(quantized).tensors}
    for il in range(30):
        for kind in ("ffn_down", "attn_q", "attn_output"):
            orig, tr = q[f"blk.{il}.{kind}.weight"], q[f"blk.{il}.{kind}_t.weight"]
            assert tr.tensor_type == orig.tensor_type, (il, kind, orig.tensor_type, tr.tensor_type)
        assert q[f"blk.{il}.ffn_act_thresh"].tensor_type == Q.F32
        np.testing.assert_array_equal(
            np.asarray(q[f"blk.{il}.ffn_act_thresh"].data), np.asarray(t[f"blk.{il}.ffn_act_thresh"].data)
        )
    gen = subprocess.run(
        [str(engine.binary("llama-completion")), "-m", str(quantized), "-p", "Paris is", "-n", "8", "-t", "2",
         "--temp", "0", "-no-cnv"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
