"""`actsparse bench`: dense against sparse decode and prefill in one run, next to the
bytes-per-token ceiling and to the memory bound.

Each repeat runs llama-bench once per level (0 = dense first), so the levels interleave
(A B C A B C ...) and drift on a shared machine hits them alike; the report gives medians.

The ceiling counts every weight byte alike. The memory bound is measured: actsparse-bench-reads
reads the same bytes one decode step reads, in buffers of the same sizes, gathered rows drawn with
each channel's measured probability of being active, split between threads as the runtime splits
them, with no arithmetic. A decode step reads at least those bytes, so it takes at least that time:
the bound is dense decode's measured time over it, and the fraction reached is that time over the
level's measured decode time. It includes what the memory system does to gathered rows (a gathered
byte costs more than a streamed one: `gathered_read_cost`) and what the caches hold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import engine, gguf_io, schema, tool_output
from .gguf_io import GGUFError
from .options import add_command
from .sparse_file import cached_sparse_file, read_sparse_file


@dataclass(frozen=True)
class BenchOptions:
    model: Path
    levels: str | None = None  # comma-separated; default: every level of the file
    threads: int = 2
    repeats: int = 3
    n_prompt: int = 512  # 0: no prefill measurement
    n_gen: int = 32
    json: Path | None = None
    png: Path | None = None
    quiet: bool = False


@dataclass
class LevelResult:
    level: float
    decode_tps: list[float] = field(default_factory=list)
    prefill_tps: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    realized: dict[str, float] = field(default_factory=dict)  # ffn, attn_q_in, attn_o_in
    ceiling: float = 1.0
    streamed_bytes: float = 0.0  # weight bytes per token read whole
    gathered_bytes: float = 0.0  # and as gathered active rows
    reads_seconds: float = 0.0  # the step's weight reads alone, measured (time_reads)
    gathered_read_cost: float = 1.0  # time per gathered byte over time per streamed byte, in those reads

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tps)

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_tps) if self.prefill_tps else float("nan")

    def ratios(self, dense: LevelResult) -> tuple[float, float]:
        """Decode and prefill speed over dense: the median of the per-repeat ratios. Each repeat
        runs every level back to back, so a ratio within one repeat cancels the machine's drift
        between repeats, which a ratio of medians would not."""

        def median_ratio(ours: list[float], theirs: list[float]) -> float:
            if not ours:
                return float("nan")
            return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))

        return median_ratio(self.decode_tps, dense.decode_tps), median_ratio(
            self.prefill_tps, dense.prefill_tps
        )


@dataclass(frozen=True)
class WeightRead:
    """One matrix a decode step reads: whole (streamed) or only its active rows (gathered)."""

    name: str
    row_bytes: int
    rows: int
    active: np.ndarray | None = None  # gathered: each row's probability of being read

    @property
    def nbytes(self) -> float:
        return float(self.row_bytes * (self.rows if self.active is None else self.active.sum()))


Activity = dict[str, list[np.ndarray]]  # kind name -> per layer, each channel's fraction of tokens active


Sparsity = Mapping[str, float]  # kind name -> realized sparsity (a kind not named: 0)


def uniform_activity(path: Path, sparsity: Sparsity) -> Activity:
    """Every channel of a kind active with the same probability: 1 - its realized sparsity."""
    tensors = gguf_io.tensor_table(path)
    out: Activity = {}
    for kind in schema.KINDS:
        layers: list[np.ndarray] = []
        out[kind.name] = layers
        share = sparsity.get(kind.name) or 0.0  # absent or None (a kind the run did not count): dense
        if share <= 0:
            continue  # read whole
        for il in itertools.count():
            copy = tensors.get(kind.copy_name(il))
            if copy is None or kind.thresh_name(il) not in tensors:
                break
            layers.append(np.full(int(copy.shape[1]), 1.0 - share))
    return out


def layer_targets(path: Path, level: float | None) -> Callable[[schema.Kind, int], float]:
    """(kind, layer) -> the sparsity that layer's kind aims at, at `level` (SparseFile.target where
    the file has the level, else the level itself)."""
    if level is not None:
        try:
            f = cached_sparse_file(path)
        except GGUFError:
            f = None
        if f is not None and f.allocated and f.has_level(level):
            return lambda kind, il: f.target(kind, il, level)
    return lambda kind, il: float(level or 0.0)


def decode_reads(
    path: Path, level: float | None = None, activity: Activity | None = None
) -> list[WeightRead]:
    """The weight reads of one decode step, in file order: every matrix it multiplies (the output
    layer included, token_embd only when it doubles as the output) is read whole, except, at a
    sparse `level` with each channel's measured `activity`, ffn_up and each transposed copy the
    runtime chooses to read (schema.sparse_kernel_pays at the layer's target: its allocation at a
    level of the file, else `level`), of which only the active rows are read, at their real type.
    Without a level: dense decode of the original tensors."""
    tensors = gguf_io.tensor_table(path)
    target = layer_targets(path, level)
    reads = []
    for name in schema.decode_matrices(tensors):
        t = tensors[name]
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", name)
        kind = m.group(2) if m else name
        rows = int(np.prod(t.shape[1:]))
        whole = WeightRead(name, t.n_bytes // rows, rows)
        # the kind this file sparsifies the product's input by (ffn_up: CHESS reads its rows)
        sparse_kind = None if not m else next(
            (k for k in schema.KINDS
             if k.thresh_name(int(m.group(1))) in tensors
             and kind in (k.weight_kind, "ffn_up" if k is schema.FFN else "")),
            None,
        )  # fmt: skip
        layer_activity = None
        if level is not None and activity is not None and sparse_kind and m:
            layers = activity.get(sparse_kind.name, [])
            il = int(m.group(1))
            layer_activity = layers[il] if il < len(layers) and len(layers[il]) else None
        if layer_activity is None:
            reads.append(whole)
            continue
        if kind == "ffn_up" and sparse_kind is schema.FFN:
            reads.append(WeightRead(name, whole.row_bytes, rows, layer_activity))
            continue
        copy = tensors[sparse_kind.copy_name(int(m.group(1)))]
        if schema.sparse_kernel_pays(target(sparse_kind, int(m.group(1))), copy.n_bytes, t.n_bytes):
            copy_rows = int(np.prod(copy.shape[1:]))
            reads.append(WeightRead(copy.name, copy.n_bytes // copy_rows, copy_rows, layer_activity))
        else:
            reads.append(whole)
    return reads


def split_bytes(reads: list[WeightRead]) -> tuple[float, float]:
    """(streamed, gathered) bytes of a decode step's reads."""
    streamed = sum(r.nbytes for r in reads if r.active is None)
    return streamed, sum(r.nbytes for r in reads if r.active is not None)


