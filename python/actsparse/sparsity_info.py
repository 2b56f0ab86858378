"""Reading the sparsity metadata of a converted GGUF (`actsparse inspect`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import schema
from .gguf_io import GGUFError
from .sparse_file import read_sparse_file


@dataclass
class LayerInfo:
    layer: int
    ffn_channels: int
    attn_q: bool
    attn_o: bool
    ffn_thresh_median: list[float]  # per level, median over channels


@dataclass
class SparsityInfo:
    method: str
    levels: list[float]
    default_level: float
    n_layer: int
    arch: str
    transposed_type: str
    layers: list[LayerInfo]
    calibration: dict[str, object]
    format_version: int
    weighted_scores: bool = False


def read_sparsity_info(path: Path) -> SparsityInfo:
    """What `actsparse inspect` shows of a converted file."""
    f = read_sparse_file(path)
    layers = []
    for il in range(f.model.n_layer):
        values = f.all_thresholds(schema.FFN, il)
        if values is None:
            continue
        layers.append(
            LayerInfo(
                layer=il,
                ffn_channels=int(values.shape[1]),
                attn_q=schema.ATTN_Q_IN.thresh_name(il) in f.model.tensors,
                attn_o=schema.ATTN_O_IN.thresh_name(il) in f.model.tensors,
                ffn_thresh_median=[float(np.median(v)) for v in values],
            )
        )
    c = f.calibration
    return SparsityInfo(
        method=f.method,
        levels=f.levels,
        default_level=f.default_level,
        n_layer=f.model.n_layer,
        arch=f.model.arch,
        transposed_type=f.transposed_type,
        layers=layers,
        calibration={"tokens": c.tokens, "source": c.source, "sha256": c.sha256, "window": c.window},
        format_version=f.format_version,
        weighted_scores=f.weighted_scores,
    )


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print the sparsity metadata of a converted GGUF")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    try:
        info = read_sparsity_info(args.file)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(f"file:        {args.file}")
    print(f"arch:        {info.arch}, {info.n_layer} layers")
    scores = ", weighted scores" if info.weighted_scores else ""
    print(f"method:      {info.method}{scores} (format {info.format_version})")
    print(f"levels:      {', '.join(f'{v:g}' for v in info.levels)} (default {info.default_level:g})")
    print(f"transposed:  {info.transposed_type}")
    c = info.calibration
    print(
        f"calibration: {c['tokens']} tokens of '{c['source']}' "
        f"(window {c['window']}, sha256 {c['sha256'][:16]}...)"
    )
    n_attn = sum(1 for li in info.layers if li.attn_q and li.attn_o)
    print(f"layers with thresholds: {len(info.layers)} FFN, {n_attn} attention")
    header = "layer  channels  attn  " + "  ".join(f"t~@{v:g}".rjust(9) for v in info.levels)
    print(header)
    for li in info.layers:
        med = "  ".join(f"{m:9.4g}" for m in li.ffn_thresh_median)
        print(f"{li.layer:5d}  {li.ffn_channels:8d}  {'q,o' if li.attn_q and li.attn_o else '-':4s}  {med}")
    print("(t~ = median FFN threshold over channels)")
    return 0
