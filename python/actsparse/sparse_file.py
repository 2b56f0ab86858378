"""The one reader of a sparse GGUF (a file written by the converter, docs/gguf-format.md).

Every command that reads a converted file (inspect, eval, bench, demo, the transformers
reference) reads it through `read_sparse_file`, which validates it once and exposes its schema
as typed fields.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import gguf_io, schema
from .gguf_io import GGUFError, ModelInfo, field_value
from .schema import Kind


class NoThresholdsError(GGUFError):
    """A valid GGUF that was never converted (a dense model)."""


@dataclass(frozen=True)
class Calibration:
    source: str
    sha256: str
    tokens: int
    window: int
    sparse_aware_tokens: int


@dataclass
class SparseFile:
    path: Path
    model: ModelInfo
    format_version: int
    method: str
    attn: bool
    levels: list[float]  # as written (float32), rounded to 6 decimals
    default_level: float
    activation: str
    transposed_type: str
    calibration: Calibration
    weighted_scores: bool = False
    # [levels, n_layer, kinds] target sparsity of each layer's kind (--allocate); None: the level
    allocation: np.ndarray | None = None
    level_budgets: list[float] | None = None  # per level, the kld:X it was found for (0: none)
    # schema.TRANSPOSED_CANDIDATES -> measured KL cost (--transposed-type auto); None: not measured
    copy_kld: dict[str, float] | None = None

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The kinds of sparse input the file carries."""
        return schema.sparse_kinds(self.method, self.attn)

    @property
    def allocated(self) -> bool:
        return self.allocation is not None

    @property
    def label(self) -> str:
        attn = "+attn" if self.attn else ""
        weighted = " weighted" if self.weighted_scores else ""
        allocated = " allocated" if self.allocated else ""
        copies = " same-type copies" if self.transposed_type == "same" else ""
        method = "R-Sparse" if self.method == "r-sparse" else self.method.upper()
        attn = attn if self.method != "r-sparse" else "" if self.attn else " FFN only"
        weighted = weighted if self.method != "r-sparse" else ""  # its scores always are
        return f"{method}{attn}{weighted}{allocated}{copies}"

    def level_row(self, level: float | None = None) -> int:
        """The row of `level` (None: the default level) in the threshold tensors."""
        level = self.default_level if level is None else level
        row = schema.level_index(self.levels, level)
        if row is None:
            available = ", ".join(f"{v:g}" for v in self.levels)
            raise ValueError(f"sparsity level {level:g} is not in {self.path}; available: {available}")
        return row

    def target(self, kind: Kind, il: int, level: float | None = None) -> float:
        """The sparsity layer il's `kind` aims at, at `level`: its allocation, or the level."""
        row = self.level_row(level)
        if self.allocation is None:
            return self.levels[row]
        return float(self.allocation[row, il, schema.KINDS.index(kind)])

    def has_level(self, level: float) -> bool:
        return schema.level_index(self.levels, level) is not None

    def thresholds(self, kind: Kind, il: int, level: float | None = None) -> np.ndarray | None:
        """Layer il's thresholds of `kind` at `level` ([channels] or [1]); None where it has none."""
        t = self.model.tensors.get(kind.thresh_name(il))
        if t is None:
            return None
        data = np.asarray(t.data, dtype=np.float32).reshape(len(self.levels), -1)  # ggml [ne0, levels]
        return data[self.level_row(level)].copy()

    def all_thresholds(self, kind: Kind, il: int) -> np.ndarray | None:
        """[levels, channels] of layer il's thresholds of `kind`."""
        t = self.model.tensors.get(kind.thresh_name(il))
        return None if t is None else np.asarray(t.data, dtype=np.float32).reshape(len(self.levels), -1)


def cached_sparse_file(path: str | os.PathLike[str]) -> SparseFile:
    """read_sparse_file, parsed once per version of the file (gguf_io.file_version): the bytes
    model reads a file's allocation for every run it prices. Callers must not modify it."""
    return _cached_sparse_file(gguf_io.file_version(path))


@functools.lru_cache(maxsize=8)
def _cached_sparse_file(version: tuple[str, int, int, int]) -> SparseFile:
    return read_sparse_file(version[0])


