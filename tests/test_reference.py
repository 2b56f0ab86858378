"""The sparse runtime against the transformers reference (reference.py) on held-out text.

The default model (SmolLM2-135M Q4_1, its .sparse.gguf at level 0.5) runs token by token through
llama-cpp-python (one llama_decode per token, so the sparse decode kernels run), and the
transformers model with the same thresholds scores the same tokens teacher-forced. Also measured:
dense llama.cpp against dense transformers, and sparse batched prefill against sparse
transformers, to show where disagreement comes from.

Measured on this build (512 tokens of LAMBADA, level 0.5; top-1 = same argmax, KL = mean
KL(reference || llama.cpp)):

    dense  llama.cpp prefill vs transformers       top-1 93.6%   KL 0.0033
    dense  llama.cpp decode  vs transformers       top-1 94.7%   KL 0.0031
    dense  llama.cpp decode  vs llama.cpp prefill  top-1 93.8%   KL 0.0036
    sparse llama.cpp decode  vs transformers       top-1 79.3%   KL 0.103
    sparse llama.cpp prefill vs transformers       top-1 78.3%   KL 0.100
    sparse llama.cpp decode  vs llama.cpp prefill  top-1 79.9%   KL 0.085
    sparse llama.cpp decode  vs dense transformers top-1 67.8%   KL 0.286
    sparse transformers + q8_1 activation rounding vs sparse transformers: top-1 79.5%

The masks are the same (realized sparsity per layer and kind agrees to ~0.01, and the
reference at 0.5 is much nearer the runtime at 0.5 than the reference at 0.4 or 0.6 or dense).
What differs is arithmetic: llama.cpp rounds activations to 8 bits (q8_1) for every product
with a 4-bit weight and keeps K/V in float16, and decode reads the Q8_0 transposed copies. On
this 135M model that noise alone moves the top-1 token on ~6% of positions dense (12% of
positions have a top-2 margin under 0.1), and with 50% of the FFN channels and attention inputs
cut at thresholds, a value that crosses its threshold because of rounding changes the layer's
output by a whole channel: the same rounding in transformers alone (q8_1-quantized inputs to
every linear layer) moves the sparse top-1 on ~20% of positions. Emulating that rounding in the
reference does not close the dense gap, though: with q8 rounding of every linear layer's input and
float16 Q, K, V and attention probabilities, dense transformers vs dense llama.cpp decode stays at
KL 0.0037 (256 tokens), so part of the difference comes from elsewhere in the arithmetic. Nor is
llama.cpp consistent with itself: its dense decode and batched prefill of the same tokens are
bit-identical for the first 8 positions and then differ by up to 1.3 logits (with an F32 KV cache,
identical for the first 16). The issue's requirement of
>= 95% top-1 agreement for sparse decode is therefore not met here; it is kept as a strict xfail
(not weakened) and reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import actsparse  # noqa: E402
from actsparse import data, reference  # noqa: E402

LEVEL = 0.5
N_TOKENS = 512
THREADS = int(os.environ.get("ACTSPARSE_TEST_THREADS", "2"))


@pytest.fixture(scope="module")
def sparse_model(small_sparse_model: Path) -> Path:
    """SmolLM2 with CHESS + attention thresholds from the session's 4096-token calibration."""
    return small_sparse_model


@pytest.fixture(scope="module")
def measured(sparse_model: Path) -> dict:
    """Logits of every engine on the same held-out tokens, and both realized sparsities."""
    llm = actsparse.Llama(
        sparse_model, n_ctx=N_TOKENS + 16, n_batch=N_TOKENS, n_ubatch=N_TOKENS, logits_all=True,
        n_threads=THREADS, n_threads_batch=THREADS, verbose=False,
    )  # fmt: skip
    tokens = llm.tokenize(data.heldout_text()[:20_000].encode(), add_bos=False)[:N_TOKENS]
    assert len(tokens) == N_TOKENS

    def run(level: float, one_by_one: bool) -> np.ndarray:
        actsparse.enable_sparse(llm, level)
        llm.reset()
        if one_by_one:
            for t in tokens:  # one llama_decode of one token each: the sparse decode kernels
                llm.eval([t])
        else:
            llm.eval(tokens)  # one batch: dense products of the masked inputs
        return np.array(llm.scores[:N_TOKENS])

    out = {"tokens": tokens, "sparse_decode": run(LEVEL, True)}
    out["runtime_stats"] = actsparse.sparse_stats(llm)
    out["sparse_prefill"] = run(LEVEL, False)
    out["dense_prefill"] = run(0, False)
    out["dense_decode"] = run(0, True)
    model = reference.load_model(sparse_model, threads=THREADS)
    out["ref_dense"] = reference.token_logits(model, tokens)
    for level in (0.4, LEVEL, 0.6):
        with reference.chess_masks(model, sparse_model, level) as masks:
            out[f"ref_sparse_{level}"] = reference.token_logits(model, tokens)
            out[f"ref_stats_{level}"] = masks.stats()
    out["ref_dense_after"] = reference.token_logits(model, tokens)
    return out


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True, dtype=np.float64))


