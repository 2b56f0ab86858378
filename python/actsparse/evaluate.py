"""`actsparse eval`: what sparsity costs, measured against the dense model on held-out data.

For the dense model and each (model file, level):

* text metrics on held-out text (LAMBADA passages, never the calibration text): perplexity,
  KL divergence against dense (mean, 99th percentile) and the same-top-token rate, from
  llama-perplexity's ``--kl-divergence`` machinery run with ``--sparse``; the realized sparsity
  comes from the same run (``--sparse-stats-file``, prefill phase);
* generation quality: the same KL divergence and same-top rate where a generating tool pays it,
  the prompt (each window's first half) dense and every later token decoded alone through the
  sparse kernels (:mod:`actsparse.generation`);
* the 8 zero-shot tasks of the CHESS paper, scored by log-likelihood on our runtime
  (:mod:`actsparse.zeroshot`).

Several files may be given (CHESS with and without attention, CATS, ... converted from the same
model): the dense model is measured once and every file's levels become one curve. Results go to
JSON (scripts), Markdown (people) and a PNG; all are written at the end through temporary files,
so an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, engine, generation, gguf_io, schema, tool_output
from .gguf_io import GGUFError
from .options import add_command, command_line
from .sparse_file import NoThresholdsError, SparseFile, cached_sparse_file
from .tool_output import ToolOutputError

DEFAULT_CTX = 512
DEFAULT_CHUNKS = 16
DEFAULT_GEN_WINDOWS = 4  # each costs ctx/2 single-token decodes per level
HELDOUT_CHARS = 2_000_000  # more than any chunk count asks for; llama-perplexity takes what it needs

# The yardstick a sparsity setting is judged by: llama.cpp's own KL-divergence table for its
# quantizations of Llama-3-8B (METHODS.md §6), mean KLD / same top token.
LLAMA_CPP_QUANT_KLD = {"q8_0": (0.0014, 0.977), "q6_K": (0.0055, 0.960), "q4_K_M": (0.031, 0.919)}
Q4_K_M_KLD = LLAMA_CPP_QUANT_KLD["q4_K_M"][0]


class EvalError(ToolOutputError):
    """A measurement could not be made; the message is one line."""


@dataclass(frozen=True)
class EvalOptions:
    models: list[Path]
    levels: str | None = None  # comma-separated; default: every level of each file
    tasks: str = "all"  # comma-separated names, "all" or "none"
    limit: int | None = None  # questions per task
    ctx: int = DEFAULT_CTX
    chunks: int = DEFAULT_CHUNKS  # 0 skips the text metrics
    gen_windows: int = DEFAULT_GEN_WINDOWS  # 0 skips the generation metrics
    threads: int = 2
    dense_only: bool = False
    json: Path | None = None
    markdown: Path | None = None
    png: Path | None = None


@dataclass
class Run:
    label: str  # "dense" or the method label
    model: str
    level: float  # 0 = dense
    text: dict[str, Any] = field(default_factory=dict)
    realized: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # weight bytes one decoded token reads at the realized sparsity, as a share of dense decode's
    bytes_share: float | None = None


def read_sparse_model(path: Path) -> SparseFile:
    try:
        return cached_sparse_file(path)  # the bytes model reads the same file again per run
    except NoThresholdsError:
        raise GGUFError(
            f"{path} has no sparsity thresholds: convert it with python/convert_with_thresholds.py "
            "(or pass --dense-only to measure it dense)"
        ) from None


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two GGUFs carry the same original tensors (names, types, shapes, bytes of one)."""

    def signature(path: Path) -> tuple[list[tuple[str, int, tuple[int, ...]]], bytes]:
        tensors = [t for t in gguf_io.tensor_table(path).values() if not schema.is_sparsity_tensor(t.name)]
        sig = sorted((t.name, t.tensor_type, t.shape) for t in tensors)
        first = min(tensors, key=lambda t: t.name)
        with open(path, "rb") as f:
            f.seek(first.data_offset)
            return sig, f.read(min(4096, first.n_bytes))

    return signature(a) == signature(b)


