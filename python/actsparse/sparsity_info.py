"""Reading the sparsity metadata of a converted GGUF (`actsparse inspect`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import gguf_io
from .gguf_io import GGUFError, field_value


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


def read_sparsity_info(path: Path) -> SparsityInfo:
    reader = gguf_io.open_gguf(path)
    version = field_value(reader, "actsparse.format_version")
    if version is None:
        raise GGUFError(
            f"{path} carries no actsparse thresholds; create them with convert_with_thresholds.py"
        )
    tensors = {t.name: t for t in reader.tensors}
    arch = str(field_value(reader, "general.architecture"))
    n_layer = int(field_value(reader, f"{arch}.block_count", 0))
    levels = [float(x) for x in field_value(reader, "actsparse.levels", [])]
    layers = []
    for il in range(n_layer):
        t = tensors.get(gguf_io.FFN_THRESH.format(il))
        if t is None:
            continue
        values = np.asarray(t.data, dtype=np.float32).reshape(len(levels), -1)
        layers.append(
            LayerInfo(
                layer=il,
                ffn_channels=int(t.shape[0]),
                attn_q=gguf_io.Q_IN_THRESH.format(il) in tensors,
                attn_o=gguf_io.O_IN_THRESH.format(il) in tensors,
                ffn_thresh_median=[float(np.median(v)) for v in values],
            )
        )
    return SparsityInfo(
        method=str(field_value(reader, "actsparse.method")),
        levels=levels,
        default_level=float(field_value(reader, "actsparse.default_level")),
        n_layer=n_layer,
        arch=arch,
        transposed_type=str(field_value(reader, "actsparse.transposed_type", "")),
        layers=layers,
        calibration={
            "tokens": int(field_value(reader, "actsparse.calibration.tokens", 0)),
            "source": str(field_value(reader, "actsparse.calibration.source", "")),
            "sha256": str(field_value(reader, "actsparse.calibration.sha256", "")),
            "window": int(field_value(reader, "actsparse.calibration.window", 0)),
        },
        format_version=int(version),
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
    print(f"method:      {info.method} (format {info.format_version})")
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