def weight_bytes_read(
    path: Path, sparsity: Sparsity | None = None, level: float | None = None
) -> tuple[float, float]:
    """Weight bytes one decode step reads, as (streamed, gathered), with every channel of a kind
    equally likely to be active (its realized `sparsity`, at target `level`, by default the
    largest; decode_reads). Without sparsity: dense decode."""
    shares = [v for v in (sparsity or {}).values() if v]
    if not shares:
        return split_bytes(decode_reads(path))
    activity = uniform_activity(path, sparsity or {})
    return split_bytes(decode_reads(path, max(shares) if level is None else level, activity))


def weight_bytes_per_token(path: Path, sparsity: Sparsity | None = None, level: float | None = None) -> float:
    """All weight bytes one decode step reads (weight_bytes_read, streamed and gathered alike)."""
    return sum(weight_bytes_read(path, sparsity, level))


def huge_pages_on() -> bool:
    """Whether the runtime moves the gathered weights onto huge pages (ACTSPARSE_HUGE_PAGES)."""
    return os.environ.get("ACTSPARSE_HUGE_PAGES", "1") != "0"


@dataclass
class ReadsTiming:
    """actsparse-bench-reads' figures for one decode step's weight reads."""

    seconds: float  # median step
    stream_seconds: float  # of which the matrices read whole (mean)
    stream_bytes: float
    gather_seconds: float  # and the gathered active rows (mean)
    gather_bytes: float

    @property
    def gathered_read_cost(self) -> float:
        """Time per gathered byte over time per streamed byte, both in this one run."""
        if not self.gather_bytes or not self.stream_bytes or not self.stream_seconds:
            return 1.0
        return (self.gather_seconds / self.gather_bytes) / (self.stream_seconds / self.stream_bytes)


def time_reads(reads: list[WeightRead], threads: int, repeats: int = 3) -> ReadsTiming:
    """The time this machine takes for a decode step's weight reads alone, with no arithmetic
    (actsparse-bench-reads: the same sizes, rows drawn with the measured probabilities, the runtime's
    split between threads, a barrier after each matrix, huge pages where the runtime uses them).
    Decode cannot be faster."""
    with tempfile.TemporaryDirectory(prefix="actsparse-bench-") as tmp:
        plan = Path(tmp) / "reads.txt"
        with plan.open("w") as f:
            for r in reads:
                if r.active is None:
                    f.write(f"stream {r.row_bytes * r.rows}\n")
                else:
                    probs = " ".join(f"{p:.4g}" for p in np.clip(r.active, 0.0, 1.0))
                    f.write(f"gather {r.row_bytes} {r.rows} {probs}\n")
        cmd = [str(engine.binary("actsparse-bench-reads")), str(plan), "-t", str(threads), "-r", str(repeats)]
        if not huge_pages_on():
            cmd.append("--small-pages")
        out, _ = _run(cmd)
    j = json.loads(out)
    return ReadsTiming(
        float(j["seconds_per_token"]),
        float(j["stream_seconds_per_token"]),
        float(j["stream_bytes_per_token"]),
        float(j["gather_seconds_per_token"]),
        float(j["gather_bytes_per_token"]),
    )


