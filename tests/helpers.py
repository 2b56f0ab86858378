"""Helpers shared by the tests: running the project's CLIs and hashing files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "python" / "convert_with_thresholds.py"


# The largest relative difference allowed by copy type, over all products of the run: Q8_0 copies
# accumulate in float; packed copies may round the accumulate's inputs to 8 bits, one scale per 16
# active rows (actsparse_axpy_rounds_inputs; the kernel tests bound that against ggml's own Q8_0
# input rounding). On SmolLM2's real activations that reaches 2.2% at worst; a wrong row or scale
# costs 100%.
DECODE_CHECK_TOLERANCE = {"q8_0": 1e-4, "same": 5e-2}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_converter(*args: object, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(CONVERTER), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def checked_decode_stats(model: Path, level: float, threads: int, tokens: int) -> dict:
    """sparse_stats of a generation from Python at `level` with ACTSPARSE_CHECK_DECODE=1 and every
    product through the decode kernels: each sparse decode product also computed densely from the
    same masked input, the largest relative difference in stats["decode_check"]."""
    code = (
        "import sys, json, actsparse\n"
        f"llm = actsparse.Llama(sys.argv[1], sparse={level}, n_ctx=256, n_threads={threads}, verbose=False)\n"
        f"llm('The history of the city', max_tokens={tokens}, temperature=0.0)\n"
        "print(json.dumps(actsparse.sparse_stats(llm)))\n"
    )
    env = {
        **os.environ, "ACTSPARSE_CHECK_DECODE": "1", "ACTSPARSE_DECODE_KERNELS": "all",
        "PYTHONPATH": str(REPO / "python"),
    }  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actsparse.cli", *map(str, args)], capture_output=True, text=True
    )


# Tensors that each architecture needs beyond a llama-style block, as (name, width): "embd" is
# n_embd, "head" the attention head size. All are RMS-norm weights, written as ones.
EXTRA_NORMS = {
    "qwen3": [("attn_q_norm", "head"), ("attn_k_norm", "head")],
    "gemma2": [("post_attention_norm", "embd"), ("post_ffw_norm", "embd")],
    "gemma3": [("attn_q_norm", "head"), ("attn_k_norm", "head"), ("post_attention_norm", "embd"),
               ("post_ffw_norm", "embd")],
}  # fmt: skip


def derive_arch(src: Path, arch: str, dst: Path) -> None:
    """Re-label a llama-architecture GGUF as `arch` (same weights and tokenizer; the keys renamed,
    the norms that arch adds set to ones), for tests of the code paths of other architectures."""
    import numpy as np
    from gguf import GGUFValueType

    from actsparse import gguf_io

    reader = gguf_io.open_gguf(src)
    kv = {}
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            kv[arch + field.name[len("llama") :]] = (field.contents(), field.types[0])
    n_embd = int(gguf_io.field_value(reader, "llama.embedding_length"))
    n_head = int(gguf_io.field_value(reader, "llama.attention.head_count"))
    n_layer = int(gguf_io.field_value(reader, "llama.block_count"))
    widths = {"embd": n_embd, "head": n_embd // n_head}
    f32 = gguf_io.GGMLQuantizationType.F32
    new = [
        gguf_io.NewTensor(
            f"blk.{il}.{name}.weight", (widths[w],), f32, lambda n=widths[w]: np.ones(n, np.float32)
        )
        for il in range(n_layer)
        for name, w in EXTRA_NORMS.get(arch, [])
    ]
    assert all(vtype != GGUFValueType.ARRAY for _, vtype in kv.values())
    gguf_io.write_model(reader, arch, dst, kv, new, drop=lambda name: name.startswith("llama."))
