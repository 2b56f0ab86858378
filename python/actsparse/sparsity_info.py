"""Reading the sparsity metadata of a converted GGUF (`actsparse inspect`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
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
    # at the default level, each kind's target sparsity (its allocation, or the level)
    target: dict[str, float] = field(default_factory=dict)


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
    allocated: bool = False
    level_budgets: list[float] | None = None
    copy_kld: dict[str, float] | None = None  # --transposed-type auto's measurement
    kinds: list[str] = field(default_factory=list)  # the kinds of sparse input the file carries


def read_sparsity_info(path: Path) -> SparsityInfo:
    """What `actsparse inspect` shows of a converted file."""
    f = read_sparse_file(path)
    layers = []
    # the kind whose channels are the FFN's: CHESS's, or R-Sparse's ffn_down input
    channels = schema.FFN_DOWN_IN if f.method == "r-sparse" else schema.FFN
    for il in range(f.model.n_layer):
        values = f.all_thresholds(channels, il)
        if values is None:
            continue
        layers.append(
            LayerInfo(
                layer=il,
                ffn_channels=int(values.shape[1]),
                attn_q=schema.ATTN_Q_IN.thresh_name(il) in f.model.tensors,
                attn_o=schema.ATTN_O_IN.thresh_name(il) in f.model.tensors,
                ffn_thresh_median=[float(np.median(v)) for v in values],
                target={k.name: f.target(k, il) for k in f.kinds if k.thresh_name(il) in f.model.tensors},
            )
        )
    c = f.calibration
    return SparsityInfo(
        method=f.method,
        kinds=[k.name for k in f.kinds],
        levels=f.levels,
        default_level=f.default_level,
        n_layer=f.model.n_layer,
        arch=f.model.arch,
        transposed_type=f.transposed_type,
        layers=layers,
        calibration={"tokens": c.tokens, "source": c.source, "sha256": c.sha256, "window": c.window},
        format_version=f.format_version,
        weighted_scores=f.weighted_scores,
        allocated=f.allocated,
        level_budgets=f.level_budgets,
        copy_kld=f.copy_kld,
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
    budgets = info.level_budgets or [0.0] * len(info.levels)
    named = [f"{v:g}" + (f" (kld:{b:g})" if b > 0 else "") for v, b in zip(info.levels, budgets, strict=True)]
    print(f"levels:      {', '.join(named)} (default {info.default_level:g})")
    chosen = ""
    if info.copy_kld:
        costs = ", ".join(f"{k} {v:.4f}" for k, v in info.copy_kld.items())
        chosen = f" (chosen by measurement; copy KLD on calibration text: {costs})"
    print(f"transposed:  {info.transposed_type}{chosen}")
    c = info.calibration
    print(
        f"calibration: {c['tokens']} tokens of '{c['source']}' "
        f"(window {c['window']}, sha256 {c['sha256'][:16]}...)"
    )
    n_attn = sum(1 for li in info.layers if li.attn_q and li.attn_o)
    print(f"layers with thresholds: {len(info.layers)} FFN, {n_attn} attention ({', '.join(info.kinds)})")
    if info.allocated:
        print(f"allocation:  by measured sensitivity, per layer and kind (s@{info.default_level:g} below)")
    kinds = info.kinds
    short = [
        k.removeprefix("attn_").removeprefix("ffn_").removesuffix("_in") if k != "ffn" else k for k in kinds
    ]
    targets = "  ".join(f"{'s@' + k:>6}" for k in short)
    header = "layer  channels  attn  " + targets + "  " + "  ".join(f"t~@{v:g}".rjust(9) for v in info.levels)
    print(header)
    for li in info.layers:
        med = "  ".join(f"{m:9.4g}" for m in li.ffn_thresh_median)
        s = "  ".join(f"{li.target[k]:6.3f}" if k in li.target else f"{'-':>6}" for k in kinds)
        print(
            f"{li.layer:5d}  {li.ffn_channels:8d}  {'q,o' if li.attn_q and li.attn_o else '-':4s}  {s}  {med}"
        )
    named = ", ".join(f"{k} input" if k != "ffn" else "FFN channels" for k in short)
    print(f"(s@ = target sparsity of {named} at {info.default_level:g}; "
          "t~ = median FFN threshold over channels)")  # fmt: skip
    return 0