def _run(cmd: list[str]) -> tuple[str, float]:
    """Run a command; return its stdout and peak resident memory in MB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed with exit code {proc.returncode}")
    return out, usage.ru_maxrss / 1024.0


def llama_bench(
    model: Path, level: float, threads: int, n_prompt: int, n_gen: int
) -> tuple[float, float | None, float]:
    """(decode t/s, prefill t/s or None when n_prompt is 0, peak RSS MB) of one llama-bench run."""
    cmd = [str(engine.binary("llama-bench")), "-m", str(model), "-t", str(threads), "--sparse", f"{level:g}",
           "-p", str(n_prompt), "-n", str(n_gen), "-r", "1", "-o", "json"]  # fmt: skip
    out, rss = _run(cmd)
    rows = json.loads(out)
    prefill = next((r["avg_ts"] for r in rows if r["n_prompt"] > 0), None)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return decode, prefill, rss


def realized_sparsity(model: Path, level: float, threads: int) -> tuple[dict[str, float], Activity]:
    """Overall realized sparsity of 64 decoded tokens at `level` (0 for a kind never sparsified),
    and how often each channel was active in them."""
    with tempfile.TemporaryDirectory(prefix="actsparse-bench-") as tmp:
        stats_file = Path(tmp) / "sparsity.json"
        cmd = [str(engine.binary("llama-completion")), "-m", str(model),
               "-p", "The history of the city begins", "-n", "64", "-t", str(threads),
               "--temp", "0", "-no-cnv", "--no-warmup",
               "--sparse", f"{level:g}", "--sparse-stats-file", str(stats_file)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError("llama-completion --sparse failed")
        overall = tool_output.sparsity_stats(stats_file, "decode")["overall"]
        activity = tool_output.channel_activity(stats_file)
    return {kind.name: overall[kind.name] or 0.0 for kind in schema.KINDS}, activity


def read_bandwidth_gbs(size_mb: int = 512) -> float:
    """Single-threaded streaming read bandwidth (numpy sum over a buffer larger than the caches)."""
    a = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    a.sum()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(measure_bandwidth: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine()}
    if measure_bandwidth:
        info["read_bandwidth_gbs"] = read_bandwidth_gbs()
    return info


def add_cli(sub: argparse._SubParsersAction) -> None:
    help = "dense against sparse decode/prefill speed, next to the ceiling"
    add_command(sub, "bench", add_arguments, BenchOptions, run, help=help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a GGUF written by convert_with_thresholds.py")
    p.add_argument("--levels", default=None, help="comma-separated levels (default: all of the file's)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument(
        "-p", "--n-prompt", type=int, default=512, help="prefill tokens (default 512; 0: decode only)"
    )
    p.add_argument("-n", "--n-gen", type=int, default=32, help="decode tokens (default 32)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--png", type=Path, help="plot decode speed-up against the ceiling")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per llama-bench run")


def bench_levels(options: BenchOptions) -> list[float]:
    """The levels to measure, checked against the file's; ValueError/GGUFError name the problem."""
    info = read_sparse_file(options.model)
    if options.repeats < 1 or options.threads < 1 or options.n_gen < 1 or options.n_prompt < 0:
        raise ValueError("--repeats, --threads and -n must be positive, -p 0 or more")
    if options.levels is None:
        return list(info.levels)
    try:
        levels = [float(x) for x in options.levels.split(",")]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated numbers, got {options.levels!r}") from None
    unknown = [v for v in levels if not info.has_level(v)]
    if unknown:
        raise ValueError(f"levels {unknown} are not in the file; available: {info.levels}")
    return levels


