"""Where this project's llama.cpp build lives, and how Python reaches it.

The build directory is `<repo>/build` unless ACTSPARSE_BUILD_DIR names another one. The
llama-cpp-python binding is installed without a compiled library of its own and loads our
`libllama` from `<build>/bin`, so users never set LLAMA_CPP_LIB_PATH by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]


class EngineError(RuntimeError):
    """The llama.cpp build is missing or unusable."""


def build_dir() -> Path:
    return Path(os.environ.get("ACTSPARSE_BUILD_DIR", REPO_ROOT / "build")).resolve()


def bin_dir() -> Path:
    return build_dir() / "bin"


def binary(name: str) -> Path:
    """Path of a built executable such as `llama-completion`; raises EngineError if absent."""
    return _executable(bin_dir() / name, "make build")


def upstream_binary(name: str) -> Path:
    """The same tool built from the pinned llama.cpp without patches/ (`make build-upstream`)."""
    upstream = Path(os.environ.get("ACTSPARSE_UPSTREAM_BUILD_DIR", REPO_ROOT / "build-upstream"))
    return _executable(upstream.resolve() / "bin" / name, "make build-upstream")


def _executable(path: Path, how: str) -> Path:
    if not path.is_file() or not os.access(path, os.X_OK):
        raise EngineError(f"{path} not found: build it first ({how})")
    return path


def llama_cpp() -> ModuleType:
    """Import llama_cpp bound to this project's libllama."""
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    lib = bin_dir() / "libllama.so"
    if not lib.is_file():
        raise EngineError(f"{lib} not found: build the project first (make build)")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir())
    import llama_cpp as module

    return module
