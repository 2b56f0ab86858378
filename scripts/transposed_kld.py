#!/usr/bin/env python3
"""Quality cost of each --transposed-type, as KL divergence against the dense model.

The input-sparse kernels read W from its transposed copy, so what they compute is
W_eff = dequant(copy)^T. This script writes, for each policy, a dense model whose ffn_down,
attn_q and attn_output are W_eff (stored as F32, so nothing else changes) and measures it with
llama-perplexity's KL-divergence mode against the same model with the exact W (also F32).
Usage: scripts/transposed_kld.py MODEL.gguf [--chunks 16] [-c 256]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from actsparse import copy_choice, engine, gguf_io, schema, transpose  # noqa: E402
from actsparse.data import heldout_corpus  # noqa: E402
from actsparse.gguf_io import NewTensor  # noqa: E402

F32 = transpose.Q.F32


def variant(model: Path, out: Path, policy: str | None) -> None:
    """The dense model with ffn_down, attn_q and attn_output as F32: exact (policy None) or the
    values of that policy's transposed copies."""
    info = gguf_io.describe_model(gguf_io.open_gguf(model), model)
    if policy is not None:
        copy_choice.write_effective_model(info, out, policy, schema.KINDS, dtype="f32")
        return
    replaced = set(copy_choice.copied_weights(info, schema.KINDS))
    new = [
        NewTensor(t.name, (int(t.shape[0]), int(t.shape[1])), F32, lambda t=t: transpose.dequantized(t))
        for t in info.reader.tensors
        if t.name in replaced
    ]
    gguf_io.write_model(info.reader, info.arch, out, {}, new, drop=lambda name: name in replaced)


def kld(binary: Path, base_logits: Path, model: Path, text: Path, ctx: int, chunks: int) -> dict[str, float]:
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", "2",
           "--kl-divergence-base", str(base_logits), "--kl-divergence"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    stats = {}
    for key, pattern in {
        "mean_kld": r"Mean\s+KLD:\s+([-\d.]+)",
        "p99_kld": r"99\.0%\s+KLD:\s+([-\d.]+)",
        "same_top_p": r"Same top p:\s+([\d.]+)",
    }.items():
        m = re.search(pattern, out)
        stats[key] = float(m.group(1)) if m else float("nan")
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("-c", "--ctx", type=int, default=256)
    args = p.parse_args()
    ppl = engine.binary("llama-perplexity")
    results = {}
    with tempfile.TemporaryDirectory(prefix="actsparse-tkld-") as tmp:
        tmpd = Path(tmp)
        text = tmpd / "heldout.txt"
        text.write_text(heldout_corpus().text[:400_000])
        base = tmpd / "base.gguf"
        variant(args.model, base, None)
        logits = tmpd / "base.kld"
        subprocess.run([str(ppl), "-m", str(base), "-f", str(text), "-c", str(args.ctx), "--chunks",
                        str(args.chunks), "-t", "2", "--kl-divergence-base", str(logits)],
                       capture_output=True, text=True, check=True)  # fmt: skip
        for policy in transpose.TRANSPOSED_TYPE_CHOICES:
            path = tmpd / f"{policy}.gguf"
            variant(args.model, path, policy)
            results[policy] = kld(ppl, logits, path, text, args.ctx, args.chunks)
            print(policy, results[policy], file=sys.stderr)
            path.unlink()
    src = GGUFReader(args.model)
    types = {t.name.split(".")[2]: t.tensor_type.name for t in src.tensors if t.name.startswith("blk.0.")}
    print(json.dumps({"model": str(args.model), "types": types, "ctx": args.ctx, "chunks": args.chunks,
                      "kld": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
