"""The foundation: the patched build, its binaries, the Python binding on our libllama."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from actsparse import demo, engine
from helpers import REPO

TOOLS = ["llama-cli", "llama-completion", "llama-server", "llama-bench", "llama-perplexity", "llama-quantize",
         "actsparse-calibrate", "actsparse-bench-kernels"]  # fmt: skip


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_is_built_and_answers_help(tool: str) -> None:
    path = engine.binary(tool)
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    # llama-quantize prints its usage and exits 1 on --help (upstream behaviour)
    assert proc.returncode == (1 if tool == "llama-quantize" else 0), proc.stderr[-1000:]
    assert "usage" in (proc.stdout + proc.stderr).lower()


def test_shared_libraries_are_built() -> None:
    for lib in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert (engine.bin_dir() / lib).is_file(), lib


def test_built_completion_generates_text(small_model_path: Path) -> None:
    gen = demo.generate(small_model_path, "The capital of France is", n_predict=16, threads=2)
    assert gen.text.startswith("The capital of France is")
    assert len(gen.text) > len("The capital of France is") + 5
    assert gen.decode_tps > 0


def test_python_binding_uses_our_libllama(small_model_path: Path) -> None:
    llama_cpp = engine.llama_cpp()
    lib_path = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert lib_path.parent == engine.bin_dir().resolve()
    llm = llama_cpp.Llama(str(small_model_path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy")
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)])
    assert logits.shape == (len(tokens), llm.n_vocab())
    assert np.all(np.isfinite(logits))
    assert llm.detokenize([int(np.argmax(logits[-1]))]).strip() == b"dog"


def test_a_patch_that_does_not_apply_stops_the_build_naming_it(tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    bad = patches / "0001-broken-hook.patch"
    bad.write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,3 +1,3 @@\n"
        "-this line is not there\n+nor this\n context\n"
    )
    src = engine.build_dir() / "llama.cpp-src"
    proc = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DLLAMA_CPP_SOURCE_DIR={src}", f"-DACTSPARSE_PATCH_DIR={patches}"],
        capture_output=True, text=True, env={**os.environ, "ACTSPARSE_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "0001-broken-hook.patch does not apply" in proc.stdout + proc.stderr
