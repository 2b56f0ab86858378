"""What the llama.cpp tools print or write, read in one place: one reader per output, each tested
against the real tool's output (tests/test_tool_output.py).

The runtime's realized sparsity is read as data, from the JSON that `--sparse-stats-file PATH`
writes (the same document as actsparse_stats_json), never from the `--sparse-stats` table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import schema

_FLOAT = r"([-+]?[\d.]+(?:e[-+]?\d+)?|nan|inf)"


class ToolOutputError(RuntimeError):
    """A tool's output lacks what was asked of it; the message is one line."""


def _search(pattern: str, text: str, tool: str, what: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise ToolOutputError(f"{tool} printed no {what}")
    return float(m.group(1))


def perplexity(out: str) -> float:
    """The final perplexity of `llama-perplexity` (stdout and stderr together)."""
    return _search(rf"Final estimate: PPL = {_FLOAT}", out, "llama-perplexity", "final perplexity")


def kl_divergence(out: str) -> dict[str, float]:
    """`llama-perplexity --kl-divergence`: PPL of the candidate, mean and 99th-percentile KLD and
    the same-top-token rate (a fraction)."""
    tool = "llama-perplexity"
    return {
        "ppl": _search(rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}", out, tool, "PPL(Q)"),
        "kld_mean": _search(rf"Mean\s+KLD:\s*{_FLOAT}", out, tool, "mean KLD"),
        "kld_p99": _search(rf"99\.0%\s+KLD:\s*{_FLOAT}", out, tool, "99% KLD"),
        "same_top": _search(rf"Same top p:\s*{_FLOAT}", out, tool, "same-top rate") / 100.0,
    }


def decode_tokens_per_second(stderr: str) -> float | None:
    """Generation speed from llama-completion's performance lines (None when it printed none),
    e.g. "common_perf_print: eval time = 57.98 ms / 8 runs (7.25 ms per token, 137.98 tokens per second)"."""
    m = re.search(r"(?<!prompt )eval time =[^\n]*?([\d.]+) tokens per second", stderr)
    return float(m.group(1)) if m else None


def sparsity_stats(path: Path, phase: str = "decode") -> dict[str, Any]:
    """The realized sparsity of one phase ("decode" or "prefill") from a `--sparse-stats-file`:
    {"layers": [{"layer": i, "ffn": f, ...}], "overall": {...}}, None where a kind was not counted."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ToolOutputError(f"no readable sparsity statistics in {path} ({e.__class__.__name__})") from None
    part = doc if phase == "decode" else doc.get(phase)
    if not isinstance(part, dict) or "overall" not in part or "layers" not in part:
        raise ToolOutputError(f"{path} has no {phase} statistics")
    kinds = [k.name for k in schema.KINDS]
    return {
        "overall": {k: part["overall"].get(k) for k in kinds},
        "layers": [{"layer": row["layer"], **{k: row.get(k) for k in kinds}} for row in part["layers"]],
    }


def channel_activity(path: Path) -> dict[str, list[np.ndarray]]:
    """How often each input channel was active during decode, from a `--sparse-stats-file`: per
    kind, per layer, the fraction of decoded tokens each channel was active in (an empty array for a
    layer where the kind was not sparse)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ToolOutputError(f"no readable sparsity statistics in {path} ({e.__class__.__name__})") from None
    tokens, channels = doc.get("decode_tokens"), doc.get("decode_channels")
    if not isinstance(tokens, int) or tokens < 0 or not isinstance(channels, dict):
        raise ToolOutputError(f"{path} has no per-channel decode statistics")
    if tokens == 0:  # no product ran through the sparse kernels (none pays at the level): none gathered
        return {k.name: [] for k in schema.KINDS}
    return {
        k.name: [np.asarray(layer, dtype=np.float64) / tokens for layer in channels.get(k.name, [])]
        for k in schema.KINDS
    }