# --- text metrics: llama-perplexity ---------------------------------------------------------


KLD_MIN_SCORED = 100  # llama-perplexity prints no KL divergence statistics from fewer tokens


def scored_tokens(ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores: the second half of each chunk, its first token excepted."""
    return chunks * max(ctx - 1 - ctx // 2, 0)


def _perplexity_cmd(model: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> list[str]:
    return [
        str(engine.binary("llama-perplexity")),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-c",
        str(ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
    ]


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or ["(no output)"]
        raise EvalError(f"{Path(cmd[0]).name} failed: {tail[0]}")
    return proc


def dense_text_metrics(
    model: Path, text_file: Path, base_file: Path, ctx: int, chunks: int, threads: int
) -> dict[str, Any]:
    """Dense perplexity; saves the dense logits to base_file for the KL divergence runs."""
    proc = _run_tool(
        [*_perplexity_cmd(model, text_file, ctx, chunks, threads), "--kl-divergence-base", str(base_file)]
    )
    return {"ppl": tool_output.perplexity(proc.stdout + proc.stderr), "tokens": ctx * chunks}


def dense_kld(model: Path, text_file: Path, base_file: Path, ctx: int, chunks: int, threads: int) -> float:
    """Mean KL divergence of another dense model (same vocabulary) against the saved dense logits."""
    cmd = [*_perplexity_cmd(model, text_file, ctx, chunks, threads), "--kl-divergence-base", str(base_file),
           "--kl-divergence"]  # fmt: skip
    proc = _run_tool(cmd)
    return float(tool_output.kl_divergence(proc.stdout + proc.stderr)["kld_mean"])


def sparse_text_metrics(
    model: Path, level: float, text_file: Path, base_file: Path, ctx: int, chunks: int, threads: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(text metrics, realized sparsity) of `model` at `level` against the dense logits."""
    stats_file = base_file.with_name(base_file.name + ".sparsity.json")
    cmd = [
        *_perplexity_cmd(model, text_file, ctx, chunks, threads),
        "--kl-divergence-base",
        str(base_file),
        "--kl-divergence",
        "--sparse",
        f"{level:g}",
        "--sparse-stats-file",
        str(stats_file),
    ]
    proc = _run_tool(cmd)
    text = tool_output.kl_divergence(proc.stdout + proc.stderr) | {"tokens": ctx * chunks}
    return text, tool_output.sparsity_stats(stats_file, "prefill")


# --- zero-shot tasks ----------------------------------------------------------------------


def task_scores(
    model: Path, levels: list[float], tasks: list[str], limit: int | None, threads: int
) -> dict[float, dict[str, Any]]:
    """Scores of the tasks at each level (0 = dense) with one loaded model."""
    from . import runtime, zeroshot

    llm = runtime.Llama(str(model), n_ctx=zeroshot.DEFAULT_N_CTX, n_threads=threads, n_threads_batch=threads,
                        verbose=False)  # fmt: skip
    results = {}
    try:
        for level in levels:
            results[level] = zeroshot.score_tasks(
                llm, tasks, limit=limit, progress=True, sparse=level or None
            )
    finally:
        llm.close()
    return results


# --- the command --------------------------------------------------------------------------


def add_cli(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub, "eval", add_arguments, EvalOptions, run, description=__doc__.split("\n\n")[0],
        help="perplexity, KL divergence and zero-shot tasks: dense against each sparsity level",
    )  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        type=Path,
        nargs="+",
        metavar="MODEL",
        help="GGUFs written by convert_with_thresholds.py "
        "from the same model (e.g. CHESS, CHESS without attention, CATS)",
    )
    p.add_argument(
        "--levels", default=None, help="comma-separated levels (default: every level of each file)"
    )
    p.add_argument("--tasks", default="all", help="comma-separated task names, 'all' (default) or 'none'")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument(
        "--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per perplexity chunk (default {DEFAULT_CTX})"
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=DEFAULT_CHUNKS,
        help=f"held-out chunks (default {DEFAULT_CHUNKS}); 0 skips the text metrics",
    )
    p.add_argument(
        "--gen-windows",
        type=int,
        default=DEFAULT_GEN_WINDOWS,
        help=f"held-out windows for the generation metrics (default {DEFAULT_GEN_WINDOWS}): the first "
        "half of each dense, every later token decoded alone; 0 skips them",
    )
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument(
        "--dense-only", action="store_true", help="measure only the dense model (no thresholds needed)"
    )
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    p.add_argument("--png", type=Path, help="plot quality against sparsity, one curve per method")


