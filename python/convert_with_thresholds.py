#!/usr/bin/env python3
"""Calibrate activation-sparsity thresholds on a GGUF model and embed them: see --help."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

try:
    import gguf  # noqa: F401
except ImportError:
    # Run with any python3: fall back to the project's virtual environment (make venv).
    venv_python = HERE.parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit("error: the gguf package is missing; run `make venv` and use .venv/bin/python")

from actsparse.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
