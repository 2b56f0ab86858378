#!/usr/bin/env python3
"""Bytes-per-token ceiling of sparse decode: weight bytes dense decode reads / bytes sparse reads.

Usage: scripts/ceiling.py MODEL.sparse.gguf FFN_SPARSITY Q_SPARSITY O_SPARSITY
(the realized fractions, e.g. from --sparse-stats). Counts every matrix a decode step multiplies
(the output layer included; token_embd only when it doubles as the output), and the transposed
copies at their real types.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from actsparse import gguf_io  # noqa: E402


def main() -> int:
    path, s_ffn, s_q, s_o = Path(sys.argv[1]), *map(float, sys.argv[2:5])
    tensors = {t.name: t for t in gguf_io.open_gguf(path).tensors}
    nbytes = {name: t.n_bytes for name, t in tensors.items()}
    dense = sparse = 0.0
    for name, n in nbytes.items():
        m = re.match(r"blk\.\d+\.(\w+)\.weight$", name)
        kind = m.group(1) if m else name
        if (
            kind.endswith("_t")
            or "norm" in kind
            or tensors[name].shape.size < 2
            or int(tensors[name].shape[1]) == 1
        ):
            continue
        if name == "token_embd.weight" and "output.weight" in nbytes:
            continue  # only gathered
        dense += n
        if kind == "ffn_up":
            sparse += (1 - s_ffn) * n
        elif kind == "ffn_down":
            sparse += (1 - s_ffn) * nbytes[name.replace("ffn_down", "ffn_down_t")]
        elif kind == "attn_q" and name.replace("attn_q", "attn_q_t") in nbytes:
            sparse += (1 - s_q) * nbytes[name.replace("attn_q", "attn_q_t")]
        elif kind == "attn_output" and name.replace("attn_output", "attn_output_t") in nbytes:
            sparse += (1 - s_o) * nbytes[name.replace("attn_output", "attn_output_t")]
        else:
            sparse += n
    print(
        f"dense {dense / 1e6:.1f} MB/token, sparse {sparse / 1e6:.1f} MB/token, ceiling x{dense / sparse:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
