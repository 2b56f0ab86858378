"""`actsparse bench`: dense against sparse decode and prefill in one run, next to the
bytes-per-token ceiling and to what this machine's memory system allows.

Each repeat runs llama-bench once per level (0 = dense first), so the levels interleave
(A B C A B C ...) and drift on a shared machine hits them alike; the report gives medians.

The ceiling counts every weight byte alike. Sparse decode reads some of them gathered (the active
rows of ffn_up and of the transposed copies), and a memory system reads gathered rows more slowly
than it streams a whole matrix: the memory bound prices the gathered bytes at the cost measured
here by actsparse-bench-kernels (the same rows read with no arithmetic, active rows alone against
every row) at the level's realized sparsity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import engine, gguf_io, schema, tool_output
from .gguf_io import GGUFError
from .options import add_command


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
    gathered_read_cost: float = 1.0  # time per gathered byte over time per streamed byte, measured
    memory_bound: float = 1.0  # the ceiling with gathered bytes priced at that cost

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


def weight_bytes_read(
    path: Path, s_ffn: float = 0.0, s_q: float = 0.0, s_o: float = 0.0, level: float | None = None
) -> tuple[float, float]:
    """Weight bytes one decode step reads, as (streamed, gathered): every matrix it multiplies
    (the output layer included, token_embd only when it doubles as the output) is read whole,
    except, with sparsity (realized s_*, at target `level`), ffn_up and each transposed copy the
    runtime chooses to read, of which only the active rows are read (gathered), at their real type."""
    tensors = {t.name: t for t in gguf_io.open_gguf(path).tensors}
    nbytes = {name: t.n_bytes for name, t in tensors.items()}
    streamed = gathered = 0.0
    for name, n in nbytes.items():
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", name)
        kind = m.group(2) if m else name
        shape = tensors[name].shape
        if (
            not name.endswith(".weight")
            or schema.is_sparsity_tensor(name)
            or "norm" in kind
            or shape.size < 2
            or int(shape[1]) == 1
        ):
            continue
        if name == "token_embd.weight" and "output.weight" in nbytes:
            continue  # only gathered
        sparse_kind = next((k for k in schema.KINDS if k.weight_kind == kind), None)
        copy_bytes = nbytes.get(sparse_kind.copy_name(int(m.group(1)))) if sparse_kind and m else None
        s = {"ffn_up": s_ffn, "ffn_down": s_ffn, "attn_q": s_q, "attn_output": s_o}.get(kind, 0.0)
        target = s if level is None else level
        if kind == "ffn_up" and s > 0:
            gathered += (1 - s) * n
        elif copy_bytes and s > 0 and schema.sparse_kernel_pays(target, copy_bytes, n):
            gathered += (1 - s) * copy_bytes
        else:
            streamed += n
    return streamed, gathered


def weight_bytes_per_token(
    path: Path, s_ffn: float = 0.0, s_q: float = 0.0, s_o: float = 0.0, level: float | None = None
) -> float:
    """All weight bytes one decode step reads (weight_bytes_read, streamed and gathered alike)."""
    return sum(weight_bytes_read(path, s_ffn, s_q, s_o, level))


def gathered_read_cost(threads: int, sparsity: float, repeats: int = 5) -> float:
    """Time per byte reading the active rows of a matrix larger than the caches, over time per
    byte streaming all of its rows (actsparse-bench-kernels, no arithmetic): 1 where gathering
    costs nothing extra."""
    cmd = [str(engine.binary("actsparse-bench-kernels")), "--json", "--types", "q8_0", "-t", str(threads),
           "-s", f"{min(max(sparsity, 0.0), 0.95):.3f}", "-r", str(repeats)]  # fmt: skip
    out, _ = _run(cmd)
    row = json.loads(out)["types"][0]
    return row["read_all_gbs"] / row["read_active_gbs"]


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


def realized_sparsity(model: Path, level: float, threads: int) -> dict[str, float]:
    """Overall realized sparsity of 64 decoded tokens at `level` (0 for a kind never sparsified)."""
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
    return {kind.name: overall[kind.name] or 0.0 for kind in schema.KINDS}


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
    from .sparse_file import read_sparse_file

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
    dense_bytes = weight_bytes_per_token(model)
    for r in results[1:]:
        r.realized = realized_sparsity(model, r.level, threads)
        r.streamed_bytes, r.gathered_bytes = weight_bytes_read(model, *r.realized.values(), level=r.level)
        r.ceiling = dense_bytes / (r.streamed_bytes + r.gathered_bytes)
        r.gathered_read_cost = gathered_read_cost(threads, r.realized["ffn"])
        r.memory_bound = dense_bytes / (r.streamed_bytes + r.gathered_bytes * r.gathered_read_cost)
    report: dict[str, Any] = {
        "model": str(model),
        "machine": machine_info(),
        "threads": threads, "repeats": options.repeats, "n_prompt": options.n_prompt, "n_gen": options.n_gen,
        "dense_weight_bytes_per_token": dense_bytes,
        "levels": [],
    }  # fmt: skip
    dense = results[0]
    for r in results:
        ratio, pratio = r.ratios(dense)
        report["levels"].append(
            asdict(r) | {
                "decode_median": r.decode_median,
                "prefill_median": r.prefill_median if r.prefill_tps else None,
                "decode_ratio": ratio,
                "prefill_ratio": pratio if r.prefill_tps else None,
                "efficiency": ratio / r.ceiling,
                "of_memory_bound": ratio / r.memory_bound,
            }
        )  # fmt: skip
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'level':>6} {'decode t/s':>11} {'x dense':>8} {'ceiling':>8} {'eff.':>6} {'mem bound':>10} "
             f"{'of bound':>9} {'prefill t/s':>12} {'x dense':>8} {'peak MB':>8}"]  # fmt: skip
    for e in report["levels"]:
        prefill = "-" if e["prefill_median"] is None else f"{e['prefill_median']:.2f}"
        pratio = "-" if e["prefill_ratio"] is None else f"{e['prefill_ratio']:.3f}"
        lines.append(
            f"{e['level']:6g} {e['decode_median']:11.2f} {e['decode_ratio']:8.3f} {e['ceiling']:8.3f} "
            f"{e['efficiency']:6.0%} {e['memory_bound']:10.3f} {e['of_memory_bound']:9.0%} "
            f"{prefill:>12} {pratio:>8} {e['peak_rss_mb']:8.0f}"
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
        levels, [e["memory_bound"] for e in report["levels"]], "d-.", label="memory bound (gathered reads)"
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