def measure(options: BenchOptions) -> dict[str, Any]:
    """Dense and each level, interleaved; the report `actsparse bench` prints and writes."""
    levels = bench_levels(options)
    model, threads = options.model, options.threads
    results = [LevelResult(0.0)] + [LevelResult(v) for v in levels]
    for _ in range(options.repeats):
        for r in results:
            decode, prefill, rss = llama_bench(model, r.level, threads, options.n_prompt, options.n_gen)
            r.decode_tps.append(decode)
            if prefill is not None:
                r.prefill_tps.append(prefill)
            r.peak_rss_mb = max(r.peak_rss_mb, rss)
            if not options.quiet:
                pre = "" if prefill is None else f", prefill {prefill:.2f} t/s"
                print(f"level {r.level:g}: decode {decode:.2f} t/s{pre}", file=sys.stderr)
    dense_reads = decode_reads(model)
    dense_bytes = sum(split_bytes(dense_reads))
    results[0].streamed_bytes = dense_bytes
    dense_timing = time_reads(dense_reads, threads)
    results[0].reads_seconds = dense_timing.seconds
    stream_rate = dense_bytes / dense_timing.seconds
    for r in results[1:]:
        r.realized, activity = realized_sparsity(model, r.level, threads)
        reads = decode_reads(model, r.level, activity)
        r.streamed_bytes, r.gathered_bytes = split_bytes(reads)
        r.ceiling = dense_bytes / (r.streamed_bytes + r.gathered_bytes)
        timing = time_reads(reads, threads)
        r.reads_seconds = timing.seconds
        r.gathered_read_cost = timing.gathered_read_cost
    report: dict[str, Any] = {
        "model": str(model),
        "machine": machine_info(),
        "threads": threads, "repeats": options.repeats, "n_prompt": options.n_prompt, "n_gen": options.n_gen,
        "dense_weight_bytes_per_token": dense_bytes,
        "stream_rate_gbs": stream_rate / 1e9,
        "huge_pages": huge_pages_on(),
        "levels": [],
    }  # fmt: skip
    dense = results[0]
    for r in results:
        ratio, pratio = r.ratios(dense)
        of_bound = r.reads_seconds * r.decode_median  # the reads' share of a decode step's time
        report["levels"].append(
            asdict(r) | {
                "decode_median": r.decode_median,
                "prefill_median": r.prefill_median if r.prefill_tps else None,
                "decode_ratio": ratio,
                "prefill_ratio": pratio if r.prefill_tps else None,
                "efficiency": ratio / r.ceiling,
                "memory_bound": ratio / of_bound,
                "of_memory_bound": of_bound,
            }
        )  # fmt: skip
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'level':>6} {'decode t/s':>11} {'x dense':>8} {'ceiling':>8} {'eff.':>6} {'mem bound':>10} "
             f"{'of bound':>9} {'MB read':>8} {'gathered':>9} {'cost':>5} {'prefill t/s':>12} {'x dense':>8} "
             f"{'peak MB':>8}"]  # fmt: skip
    for e in report["levels"]:
        prefill = "-" if e["prefill_median"] is None else f"{e['prefill_median']:.2f}"
        pratio = "-" if e["prefill_ratio"] is None else f"{e['prefill_ratio']:.3f}"
        read = (e["streamed_bytes"] + e["gathered_bytes"]) / 1e6
        cost = f"{e['gathered_read_cost']:.2f}" if e["gathered_bytes"] else "-"
        lines.append(
            f"{e['level']:6g} {e['decode_median']:11.2f} {e['decode_ratio']:8.3f} {e['ceiling']:8.3f} "
            f"{e['efficiency']:6.0%} {e['memory_bound']:10.3f} {e['of_memory_bound']:9.0%} {read:8.0f} "
            f"{e['gathered_bytes'] / 1e6:9.0f} {cost:>5} {prefill:>12} {pratio:>8} {e['peak_rss_mb']:8.0f}"
        )
    lines.append(
        f"mem bound: dense decode's time over the time this machine takes to read the level's weight bytes "
        f"alone (streams at {report['stream_rate_gbs']:.1f} GB/s; a gathered byte costs 'cost' streamed ones)"
    )
    return "\n".join(lines)


def run(options: BenchOptions) -> int:
    try:
        report = measure(options)
    except (GGUFError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, engine.EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(report))
    if options.json:
        with gguf_io.atomic_output(options.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if options.png:
        plot(report, options.png)
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [e["level"] for e in report["levels"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [e["decode_ratio"] for e in report["levels"]], "o-", label="decode, measured")
    ax.plot(levels, [e["ceiling"] for e in report["levels"]], "s--", label="bytes-per-token ceiling")
    ax.plot(
        levels, [e["memory_bound"] for e in report["levels"]], "d-.", label="memory bound (the reads alone)"
    )
    if all(e["prefill_ratio"] is not None for e in report["levels"]):
        ax.plot(levels, [e["prefill_ratio"] for e in report["levels"]], "^:", label="prefill, measured")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sparsity level")
    ax.set_ylabel("speed relative to dense")
    ax.set_title(Path(report["model"]).name, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
