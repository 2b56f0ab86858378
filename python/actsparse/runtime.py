"""Sparse decoding from Python: llama-cpp-python on this project's libllama.

    import actsparse
    llm = actsparse.Llama("model.sparse.gguf", sparse=0.5)   # or sparse=True for the file's default
    actsparse.enable_sparse(existing_llama, 0.5)             # an existing llama_cpp.Llama

The binding's C structs are untouched: the level is set through actsparse_set_sparse(), which our
libllama exports (native/include/actsparse.h). A llama_cpp.Llama made elsewhere runs sparse levels
correctly too, but its decode reads single ffn_up rows only if it was loaded with
kv_overrides={"actsparse.plain_up_rows": True}, as actsparse.Llama loads it; otherwise ffn_up sits
in the CPU backend's repacked buffers and decode multiplies it densely.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

from . import engine, schema


class SparseError(ValueError):
    """The model cannot run at the requested sparsity level."""


def _lib() -> ctypes.CDLL:
    lib = engine.llama_cpp().llama_cpp._lib
    if not getattr(lib, "_actsparse_ready", False):
        lib.actsparse_set_sparse.restype = ctypes.c_int
        lib.actsparse_set_sparse.argtypes = [
            ctypes.c_void_p,
            ctypes.c_float,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.actsparse_set_sparse_prompt.restype = None
        lib.actsparse_set_sparse_prompt.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.actsparse_stats_json.restype = ctypes.c_int
        lib.actsparse_stats_json.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.actsparse_model_n_levels.restype = ctypes.c_int
        lib.actsparse_model_n_levels.argtypes = [ctypes.c_void_p]
        lib.actsparse_model_level.restype = ctypes.c_float
        lib.actsparse_model_level.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.actsparse_model_default_level.restype = ctypes.c_float
        lib.actsparse_model_default_level.argtypes = [ctypes.c_void_p]
        lib.actsparse_mask_trace.restype = None
        lib.actsparse_mask_trace.argtypes = [ctypes.c_int]
        lib.actsparse_mask_trace_get.restype = ctypes.c_int64
        lib.actsparse_mask_trace_get.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
        ]
        lib._actsparse_ready = True
    return lib


def model_levels(llm: Any) -> list[float]:
    """The sparsity levels the loaded model carries ([] without thresholds)."""
    lib = _lib()
    model = llm._model.model
    return [lib.actsparse_model_level(model, i) for i in range(lib.actsparse_model_n_levels(model))]


def enable_sparse(llm: Any, level: float | bool | None = True) -> None:
    """Run `llm` (a llama_cpp.Llama) at `level`.

    True: the file's default level; a number: that level; 0, False or None: dense.
    """
    if level is True:
        value = -1.0
    elif level is None or level is False:
        value = 0.0
    else:
        value = float(level)
    err = ctypes.create_string_buffer(512)
    if _lib().actsparse_set_sparse(llm._ctx.ctx, value, err, len(err)) != 0:
        raise SparseError(err.value.decode())


def set_sparse_prompt(llm: Any, on: bool) -> None:
    """Whether batches of more than one token (a prompt, a scored text) run sparse too.

    Off by default: the prompt runs dense, as in llama.cpp's generating tools, since sparse
    batches are dense products of masked inputs and buy no speed; single-token decodes (generated
    tokens) run sparse. Scoring text turns it on, so that every position is scored at the level.
    """
    _lib().actsparse_set_sparse_prompt(llm._ctx.ctx, bool(on))


def sparse_stats(llm: Any) -> dict[str, Any]:
    """Realized decode sparsity since the level was set: {"layers": [...], "overall": {...}}."""
    lib = _lib()
    n = lib.actsparse_stats_json(llm._ctx.ctx, None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.actsparse_stats_json(llm._ctx.ctx, buf, len(buf))
    return json.loads(buf.value.decode())


TRACE_MODES = {"off": 0, "record": 1, "replay": 2}


def trace_masks(mode: str) -> None:
    """Test hook, process-wide: "record" keeps the masks of single-token decodes, "replay" applies
    them, in order, to the following batches instead of the thresholds, "off" forgets them.

    It lets a test compare decode with batched prefill under identical masks
    (actsparse_mask_trace in native/include/actsparse.h)."""
    _lib().actsparse_mask_trace(TRACE_MODES[mode])


MASK_KINDS = tuple(k.name for k in schema.KINDS)  # sparse_stats' kinds, numbered as the runtime does


def recorded_masks(llm: Any) -> dict[tuple[int, str], np.ndarray]:
    """What trace_masks("record") kept: (layer, kind) -> bool [decoded tokens, inputs], True where
    the input was active. reference.chess_masks(..., replay=...) applies them in transformers."""
    lib = _lib()
    n_layer = engine.llama_cpp().llama_cpp.llama_model_n_layer(llm._model.model)
    out = {}
    for il in range(n_layer):
        for k, kind in enumerate(MASK_KINDS):
            rows = []
            while (n := lib.actsparse_mask_trace_get(il, k, len(rows), None, 0)) >= 0:
                row = np.empty(n, dtype=np.uint8)
                lib.actsparse_mask_trace_get(il, k, len(rows), row.ctypes.data, n)
                rows.append(row)
            if rows:
                out[(il, kind)] = np.stack(rows).astype(bool)
    return out


def Llama(  # noqa: N802
    model_path: str, sparse: float | bool | None = None, sparse_prompt: bool = False, **kwargs: Any
) -> Any:
    """A llama_cpp.Llama on this project's libllama, running at `sparse` (see enable_sparse), its
    prompts dense unless `sparse_prompt` (see set_sparse_prompt)."""
    # ffn_up of the sparse layers in plain rows, which sparse decode reads one by one (a kv
    # override the patched loader reads), so that any level can be selected later
    overrides = {schema.KEY_PLAIN_UP_ROWS: True, **(kwargs.pop("kv_overrides", None) or {})}
    llm = engine.llama_cpp().Llama(model_path=str(model_path), kv_overrides=overrides, **kwargs)
    set_sparse_prompt(llm, sparse_prompt)
    enable_sparse(llm, sparse)
    return llm
