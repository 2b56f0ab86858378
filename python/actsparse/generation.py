"""Generation quality: what sparsity costs a generating tool, which runs the prompt dense and decodes
each new token alone through the sparse kernels and the transposed copies.

For each held-out window of ``ctx`` tokens, the first half is the prompt (one dense batch) and the
second half is teacher-forced one token per ``llama_decode``, as generation feeds its own tokens
back. The logits at those positions are compared with the dense model's over the same window:
mean KL divergence and the same-top-token rate, over the positions that llama-perplexity's
``--kl-divergence`` scores (the second half of each window), so the figures sit beside its
all-positions-sparse ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import runtime


@dataclass(frozen=True)
class GenerationOptions:
    ctx: int = 512  # tokens per window; the first half is the prompt
    windows: int = 4
    threads: int = 2


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows_of(llm: Any, text: str, options: GenerationOptions) -> list[list[int]]:
    """The first `windows` windows of `text`, cut as llama-perplexity cuts its chunks (the model's
    BOS, when it asks for one, in place of each window's first token)."""
    tokens = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    out = []
    for i in range(options.windows):
        window = tokens[i * options.ctx : (i + 1) * options.ctx]
        if len(window) < options.ctx:
            break
        if bos is not None and bos >= 0:
            window = [bos, *window[1:]]
        out.append(window)
    if not out:
        raise ValueError(f"the held-out text holds no window of {options.ctx} tokens")
    return out


def measure(
    model: Path,
    levels: list[float],
    text: str,
    options: GenerationOptions,
    on_token: Callable[[], None] | None = None,
) -> dict[float, dict[str, Any]]:
    """{level: {"kld_mean", "same_top", "tokens"}} of `model` generating after a dense prompt."""
    half = options.ctx // 2
    llm = runtime.Llama(
        str(model), n_ctx=options.ctx, n_batch=options.ctx, n_ubatch=options.ctx, logits_all=True,
        n_threads=options.threads, n_threads_batch=options.threads, verbose=False,
    )  # fmt: skip
    try:
        windows = windows_of(llm, text, options)
        sums = {level: [0.0, 0, 0] for level in levels}  # KLD sum, same top, positions
        for window in windows:
            scored = window[: options.ctx - 1]  # position j predicts token j + 1
            runtime.enable_sparse(llm, 0)
            llm.reset()
            llm.eval(scored)
            dense = _log_softmax(np.array(llm.scores[half : len(scored)]))
            for level in levels:
                runtime.enable_sparse(llm, level)
                llm.reset()
                llm.eval(scored[:half])  # the prompt: one batch, dense
                for j in range(half, len(scored)):
                    llm.eval([scored[j]])  # a generated token: sparse decode
                    sparse = _log_softmax(np.array(llm.scores[j]))
                    d = dense[j - half]
                    acc = sums[level]
                    acc[0] += float((np.exp(d) * (d - sparse)).sum())
                    acc[1] += int(d.argmax() == sparse.argmax())
                    acc[2] += 1
                    if on_token:
                        on_token()
    finally:
        llm.close()
    shape = {"windows": len(windows), "ctx": options.ctx}
    return {
        level: {"kld_mean": kld / n, "same_top": top / n, "tokens": n, **shape}
        for level, (kld, top, n) in sums.items()
    }


def decoded_tokens(levels: list[float], options: GenerationOptions) -> int:
    """Single-token decodes `measure` runs (for a progress bar)."""
    return len(levels) * options.windows * (options.ctx - 1 - options.ctx // 2)