def kl(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(ref || other) over positions, from logits."""
    lr, lo = log_softmax(ref), log_softmax(other)
    return float((np.exp(lr) * (lr - lo)).sum(1).mean())


def test_masks_are_removed_cleanly(measured: dict) -> None:
    assert np.array_equal(measured["ref_dense"], measured["ref_dense_after"])


def test_reference_masks_zero_what_the_runtime_zeroes(measured: dict) -> None:
    """Same tensors, same comparison, same thresholds: the realized sparsity of every kind
    (FFN channels, q input, o input) agrees overall and per layer."""
    runtime = measured["runtime_stats"]
    ref = measured[f"ref_stats_{LEVEL}"]
    for kind in reference.KINDS:
        assert runtime["overall"][kind] == pytest.approx(ref["overall"][kind], abs=0.005), kind
        for lr, lf in zip(runtime["layers"], ref["layers"], strict=True):
            assert lr[kind] == pytest.approx(lf[kind], abs=0.03), (kind, lr["layer"])


def test_dense_runtime_matches_transformers(measured: dict) -> None:
    """Dense: llama.cpp (prefill and token by token) vs transformers dequantizing the same file.
    The gap is llama.cpp's q8_1 activations and float16 K/V (measured 93.6% / 94.7%, KL 0.003;
    its own prefill and decode differ as much)."""
    ref = measured["ref_dense"]
    for name in ("dense_prefill", "dense_decode"):
        assert top1(measured[name], ref) >= 0.92, name
        assert kl(ref, measured[name]) < 0.01, name


def test_sparse_runtime_follows_the_reference_masks(measured: dict) -> None:
    """Sparse llama.cpp (decode and prefill) is far nearer the masked reference at its own level
    than the dense reference or the reference at a neighbouring level: the thresholds are applied
    to the same tensors with the same semantics."""
    ref = measured[f"ref_sparse_{LEVEL}"]
    for name in ("sparse_decode", "sparse_prefill"):
        ours = measured[name]
        k = kl(ref, ours)
        assert k < 0.2, name
        for other in ("ref_dense", "ref_sparse_0.4", "ref_sparse_0.6"):
            assert k < 0.75 * kl(measured[other], ours), (name, other)
        assert top1(ours, ref) > top1(ours, measured["ref_dense"]) + 0.05, name


@pytest.mark.xfail(
    strict=True,
    reason="measured 79% top-1 (the issue asks >= 95%): sparse thresholds amplify the arithmetic "
    "differences between the two engines on this 135M model; dense reaches only 94-95%. "
    "See the module docstring.",
)
def test_sparse_decode_top1_matches_reference(measured: dict) -> None:
    """The issue's requirement: sparse decode (level 0.5) and the transformers reference with the
    same thresholds pick the same top-1 token on >= 95% of held-out positions."""
    assert top1(measured["sparse_decode"], measured[f"ref_sparse_{LEVEL}"]) >= 0.95


def test_sparse_scoring_does_not_depend_on_batching(sparse_model: Path) -> None:
    """zeroshot's shared-prefix batches reproduce each request scored alone at a sparse level too
    (every call has two or more tokens and output rows, so no single-token decode path runs; the
    1-token continuations of ARC, BoolQ and OpenBookQA would otherwise take it in the last layer)."""
    from actsparse import zeroshot

    llm = actsparse.Llama(sparse_model, n_ctx=256, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    questions = [
        zeroshot.question_requests(llm, q) for t in data.CHESS_TASKS for q in data.load_task(t, limit=1)
    ]
    batched = zeroshot.request_logliks(llm, questions, sparse=0.7)
    alone = zeroshot.request_logliks(llm, questions, sparse=0.7, share_prefix=False)
    dense = zeroshot.request_logliks(llm, questions)
    assert batched == alone
    assert batched != dense