def _parse_tasks(spec: str) -> list[str]:
    from .data import CHESS_TASKS, unknown_tasks

    if spec == "none":
        return []
    if spec == "all":
        return list(CHESS_TASKS)
    names = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = unknown_tasks(names)
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}; known: {', '.join(CHESS_TASKS)}")
    return names


def _parse_levels(spec: str | None) -> list[float] | None:
    if spec is None:
        return None
    try:
        levels = [round(float(x), 6) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated numbers, got {spec!r}") from None
    if not levels or any(not 0.0 < v < 1.0 for v in levels):
        raise ValueError(f"--levels must be in (0, 1), got {spec!r}")
    return levels


def _levels_text(levels: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in levels)


def _plan(args: EvalOptions) -> tuple[list[SparseFile], dict[Path, list[float]]]:
    if args.dense_only:
        gguf_io.open_gguf(args.models[0])
        return [], {}
    models = [read_sparse_model(p) for p in args.models]
    for m in models[1:]:
        if not _same_weights(models[0].path, m.path):
            raise ValueError(f"{m.path} is not converted from the same model as {models[0].path}")
    wanted = _parse_levels(args.levels)
    plan = {}
    for m in models:
        levels = m.levels if wanted is None else wanted
        missing = [v for v in levels if not m.has_level(v)]
        if missing:
            raise ValueError(
                f"{m.path.name} has no level {missing[0]:g}; available: {_levels_text(m.levels)}"
            )
        plan[m.path] = levels
    return models, plan


def run(options: EvalOptions) -> int:
    try:
        report = measure(options)
    except (GGUFError, ValueError, engine.EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ToolOutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_tables(report))
    if options.json:
        write_text_atomic(options.json, json.dumps(report, indent=2) + "\n")
    if options.markdown:
        write_text_atomic(options.markdown, markdown_tables(report))
    if options.png:
        plot(report, options.png)
    return 0


def measure(args: EvalOptions) -> dict[str, Any]:
    """The dense model and each file at each level: the report `actsparse eval` prints and writes.
    Bad input raises GGUFError or ValueError before anything runs; a failed measurement EvalError."""
    from .benchmark import machine_info
    from .data import heldout_corpus

    tasks = _parse_tasks(args.tasks)
    models, plan = _plan(args)
    if args.limit is not None and args.limit <= 0:
        raise ValueError("--limit must be positive")
    if args.chunks < 0 or args.gen_windows < 0 or args.ctx < 16:
        raise ValueError("--chunks and --gen-windows must be >= 0 and --ctx >= 16")
    scored = scored_tokens(args.ctx, args.chunks)
    if args.chunks and scored < KLD_MIN_SCORED:
        raise ValueError(
            f"--ctx {args.ctx} x --chunks {args.chunks} scores {scored} tokens; "
            f"llama-perplexity reports KL divergence from {KLD_MIN_SCORED}"
        )
    heldout = heldout_corpus()
    for m in models:
        if m.calibration.sha256 == heldout.sha256:
            raise ValueError(f"{m.path.name} was calibrated on the held-out text; calibrate on other text")

    dense_model = args.models[0]
    runs = [Run("dense", str(dense_model), 0.0)]
    for m in models:
        runs += [Run(m.label, str(m.path), level) for level in plan[m.path]]
    report: dict[str, Any] = {
        "tool": f"actsparse {__version__}",
        "command": command_line("actsparse eval", add_arguments, args),
        "machine": machine_info(measure_bandwidth=False),
        "threads": args.threads,
        "heldout": {
            "corpus": heldout.name,
            "sha256": heldout.sha256,
            "ctx": args.ctx,
            "chunks": args.chunks,
            "gen_windows": args.gen_windows,
        },  # fmt: skip
        "tasks": {"names": tasks, "limit": args.limit, "variant": "rc_0shot"},
    }
    with tempfile.TemporaryDirectory(prefix="actsparse-eval-") as tmp:
        if args.chunks > 0:
            _measure_text(runs, Path(tmp), heldout.text[:HELDOUT_CHARS], args)
        if args.gen_windows > 0:
            _measure_generation(runs, models, plan, heldout.text[:HELDOUT_CHARS], args)
        if tasks:
            _measure_tasks(runs, models, plan, tasks, args)
    _count_bytes(runs)
    report["runs"] = [asdict(r) for r in runs]
    report["summary"] = summarize(report)
    return report


def _measure_text(runs: list[Run], tmp: Path, text: str, args: EvalOptions) -> None:
    from tqdm import tqdm

    text_file, base_file = tmp / "heldout.txt", tmp / "dense.kld"
    text_file.write_text(text)
    bar = tqdm(runs, desc="perplexity / KLD", unit="run", file=sys.stderr)
    for r in bar:
        bar.set_postfix_str(f"{r.label} {r.level:g}")
        t0 = time.perf_counter()
        if r.level == 0:
            r.text = dense_text_metrics(
                Path(r.model), text_file, base_file, args.ctx, args.chunks, args.threads
            )
        else:
            r.text, r.realized = sparse_text_metrics(
                Path(r.model), r.level, text_file, base_file, args.ctx, args.chunks, args.threads
            )
        r.seconds += time.perf_counter() - t0


def _count_bytes(runs: list[Run]) -> None:
    """Each run's decode weight bytes per token (benchmark.weight_bytes_per_token: the file's copy
    types and the copy-cost rule, every channel of a kind equally likely active) at the sparsity
    it realized on the held-out text (the level where only generation or tasks ran)."""
    from .benchmark import weight_bytes_per_token

    dense: dict[str, float] = {}
    for r in runs:
        if r.level == 0:
            r.bytes_share = 1.0
            continue
        model = Path(r.model)
        if r.model not in dense:
            dense[r.model] = weight_bytes_per_token(model)
        overall = r.realized.get("overall", {})
        s = {k.name: float(overall.get(k.name, r.level) or 0.0) for k in schema.KINDS}
        r.bytes_share = weight_bytes_per_token(model, s, level=r.level) / dense[r.model]


def _measure_generation(
    runs: list[Run], models: list[SparseFile], plan: dict[Path, list[float]], text: str, args: EvalOptions
) -> None:
    from tqdm import tqdm

    options = generation.GenerationOptions(ctx=args.ctx, windows=args.gen_windows, threads=args.threads)
    total = sum(generation.decoded_tokens(plan[m.path], options) for m in models)
    with tqdm(total=total, desc="generation KLD", unit="tok", file=sys.stderr) as bar:
        for m in models:
            t0 = time.perf_counter()
            found = generation.measure(m.path, plan[m.path], text, options, on_token=lambda: bar.update(1))
            per_run = (time.perf_counter() - t0) / len(plan[m.path])
            for r in runs:
                if Path(r.model) == m.path and r.level in found:
                    r.generation = found[r.level]
                    r.seconds += per_run


def _measure_tasks(
    runs: list[Run],
    models: list[SparseFile],
    plan: dict[Path, list[float]],
    tasks: list[str],
    args: EvalOptions,
) -> None:
    dense_model = Path(runs[0].model)
    jobs = {dense_model: [0.0]}
    for m in models:
        jobs.setdefault(m.path, []).extend(plan[m.path])
    for path, levels in jobs.items():
        print(
            f"zero-shot tasks: {path.name} at {', '.join(f'{v:g}' if v else 'dense' for v in levels)}",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        scores = task_scores(path, levels, tasks, args.limit, args.threads)
        per_run = (time.perf_counter() - t0) / len(levels)
        for r in runs:
            if Path(r.model) == path and r.level in scores:
                r.tasks = scores[r.level]
                r.seconds += per_run


# --- summary, tables, plot ----------------------------------------------------------------


def _avg_acc(run: dict[str, Any], metric: str = "acc") -> float | None:
    avg = run.get("tasks", {}).get("average")
    return None if not avg else avg.get(metric)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Differences to dense per run, and the paper's claim CHESS <= CATS in KL divergence."""
    runs = report["runs"]
    dense = runs[0]
    rows = []
    for r in runs[1:]:
        row: dict[str, Any] = {"label": r["label"], "level": r["level"], "bytes_share": r.get("bytes_share")}
        if r["text"]:
            row["ppl_increase"] = r["text"]["ppl"] / dense["text"]["ppl"] - 1.0
            row["kld_mean"] = r["text"]["kld_mean"]
        if r.get("generation"):
            row["generation_kld_mean"] = r["generation"]["kld_mean"]
        if _avg_acc(r) is not None and _avg_acc(dense) is not None:
            row["avg_acc_drop_points"] = 100.0 * (_avg_acc(dense) - _avg_acc(r))
        rows.append(row)
    claims = []
    by = {(r["label"], r["level"]): r for r in rows}
    for chess_label, cats_label in (("CHESS", "CATS"), ("CHESS+attn", "CATS+attn")):
        for (label, level), row in sorted(by.items()):
            other = by.get((cats_label, level))
            if label == chess_label and other and "kld_mean" in row and "kld_mean" in other:
                claims.append(
                    {
                        "claim": f"{chess_label} KLD <= {cats_label} KLD",
                        "level": level,
                        "chess": row["kld_mean"],
                        "cats": other["kld_mean"],
                        "holds": row["kld_mean"] <= other["kld_mean"],
                    }
                )
    return {"vs_dense": rows, "chess_vs_cats": claims}


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_tables(report: dict[str, Any]) -> str:
    runs = report["runs"]
    dense = runs[0]
    held = report["heldout"]
    out = []
    if any(r["text"] for r in runs):
        out += [
            f"Held-out text: {held['corpus']} ({held['chunks']} × {held['ctx']} tokens); "
            f"{report['threads']} threads. bytes/token: the weight bytes a decoded token reads at the "
            "realized sparsity (the file's copy types), as a share of dense decode's.\n",
            "| method | level | realized FFN | realized q / o in | bytes/token | PPL | ΔPPL | KLD mean "
            "| KLD p99 | same top |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            t, s = r["text"], r["realized"].get("overall", {})
            if not t:
                continue
            dppl = None if r is dense else 100.0 * (t["ppl"] / dense["text"]["ppl"] - 1.0)
            out.append(
                f"| {r['label']} | {r['level']:g} | {_fmt(s.get('ffn'), '.3f')} | "
                f"{_fmt(s.get('attn_q_in'), '.3f')} / {_fmt(s.get('attn_o_in'), '.3f')} | "
                f"{_fmt(r.get('bytes_share'), '.3f')} | {t['ppl']:.3f} | "
                f"{_fmt(dppl, '+.1f')}{'' if dppl is None else '%'} | {_fmt(t.get('kld_mean'), '.4f')} | "
                f"{_fmt(t.get('kld_p99'), '.4f')} | {_fmt(t.get('same_top'), '.3f')} |"
            )
        out.append("")
    if any(r.get("generation") for r in runs):
        g = next(r["generation"] for r in runs if r.get("generation"))
        out += [
            f"Generation: {g['windows']} held-out windows of {g['ctx']} tokens, the first half a dense "
            f"prompt, then each token decoded alone ({g['tokens']} positions per level); all positions "
            "sparse beside it.\n",
            "| method | level | KLD mean, generation | same top, generation "
            "| KLD mean, all positions sparse |",
            "|---|---|---|---|---|",
        ]
        for r in runs:
            if r.get("generation"):
                g, t = r["generation"], r["text"]
                out.append(
                    f"| {r['label']} | {r['level']:g} | {g['kld_mean']:.4f} | {g['same_top']:.3f} | "
                    f"{_fmt(t.get('kld_mean'), '.4f')} |"
                )
        out.append("")
    names = report["tasks"]["names"]
    if names and any(r["tasks"] for r in runs):
        limit = report["tasks"]["limit"]
        out.append(
            "Zero-shot accuracy (acc / acc_norm, %), rc_0shot, "
            + ("all questions" if limit is None else f"first {limit} questions per task")
            + ":\n"
        )
        out.append("| method | level | " + " | ".join(names) + " | average | Δ avg acc |")
        out.append("|---|---|" + "---|" * (len(names) + 2))
        for r in runs:
            if not r["tasks"]:
                continue
            cells = [
                f"{100 * r['tasks'][n]['acc']:.1f} / {100 * r['tasks'][n]['acc_norm']:.1f}" for n in names
            ]
            avg = r["tasks"]["average"]
            drop = None if r is dense else 100.0 * (_avg_acc(r) - _avg_acc(dense))
            out.append(
                f"| {r['label']} | {r['level']:g} | "
                + " | ".join(cells)
                + f" | {100 * avg['acc']:.1f} / {100 * avg['acc_norm']:.1f} | {_fmt(drop, '+.1f')} |"
            )
        out.append("")
    claims = report.get("summary", {}).get("chess_vs_cats", [])
    if claims:
        out.append("CHESS against CATS (mean KL divergence, lower is better):\n")
        out.append("| level | claim | CHESS | CATS | holds |")
        out.append("|---|---|---|---|---|")
        for c in claims:
            out.append(
                f"| {c['level']:g} | {c['claim']} | {c['chess']:.4f} | {c['cats']:.4f} "
                f"| {'yes' if c['holds'] else 'no'} |"
            )
        out.append("")
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    """Quality against the weight bytes a decoded token reads, one curve per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    dense = runs[0]
    labels = list(dict.fromkeys(r["label"] for r in runs[1:]))
    panels = []
    if dense["text"]:
        panels += [
            ("mean KL divergence vs dense", lambda r: r["text"].get("kld_mean"), None),
            ("perplexity (held-out)", lambda r: r["text"].get("ppl"), dense["text"]["ppl"]),
        ]
    if any(r.get("generation") for r in runs):
        panels.insert(1, ("mean KLD, generation", lambda r: r.get("generation", {}).get("kld_mean"), None))
    if dense["tasks"]:
        panels.append(("8-task average acc (%)", lambda r: 100 * _avg_acc(r), 100 * _avg_acc(dense)))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, value, dense_value) in zip(axes[0], panels, strict=True):
        for label in labels:
            pts = []
            for r in runs[1:]:
                if r["label"] != label or not (r["text"] or r["tasks"] or r.get("generation")):
                    continue
                y = value(r)
                if y is not None:
                    pts.append((r.get("bytes_share") or 1.0 - r["level"], y))
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), "o-", label=label)
        if dense_value is not None:
            ax.axhline(dense_value, color="black", lw=1, ls="--", label="dense")
        ax.set_xlabel("decode weight bytes per token (share of dense)")
        ax.invert_xaxis()  # sparser to the right
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(Path(dense["model"]).name, fontsize=9)
    fig.tight_layout()
    with gguf_io.atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_text_atomic(path: Path, text: str) -> None:
    with gguf_io.atomic_output(path) as tmp:
        tmp.write_text(text)