def read_sparse_file(path: str | os.PathLike[str]) -> SparseFile:
    """The converted file at `path`; GGUFError (one line) if it is not one."""
    path = Path(path)
    reader = gguf_io.open_gguf(path)
    version = field_value(reader, schema.KEY_FORMAT_VERSION)
    if version is None:
        raise NoThresholdsError(
            f"{path} carries no actsparse thresholds; create them with convert_with_thresholds.py"
        )
    levels = [round(float(v), 6) for v in field_value(reader, schema.KEY_LEVELS, [])]
    if not levels:
        raise GGUFError(f"{path}: no sparsity levels ({schema.KEY_LEVELS} missing or empty)")
    info = gguf_io.describe_model(reader, path)
    allocation = field_value(reader, schema.KEY_ALLOCATION)
    if allocation is not None:
        shape = (len(levels), info.n_layer, len(schema.KINDS))
        allocation = np.asarray(allocation, dtype=np.float32)
        legacy = (len(levels), info.n_layer, schema.LEGACY_ALLOCATION_KINDS)
        if allocation.size == np.prod(legacy):  # written before the R-Sparse kinds: those target 0
            allocation = np.concatenate(
                [allocation.reshape(legacy), np.zeros((*legacy[:2], shape[2] - legacy[2]), np.float32)],
                axis=2,
            )
        if allocation.size != np.prod(shape) or not np.all((allocation >= 0) & (allocation < 1)):
            dims = "x".join(map(str, shape))
            raise GGUFError(f"{path}: {schema.KEY_ALLOCATION} is not {dims} values in [0, 1)")
        allocation = allocation.reshape(shape)
    return SparseFile(
        path=path,
        model=info,
        format_version=int(version),
        method=str(field_value(reader, schema.KEY_METHOD)),
        attn=bool(field_value(reader, schema.KEY_ATTN, False)),
        levels=levels,
        default_level=round(
            float(field_value(reader, schema.KEY_DEFAULT_LEVEL, levels[len(levels) // 2])), 6
        ),
        activation=str(field_value(reader, schema.KEY_ACTIVATION, info.activation)),
        transposed_type=str(field_value(reader, schema.KEY_TRANSPOSED_TYPE, "")),
        weighted_scores=bool(field_value(reader, schema.KEY_WEIGHTED_SCORES, False)),
        allocation=allocation,
        level_budgets=_level_budgets(reader, path, len(levels)),
        copy_kld=_copy_kld(reader, path),
        calibration=Calibration(
            source=str(field_value(reader, schema.KEY_CALIB_SOURCE, "")),
            sha256=str(field_value(reader, schema.KEY_CALIB_SHA256, "")),
            tokens=int(field_value(reader, schema.KEY_CALIB_TOKENS, 0)),
            window=int(field_value(reader, schema.KEY_CALIB_WINDOW, 0)),
            sparse_aware_tokens=int(field_value(reader, schema.KEY_CALIB_SPARSE_AWARE_TOKENS, 0)),
        ),
    )


def _level_budgets(reader: gguf_io.GGUFReader, path: Path, n_levels: int) -> list[float] | None:
    values = field_value(reader, schema.KEY_LEVEL_BUDGETS)
    if values is None:
        return None
    if len(values) != n_levels:
        raise GGUFError(f"{path}: {schema.KEY_LEVEL_BUDGETS} has {len(values)} values for {n_levels} levels")
    return [round(float(v), 6) for v in values]


def _copy_kld(reader: gguf_io.GGUFReader, path: Path) -> dict[str, float] | None:
    values = field_value(reader, schema.KEY_TRANSPOSED_TYPE_KLD)
    if values is None:
        return None
    if len(values) != len(schema.TRANSPOSED_CANDIDATES):
        raise GGUFError(f"{path}: {schema.KEY_TRANSPOSED_TYPE_KLD} has {len(values)} values, not "
                        f"{len(schema.TRANSPOSED_CANDIDATES)}")  # fmt: skip
    return {c: round(float(v), 6) for c, v in zip(schema.TRANSPOSED_CANDIDATES, values, strict=True)}
