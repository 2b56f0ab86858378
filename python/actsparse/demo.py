"""`make demo`: the main job on the default model, from a fresh machine.

Fetches the default model, converts it with a small calibration, generates text from one prompt
dense and sparse with the built llama-completion (both texts and speeds), and measures the KL
divergence of the sparse model against the dense one on held-out text.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import engine

PROMPT = "The three most important ideas in the history of science are"
# "... common_perf_print:        eval time = 57.98 ms / 8 runs (7.25 ms per token, 137.98 tokens per second)"
EVAL_RE = re.compile(r"(?<!prompt )eval time =[^\n]*?([\d.]+) tokens per second")


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
    m = EVAL_RE.search(proc.stderr)
    return Generation(text=proc.stdout.strip(), decode_tps=float(m.group(1)) if m else float("nan"))


def kl_divergence(model: Path, text: str, threads: int, ctx: int = 256, chunks: int = 8) -> dict:
    """Text metrics of the default level against dense on `text` (see actsparse.evaluate)."""
    from .evaluate import dense_text_metrics, sparse_text_metrics
    from .sparsity_info import read_sparsity_info

    level = read_sparsity_info(model).default_level
    with tempfile.TemporaryDirectory(prefix="actsparse-demo-") as tmp:
        text_file, base = Path(tmp) / "heldout.txt", Path(tmp) / "dense.kld"
        text_file.write_text(text)
        dense = dense_text_metrics(model, text_file, base, ctx, chunks, threads)
        sparse, realized = sparse_text_metrics(model, level, text_file, base, ctx, chunks, threads)
    return {
        "level": level,
        "dense_ppl": dense["ppl"],
        **sparse,
        "realized_ffn": realized["overall"].get("ffn"),
    }


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fetch the default model, convert it, generate dense and sparse")
    p.add_argument(
        "--model", default=None, help="model name from `actsparse models list` (default: the default model)"
    )
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument(
        "--calib-tokens", type=int, default=8192, help="calibration tokens for the demo (default 8192)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import convert, models
    from .data import heldout_corpus

    name = args.model or models.DEFAULT_MODEL
    print(f"== fetching {name}", flush=True)
    model = models.fetch_model(name)
    print(model)

    sparse_path = convert.default_output(model)
    print(f"== converting with {args.calib_tokens} calibration tokens -> {sparse_path}", flush=True)
    conv_args = argparse.Namespace(
        model=model, output=sparse_path, sparsity=convert.DEFAULT_LEVELS, default_level=None, method="chess",
        no_attn=False, calib_file=None, calib_tokens=args.calib_tokens, window=convert.DEFAULT_WINDOW,
        transposed_type=convert.DEFAULT_TRANSPOSED_TYPE, threads=args.threads, force=True, quiet=False,
    )  # fmt: skip
    rc = convert.run(conv_args)
    if rc != 0:
        return rc

    print(f"== generating {args.n_predict} tokens with llama-completion, dense and --sparse", flush=True)
    dense = generate(sparse_path, args.prompt, args.n_predict, args.threads)
    sparse = generate(sparse_path, args.prompt, args.n_predict, args.threads, ["--sparse"])
    print(f"\n-- dense:\n{dense.text}\n\n-- sparse (default level):\n{sparse.text}\n")
    print(
        f"decode speed, {args.threads} threads: dense {dense.decode_tps:.1f} t/s, "
        f"sparse {sparse.decode_tps:.1f} t/s (x{sparse.decode_tps / dense.decode_tps:.2f})"
    )
    print("== KL divergence of sparse against dense on held-out text (LAMBADA, 8 x 256 tokens)", flush=True)
    m = kl_divergence(sparse_path, heldout_corpus().text[:200_000], args.threads)
    print(
        f"level {m['level']:g} (realized FFN sparsity {m['realized_ffn']:.3f}): "
        f"mean KLD {m['kld_mean']:.4f}, "
        f"99% KLD {m['kld_p99']:.4f}, same top token {100 * m['same_top']:.1f}%, "
        f"perplexity {m['dense_ppl']:.2f} -> {m['ppl']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(argparse.ArgumentParser().parse_args([])))
