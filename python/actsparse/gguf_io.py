"""GGUF I/O: validated reading of models, sparsity metadata, and streaming atomic writes.

Every problem with an input file is raised as GGUFError with a one-line message; callers turn
it into `error: ...` and a non-zero exit.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_reader import ReaderTensor

from .schema import ARCH_ACTIVATION, KEY_FORMAT_VERSION, is_sparsity_tensor

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """An input GGUF that cannot be used; the message is one line for the user."""


def release_pages(reader: GGUFReader) -> None:
    """Drops the mapped file's pages from this process's resident memory; the data stays readable
    (pages come back from the page cache when touched again)."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open a GGUF read-only, refusing files that are not GGUF or are truncated."""
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{p}: not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # gguf-py raises assorted errors on damaged headers
        raise GGUFError(f"{p}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{p}: truncated GGUF (tensor {t.name} extends past the end of the file)")
    return reader


# Readers opened for in-place rewrites, by file identity: parsing a GGUF's metadata (a vocabulary
# of 50k-150k strings) takes seconds, and the converter's searches rewrite thresholds between
# hundreds of runs. A file replaced by rename is a new inode, so it is opened afresh.
_rewrite_readers: dict[tuple[str, int, int], GGUFReader] = {}


def open_for_rewrite(path: str | os.PathLike[str]) -> GGUFReader:
    """The GGUF mapped read-write (writes reach the file's pages, which every later reader of the
    file sees), opened once per file."""
    st = os.stat(path)
    key = (os.fspath(Path(path).resolve()), st.st_dev, st.st_ino)
    reader = _rewrite_readers.get(key)
    if reader is None:
        for stale in [k for k in _rewrite_readers if k[0] == key[0]]:
            del _rewrite_readers[stale]
        reader = _rewrite_readers[key] = GGUFReader(path, "r+")
    return reader


def close_rewrites() -> None:
    """Unmaps every file open_for_rewrite opened."""
    _rewrite_readers.clear()


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]  # as gguf-py gives it, ne[0] first
    n_bytes: int
    tensor_type: int = 0
    data_offset: int = 0  # from the start of the file


def file_version(path: str | os.PathLike[str]) -> tuple[str, int, int, int]:
    """What identifies one version of a file: its resolved path, inode, size and modification time
    (GGUFError if there is no such file)."""
    if not Path(path).is_file():
        raise GGUFError(f"{path}: no such file")
    st = os.stat(path)
    return os.fspath(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns


# GGUF value types (gguf-py's GGUFValueType) by their struct format; 8 is a string, 9 an array.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 4096  # longer arrays (the vocabulary) are skipped, not decoded


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if count > _SMALL_ARRAY:
                if etype == _STRING:
                    for _ in range(count):
                        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                elif etype in _SCALAR_FORMATS:
                    self.pos += count * struct.calcsize(_SCALAR_FORMATS[etype])
                else:
                    raise ValueError(f"array of value type {etype}")
                return None
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"value type {vtype}")
        return self.take(_SCALAR_FORMATS[vtype])


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF's metadata (arrays of more than a few thousand values left out as None) and its
    tensors' names, shapes, types and places, parsed in milliseconds where gguf-py's reader takes
    seconds over a vocabulary."""

    fields: dict[str, Any]
    tensors: dict[str, TensorMeta]


def gguf_index(path: str | os.PathLike[str]) -> GGUFIndex:
    """The file's GGUFIndex, parsed once per version of the file (GGUFError if it is not a GGUF)."""
    return _gguf_index(file_version(path))


@functools.lru_cache(maxsize=32)
def _gguf_index(version: tuple[str, int, int, int]) -> GGUFIndex:
    path, size = version[0], version[2]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        c = _Cursor(buf)
        c.pos = 4
        try:
            c.take("<I")  # version
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            fields = {}
            for _ in range(n_kv):
                key = c.string()
                fields[key] = c.value(c.take("<I"))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                shape = tuple(c.take("<Q") for _ in range(c.take("<I")))
                infos.append((name, shape, c.take("<I"), c.take("<Q")))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: truncated or corrupt GGUF ({e})") from None
    alignment = int(fields.get("general.alignment", 32))
    start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, shape, ttype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        if start + offset + n_bytes > size:
            raise GGUFError(f"{path}: truncated GGUF (tensor {name} extends past the end of the file)")
        tensors[name] = TensorMeta(name, shape, n_bytes, ttype, start + offset)
    return GGUFIndex(fields, tensors)


def tensor_table(path: str | os.PathLike[str]) -> dict[str, TensorMeta]:
    """Names, shapes and sizes of a GGUF's tensors (gguf_index): the bytes model asks for them for
    every run it prices."""
    return gguf_index(path).tensors


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


@dataclass
class ModelInfo:
    path: Path
    arch: str
    activation: str
    n_layer: int
    n_embd: int
    n_ff: int
    tensors: dict[str, ReaderTensor]
    has_sparsity: bool
    reader: GGUFReader = field(repr=False)

    def tensor(self, name: str) -> ReaderTensor:
        return self.tensors[name]


