"""gguf_io.gguf_index, the fast metadata parser, against gguf-py's reader on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse import gguf_io


@pytest.mark.parametrize("which", ["model", "converted"])
def test_index_agrees_with_gguf_py(small_model_path: Path, small_sparse_model: Path, which: str) -> None:
    path = small_model_path if which == "model" else small_sparse_model
    index, reader = gguf_io.gguf_index(path), GGUFReader(path)
    assert list(index.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        m = index.tensors[t.name]
        assert (m.shape, m.n_bytes, m.tensor_type, m.data_offset) == (
            tuple(int(x) for x in t.shape), t.n_bytes, int(t.tensor_type), t.data_offset,
        )  # fmt: skip
    with open(path, "rb") as f:
        last = reader.tensors[-1]
        f.seek(index.tensors[last.name].data_offset)
        assert f.read(64) == np.asarray(last.data).tobytes()[:64]
    decoded = 0
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue  # the header, not a key
        got = index.fields[field.name]
        if got is None:
            assert len(field.data) > 4096  # only long arrays (the vocabulary) are left out
            continue
        want = field.contents()
        assert got == (pytest.approx(want) if isinstance(want, float | list) else want), field.name
        decoded += 1
    assert decoded > 10


def test_index_refuses_damaged_files(small_model_path: Path, tmp_path: Path) -> None:
    data = small_model_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(gguf_io.GGUFError, match="truncated"):
        gguf_io.gguf_index(cut)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:5000])
    with pytest.raises(gguf_io.GGUFError, match="truncated or corrupt"):
        gguf_io.gguf_index(header_cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + data[4:4096])
    with pytest.raises(gguf_io.GGUFError, match="bad magic"):
        gguf_io.gguf_index(bad)
