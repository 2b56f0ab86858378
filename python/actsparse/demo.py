"""`make demo`: the main job on the default model, from a fresh machine.

Fetches the default model, converts it with a small calibration, generates text from one prompt
dense and sparse with the built llama-completion, then measures, for each level, what a user
trades: decode speed against dense llama.cpp in the same run (llama-bench, interleaved repeats,
next to the memory bound of `actsparse bench`) and the quality cost on held-out text (perplexity
and KL divergence, next to llama.cpp's own q4_K_M cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import benchmark, convert, engine, evaluate, models, registry, schema, tool_output
from .evaluate import Q4_K_M_KLD
from .gguf_io import GGUFError
from .options import add_command
from .sparse_file import read_sparse_file

PROMPT = "The three most important ideas in the history of science are"
DEMO_LEVELS = "0.3,0.5,0.7"
# below this the demo explains why the speed-up is small
SMALL_SPEEDUP = 1.15


@dataclass(frozen=True)
class DemoOptions:
    model: str | None = None  # a name from `actsparse models list`; default: the default model
    prompt: str = PROMPT
    n_predict: int = 64
    threads: int = 2
    calib_tokens: int = 4096
    levels: str = DEMO_LEVELS
    output: Path | None = None  # the converted model; default: beside the fetched one
    repeats: int = 5  # interleaved llama-bench repeats
    chunks: int = 8  # held-out chunks of 256 tokens for the quality figures
    json: Path | None = None


@dataclass
class Generation:
    text: str
    decode_tps: float


def generate(
    model: Path, prompt: str, n_predict: int, threads: int, extra: list[str] | None = None
) -> Generation:
    cmd = [
        str(engine.binary("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n_predict),
        "-t", str(threads), "--temp", "0", "-no-cnv", "--no-warmup", "--seed", "1", *(extra or []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"llama-completion failed: {last[0]}")
    tps = tool_output.decode_tokens_per_second(proc.stderr)
    return Generation(text=proc.stdout.strip(), decode_tps=float("nan") if tps is None else tps)


def add_cli(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub, "demo", add_arguments, DemoOptions, run, description=__doc__.split("\n\n")[1],
        help="fetch the default model, convert it, generate dense and sparse, measure speed and quality",
    )  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="model name from `actsparse models list` (default: the default model)"
    )
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument(
        "--calib-tokens", type=int, default=4096, help="calibration tokens for the demo (default 4096)"
    )
    p.add_argument(
        "--levels", default=DEMO_LEVELS, help=f"levels to convert and measure (default {DEMO_LEVELS})"
    )
    p.add_argument(
        "-o", "--output", type=Path, default=None, help="converted model (default: beside the model)"
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved llama-bench repeats (default 5)")
    p.add_argument("--chunks", type=int, default=8, help="held-out chunks of 256 tokens (default 8)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def quality_words(kld: float, ppl_dense: float, ppl: float, same_top: float) -> str:
    return (
        f"perplexity {ppl_dense:.2f} -> {ppl:.2f} ({100 * (ppl / ppl_dense - 1):+.1f}%); "
        f"mean KL divergence {kld:.3f}, {kld / Q4_K_M_KLD:.1f}x what llama.cpp's own q4_K_M quantization "
        f"costs ({Q4_K_M_KLD}, Llama-3-8B); same next token as dense {100 * same_top:.0f}% of the time"
    )


MEMORY_BOUND_FRACTION = 0.6  # below it, a decode step's reads alone take too little of it to bind


def why_small(e: dict[str, Any]) -> str:
    """Why a level's decode speed-up is small, from the bench's bytes and memory bound."""
    dense_bytes = e["ceiling"] * (e["streamed_bytes"] + e["gathered_bytes"])
    read = (e["streamed_bytes"] + e["gathered_bytes"]) / dense_bytes
    bytes_words = (
        f"at level {e['level']:g} decode still reads {100 * read:.0f}% of dense's weight bytes per token "
        f"(ceiling x{e['ceiling']:.2f}: the gate, the output layer and the dense products are read whole), "
        f"and the {100 * e['gathered_bytes'] / dense_bytes:.0f}% it reads as gathered rows cost "
        f"{e['gathered_read_cost']:.2f}x a streamed byte on this machine"
    )
    if e["of_memory_bound"] < MEMORY_BOUND_FRACTION:
        return (
            f"why not faster: the weight reads alone take {100 * e['of_memory_bound']:.0f}% of a decode step "
            "here, so decode is bound by arithmetic and per-op work, not by memory, and skipped bytes buy "
            f"little; {bytes_words}"
        )
    return (
        f"why not faster: decode is bound by memory; {bytes_words}, so the memory bound is "
        f"x{e['memory_bound']:.2f}; decode reached {100 * e['of_memory_bound']:.0f}% of it"
    )


def run(options: DemoOptions) -> int:
    try:
        return _run(options)
    except (GGUFError, ValueError, models.UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, registry.FetchError, models.ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(o: DemoOptions) -> int:
    name = o.model or models.DEFAULT_MODEL
    print(f"== fetching {name}", flush=True)
    model = models.fetch_model(name)
    print(model)

    sparse_path = o.output or convert.default_output(model)
    print(
        f"== converting with {o.calib_tokens} calibration tokens at levels {o.levels} -> {sparse_path}",
        flush=True,
    )
    rc = convert.run(
        convert.ConvertOptions(
            model=model,
            output=sparse_path,
            sparsity=o.levels,
            calib_tokens=o.calib_tokens,
            threads=o.threads,
            force=True,
        )  # fmt: skip
    )
    if rc != 0:
        return rc
    level = read_sparse_file(sparse_path).default_level

    print(
        f"\n== generating {o.n_predict} tokens with llama-completion, dense and --sparse {level:g}",
        flush=True,
    )
    dense = generate(sparse_path, o.prompt, o.n_predict, o.threads)
    sparse = generate(sparse_path, o.prompt, o.n_predict, o.threads, ["--sparse", f"{level:g}"])
    print(f"\n-- dense:\n{o.prompt}{dense.text.removeprefix(o.prompt)}\n")
    print(f"-- sparse, level {level:g}:\n{o.prompt}{sparse.text.removeprefix(o.prompt)}\n")

    print(
        f"== decode speed: llama-bench, {o.threads} threads, {o.n_predict} tokens, "
        f"dense and each level interleaved, median of {o.repeats} repeats",
        flush=True,
    )
    speed = benchmark.measure(
        benchmark.BenchOptions(
            model=sparse_path,
            levels=o.levels,
            threads=o.threads,
            repeats=o.repeats,
            n_prompt=0,
            n_gen=o.n_predict,
            quiet=True,
        )  # fmt: skip
    )
    print(
        f"== quality on held-out text (LAMBADA, {o.chunks} x 256 tokens, every position sparse; generation: "
        f"{evaluate.DEFAULT_GEN_WINDOWS} windows, a dense prompt, then each token decoded alone)",
        flush=True,
    )
    quality = evaluate.measure(
        evaluate.EvalOptions(
            models=[sparse_path], levels=o.levels, tasks="none", ctx=256, chunks=o.chunks, threads=o.threads
        )
    )
    dense_speed = speed["levels"][0]
    dense_run = quality["runs"][0]
    rows = []
    for e, r in zip(speed["levels"][1:], quality["runs"][1:], strict=True):
        rows.append(
            {
                "level": e["level"],
                "decode_tps": e["decode_median"],
                "speedup": e["decode_ratio"],
                "ceiling": e["ceiling"],
                "memory_bound": e["memory_bound"],
                "realized_ffn": r["realized"]["overall"].get("ffn"),
                "ppl": r["text"]["ppl"],
                "kld_mean": r["text"]["kld_mean"],
                "same_top": r["text"]["same_top"],
                "generation_kld_mean": r["generation"]["kld_mean"],
            }
        )
    print(f"\n{'level':>6} {'realized':>8} {'decode t/s':>10} {'x dense':>8} {'mem bound':>9} "
          f"{'PPL':>7} {'mean KLD':>8} {'x q4_K_M':>8} {'same top':>8} {'gen KLD':>8}")  # fmt: skip
    dense_tps, dense_ppl = dense_speed["decode_median"], dense_run["text"]["ppl"]
    print(f"{'dense':>6} {'':>8} {dense_tps:10.1f} {1:8.2f} {'':>9} {dense_ppl:7.2f}")
    for row in rows:
        print(
            f"{row['level']:6g} {row['realized_ffn']:8.3f} {row['decode_tps']:10.1f} {row['speedup']:8.2f} "
            f"{row['memory_bound']:9.2f} {row['ppl']:7.2f} {row['kld_mean']:8.3f} "
            f"{row['kld_mean'] / Q4_K_M_KLD:8.1f} {100 * row['same_top']:7.0f}% "
            f"{row['generation_kld_mean']:8.3f}"
        )
    chosen = next(row for row in rows if schema.same_level(row["level"], level))
    entry = next(e for e in speed["levels"] if schema.same_level(e["level"], level))
    print(
        f"\nAt level {level:g} (the file's default; realized FFN sparsity {chosen['realized_ffn']:.3f}), "
        f"decode runs at {chosen['decode_tps']:.1f} t/s against {dense_tps:.1f} t/s dense: "
        f"x{chosen['speedup']:.2f}.\nQuality cost: "
        + quality_words(chosen["kld_mean"], dense_ppl, chosen["ppl"], chosen["same_top"])
        + f".\nGenerating, as llama-completion runs it (the prompt dense, new tokens sparse): mean KLD "
        f"{chosen['generation_kld_mean']:.3f}."
    )
    if chosen["speedup"] < SMALL_SPEEDUP:
        print(why_small(entry) + ".")
    print(
        "Choose another level with --sparse LEVEL; the table shows what each costs and buys here. "
        f'Run it yourself: build/bin/llama-completion -m {sparse_path} --sparse {level:g} -p "..."'
    )
    if o.json:
        report = {
            "model": str(model), "sparse_model": str(sparse_path), "level": level, "options": asdict(o),
            "dense": {"text": dense.text, "decode_tps": dense_tps, "ppl": dense_ppl},
            "sparse": {"text": sparse.text}, "levels": rows, "machine": speed["machine"],
        }  # fmt: skip
        from .evaluate import write_text_atomic

        write_text_atomic(o.json, json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run(DemoOptions()))