def describe_model(reader: GGUFReader, path: str | os.PathLike[str]) -> ModelInfo:
    """Check that the model has a gated FFN this project supports and collect its dimensions."""
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: no general.architecture key")
    tensors = {t.name: t for t in reader.tensors}
    if "blk.0.ffn_gate_exps.weight" in tensors or "blk.0.ffn_gate_inp.weight" in tensors:
        raise GGUFError(f"unsupported architecture '{arch}': mixture-of-experts FFNs are not supported")
    if arch not in ARCH_ACTIVATION:
        raise GGUFError(
            f"unsupported architecture '{arch}': supported are {', '.join(sorted(ARCH_ACTIVATION))}"
        )
    n_layer = field_value(reader, f"{arch}.block_count")
    n_embd = field_value(reader, f"{arch}.embedding_length")
    if not isinstance(n_layer, int) or not isinstance(n_embd, int):
        raise GGUFError(f"{path}: missing {arch}.block_count or {arch}.embedding_length")
    for il in range(n_layer):
        for kind in ("ffn_gate", "ffn_up", "ffn_down", "attn_q", "attn_output"):
            if f"blk.{il}.{kind}.weight" not in tensors:
                raise GGUFError(
                    f"unsupported architecture '{arch}': layer {il} has no separate {kind}.weight "
                    "(fused or ungated FFN/attention)"
                )
    n_ff = int(tensors["blk.0.ffn_gate.weight"].shape[1])
    has_sparsity = reader.get_field(KEY_FORMAT_VERSION) is not None or any(
        is_sparsity_tensor(n) for n in tensors
    )
    return ModelInfo(
        path=Path(path),
        arch=arch,
        activation=ARCH_ACTIVATION[arch],
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        tensors=tensors,
        has_sparsity=has_sparsity,
        reader=reader,
    )


def row_nbytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} is not a multiple of {qtype.name}'s block of {block}")
    return n_per_row // block * type_size


@dataclass
class NewTensor:
    """A tensor to add, produced only when it is written (so conversion streams)."""

    name: str
    ggml_shape: tuple[int, ...]  # ne0 first
    qtype: GGMLQuantizationType
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.ggml_shape[1:])) if len(self.ggml_shape) > 1 else 1
        return rows * row_nbytes(self.qtype, self.ggml_shape[0])


def _copy_kv(reader: GGUFReader, writer: GGUFWriter, skip: Callable[[str], bool]) -> None:
    for f in reader.fields.values():
        name = f.name
        if name.startswith("GGUF.") or name == "general.architecture" or skip(name):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = f.contents()
        if name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(name, value, vtype, sub_type=sub)


@contextmanager
def atomic_output(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside out_path; rename it into place only on success."""
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the output private
    try:
        yield Path(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_model(
    reader: GGUFReader,
    arch: str,
    out_path: Path,
    new_kv: dict[str, tuple[Any, GGUFValueType]],
    new_tensors: Iterable[NewTensor],
    drop: Callable[[str], bool] = lambda name: False,
) -> None:
    """write_gguf to out_path through a temporary file renamed into place when complete."""
    with atomic_output(out_path) as tmp:
        write_gguf(reader, arch, tmp, new_kv, new_tensors, drop)


def write_gguf(
    reader: GGUFReader,
    arch: str,
    path: Path,
    new_kv: dict[str, tuple[Any, GGUFValueType]],
    new_tensors: Iterable[NewTensor],
    drop: Callable[[str], bool] = lambda name: False,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write reader's model without the tensors and keys `drop` names, plus new keys and tensors,
    to path, streaming (each new tensor is made only when it is written)."""
    new_tensors = list(new_tensors)
    writer = GGUFWriter(path, arch)
    _copy_kv(reader, writer, skip=lambda k: drop(k) or k in new_kv)
    for key, (value, vtype) in new_kv.items():
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType.FLOAT32
        writer.add_key_value(key, value, vtype, sub_type=sub)
    kept = [t for t in reader.tensors if not drop(t.name)]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.n_bytes, raw_dtype=t.tensor_type)
    for nt in new_tensors:
        byte_shape = (*reversed(nt.ggml_shape[1:]), nt.nbytes // max(1, _rows(nt.ggml_shape)))
        writer.add_tensor_info(nt.name, byte_shape, np.dtype(np.uint8), nt.nbytes, raw_dtype=nt.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
        if progress:
            progress(t.n_bytes)
    for nt in new_tensors:
        data = np.ascontiguousarray(nt.make())
        if data.nbytes != nt.nbytes:
            raise RuntimeError(f"{nt.name}: produced {data.nbytes} bytes, expected {nt.nbytes}")
        writer.write_tensor_data(data.view(np.uint8).reshape(-1))
        if progress:
            progress(nt.nbytes)
    writer.close()


def _rows(ggml_shape: tuple[int, ...]) -> int:
    return int(np.prod(ggml_shape[1:])) if len(ggml_shape) > 1 else 1
