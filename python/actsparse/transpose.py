"""Transposed weight copies for the input-sparse kernels (ffn_down, attn_q, attn_output).

A quantized weight is dequantized (gguf-py), transposed, and quantized again with ggml's own
quantizer from this project's build (ctypes on libggml-base), so the copy is exactly what
llama-quantize would produce for that type.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from . import engine

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# Where a K-quant's 256-element blocks don't divide the new row length, use what llama-quantize
# falls back to for the same type.
K_FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.IQ4_NL, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ4_XS: Q.IQ4_NL,
}  # fmt: skip
TRANSPOSED_TYPE_CHOICES = ("same", "q8_0", "f16")


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(engine.bin_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a float32 [n_rows, n_per_row] array with ggml; returns the raw bytes (uint8)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if qtype == Q.F32:
        return rows.view(np.uint8).reshape(n_rows, -1)
    if qtype == Q.F16:
        return rows.astype(np.float16).view(np.uint8).reshape(n_rows, -1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty((n_rows, n_per_row // block * type_size), dtype=np.uint8)
    lib = _ggml()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def transposed_type(src: GGMLQuantizationType, n_per_row: int, policy: str) -> GGMLQuantizationType:
    """The type of the transposed copy of a `src` weight whose new rows have n_per_row elements."""
    if src in FLOAT_TYPES:
        return src  # float inputs keep their type: llama-quantize quantizes the copy later
    if policy == "q8_0":
        want = Q.Q8_0
    elif policy == "f16":
        want = Q.F16
    elif policy == "same":
        want = src
        if _ggml().ggml_quantize_requires_imatrix(int(src)):
            want = Q.Q8_0  # no importance matrix at hand: keep precision instead
    else:
        raise ValueError(
            f"unknown --transposed-type '{policy}' (choose from {', '.join(TRANSPOSED_TYPE_CHOICES)})"
        )
    if n_per_row % GGML_QUANT_SIZES[want][0]:
        want = K_FALLBACK.get(want, Q.Q8_0)
    if n_per_row % GGML_QUANT_SIZES[want][0]:
        want = Q.F16
    return want


def dequantized(t: ReaderTensor) -> np.ndarray:
    """A weight as float32 [ne1, ne0] (one output channel per row, as ggml stores it)."""
    shape = [int(x) for x in reversed(t.shape)]
    if t.tensor_type == Q.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == Q.F16:
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)


def transposed_copy(t: ReaderTensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Bytes of W^T in qtype: ggml shape [ne1, ne0] of the original, row j = input channel j."""
    if t.tensor_type == Q.BF16 and qtype == Q.BF16:
        raw = np.asarray(t.data).view(np.uint16).reshape(int(t.shape[1]), int(t.shape[0]))
        return np.ascontiguousarray(raw.T).view(np.uint8)
    w = dequantized(t)
    return quantize_rows(np.ascontiguousarray(w.T), qtype)
