"""Weight column norms for weight-aware scores.

An input x_i of a product W x moves the output by |x_i| * ||W[:, i]||_2, not by |x_i| alone
(WINA; R-Sparse scores inputs the same way). With ``--weighted-scores`` the calibrator scores each
sparse input by that product: the FFN channel by |a_i| E|u_i| ||W_down[:, i]||, the attention
inputs by |x_i| ||W_q[:, i]|| and |x_i| ||W_o[:, i]||. The norms come from the GGUF's own weights,
dequantized with gguf-py, for every weight type it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from . import schema, transpose
from .gguf_io import ModelInfo, atomic_output


def tensor_name(kind: schema.Kind, il: int) -> str:
    """The norms' name, in the calibrator's input and in the statistics it writes."""
    return f"blk.{il}.{kind.name}_col_norm"


def input_norms(w: np.ndarray) -> np.ndarray:
    """||W[:, i]||_2 of a weight stored as ggml does ([outputs, inputs]): one value per input."""
    return np.sqrt(np.square(w, dtype=np.float64).sum(axis=0)).astype(np.float32)


def column_norms(
    info: ModelInfo, kinds: Sequence[schema.Kind], on_layer: Callable[[], None] | None = None
) -> dict[str, np.ndarray]:
    out = {}
    for il in range(info.n_layer):
        for kind in kinds:
            out[tensor_name(kind, il)] = input_norms(transpose.dequantized(info.tensor(kind.weight_name(il))))
        if on_layer:
            on_layer()
    return out


def write_column_norms(path: Path, norms: dict[str, np.ndarray]) -> None:
    with atomic_output(path) as dest:
        writer = GGUFWriter(str(dest), arch="actsparse-column-norms")
        for name, values in norms.items():
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
