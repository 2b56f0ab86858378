#!/usr/bin/env python3
"""Where R-Sparse's low-rank term pays: per layer and projection, the output error of every rank at
the bytes rank 0 reads (python/actsparse/low_rank.py), on inputs dumped by the real calibrator.

For each layer and each of q, k, v, o, gate, up and down, at each level s: rank 0 reads (1 - s) of
the projection's transposed copy (Q8_0 here); rank r spends r (d_in + d_out) F16 values on the
factors and drops that many more bytes' worth of inputs. The error is the relative output error
over the dumped rows (the first calibration window, its first token left out), the thresholds the
quantiles of the calibration histogram of |x_i| ||W[:, i]||, as the converter computes them.

usage: scripts/low_rank_study.py MODEL.gguf OUT.json [--levels 0.3,0.5,0.7] [--layers 0,3,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from actsparse import calibration, column_norms, gguf_io, low_rank, schema, transpose  # noqa: E402
from actsparse.data import calibration_corpus  # noqa: E402
from actsparse.thresholds import parse_levels  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path, help="JSON: one row per layer, projection and level")
    p.add_argument("--levels", default="0.3,0.5,0.7")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="tokens of the score histograms")
    p.add_argument("--rows", type=int, default=512, help="dumped input rows the errors are measured on")
    a = p.parse_args()
    levels = parse_levels(a.levels)
    info = gguf_io.describe_model(gguf_io.open_gguf(a.model), a.model)
    layers = tuple(range(info.n_layer)) if a.layers is None else tuple(int(v) for v in a.layers.split(","))
    kinds = schema.sparse_kinds("r-sparse", True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        norms_file = Path(tmp) / "norms.gguf"
        column_norms.write_column_norms(norms_file, column_norms.column_norms(info, kinds))
        stats = calibration.collect(
            a.model, calibration_corpus().text[:400000], tokens=a.calib_tokens, window=max(512, a.rows),
            threads=2, chess=False, dump_layers=layers, dump_tokens=a.rows, column_norms=norms_file,
        )  # fmt: skip
    rows = []
    for il in layers:
        ls = stats.layers[il]
        for kind in kinds:
            w = transpose.dequantized(info.tensor(kind.weight_name(il)))
            x = ls.input_dump(kind)[1:].astype(np.float32)  # the first token's outliers (BOS) left out
            factors = low_rank.Factors.of(w)
            d_out, d_in = w.shape
            copy_bytes = d_in * gguf_io.row_nbytes(GGMLQuantizationType.Q8_0, d_out)
            for s in levels:
                splits = low_rank.splits_at_equal_bytes(
                    w, factors, x, ls.col_norms[kind.name], ls.input_hist(kind), s, copy_bytes
                )
                best = low_rank.best_split(splits)
                rows.append({
                    "layer": il, "kind": kind.name, "level": s, "best_rank": best.rank,
                    "errors": {str(sp.rank): sp.error for sp in splits},
                })  # fmt: skip
        print(f"layer {il} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    a.out.write_text(json.dumps({"model": str(a.model), "rows": rows}, indent=1) + "\n")
    for s in levels:
        at = [r for r in rows if r["level"] == s]
        ranked = [r for r in at if r["best_rank"] > 0]
        e0 = np.mean([r["errors"]["0"] for r in at])
        eb = np.mean([r["errors"][str(r["best_rank"])] for r in at])
        print(
            f"level {s:g}: {len(ranked)}/{len(at)} take a rank; "
            f"mean output error {e0:.4f} at rank 0, {eb:.4f} best"
        )
        for r in ranked:
            print(f"  layer {r['layer']:2d} {r['kind']:12s} rank {r['best_rank']:3d}: "
                  f"{r['errors']['0']:.4f} -> {r['errors'][str(r['best_rank'])]:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
