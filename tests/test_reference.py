"""The sparse runtime against the transformers reference (reference.py) on held-out text.

The default model (SmolLM2-135M Q4_1, its .sparse.gguf at level 0.5) runs token by token through
llama-cpp-python (one llama_decode per token, so the sparse decode kernels run), and the
transformers model with the same thresholds scores the same tokens teacher-forced. Also measured:
dense llama.cpp against dense transformers, sparse batched prefill, and the same on the model's
weights in F32 (F32 KV cache), where neither engine rounds activations.

Measured on this build (top-1 = same argmax, KL = mean KL(reference || llama.cpp)):

    Q4_1 file, F16 KV cache, 512 tokens of LAMBADA:
    dense  llama.cpp decode  vs transformers                      top-1 94.7%   KL 0.0031
    dense  llama.cpp prefill vs transformers                      top-1 93.6%   KL 0.0033
    sparse llama.cpp decode  vs transformers replaying its masks  top-1 97.9%   KL 0.0020
    sparse llama.cpp decode  vs transformers deciding its own     top-1 79.9%   KL 0.108
    sparse llama.cpp decode  vs llama.cpp prefill deciding its own top-1 80.3%  KL 0.089
    F32 weights, F32 KV cache, 256 tokens:
    dense  llama.cpp decode  vs transformers                      top-1 100%    max |dlogit| 8e-5
    sparse llama.cpp decode  vs transformers replaying its masks  top-1 100%    max |dlogit| 1.7e-4
    sparse llama.cpp decode  vs transformers deciding its own     top-1 84.8%   KL 0.054

The thresholds make the function discontinuous, and the discontinuity amplifies any rounding
difference: an input within rounding of its threshold lands on either side, and the flipped
channel moves the inputs of later layers (and, through the KV cache, of later tokens) by far more
than rounding, so more of them flip. In F32 the masks decode recorded differ from transformers' own
comparison on 16 of 21 million decisions, each within 2.4e-6 (relative) of its threshold; that is
enough for the two to drift apart token by token. In the Q4_1 file, whose products round
activations to 8 bits (q8_1) and keep K/V in float16, 0.8-1.8% of the decisions differ, and even
dense llama.cpp agrees with transformers on only ~94% of the top-1 tokens of this 135M model (12%
of its positions have a top-2 margin under 0.1).

So the engines are compared with the same masks: the runtime records the masks of each decoded
token (runtime.trace_masks / recorded_masks) and the reference applies them (chess_masks(...,
replay=...)), reporting where its own comparison would have decided otherwise. With the same masks
they agree as the dense engines do (Q4_1) or to float rounding (F32). Each engine deciding its
own masks, the issue's >= 95% top-1 is not met (80% Q4_1, 85% F32); that requirement is kept as a
strict xfail, not weakened.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import actsparse  # noqa: E402
from actsparse import data, reference, runtime  # noqa: E402

LEVEL = 0.5
N_TOKENS = 512
N_TOKENS_F32 = 256
THREADS = int(os.environ.get("ACTSPARSE_TEST_THREADS", "2"))


@pytest.fixture(scope="module")
def sparse_model(small_sparse_model: Path) -> Path:
    """SmolLM2 with CHESS + attention thresholds from the session's 4096-token calibration."""
    return small_sparse_model


def engine_logits(model_path: Path, n_tokens: int, f32_kv: bool = False) -> dict:
    """llama.cpp's logits for the same held-out tokens: sparse decode token by token (recording
    its masks), sparse batched prefill, dense prefill and decode; then transformers dense, masked
    by the thresholds at LEVEL and its neighbours, and replaying the masks decode recorded."""
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # ggml type 0: F32
    llm = actsparse.Llama(
        model_path, n_ctx=n_tokens + 16, n_batch=n_tokens, n_ubatch=n_tokens, logits_all=True,
        sparse_prompt=True, n_threads=THREADS, n_threads_batch=THREADS, verbose=False, **kv,
    )  # fmt: skip
    tokens = llm.tokenize(data.heldout_text()[:20_000].encode(), add_bos=False)[:n_tokens]
    assert len(tokens) == n_tokens

    def run(level: float, one_by_one: bool) -> np.ndarray:
        actsparse.enable_sparse(llm, level)
        llm.reset()
        if one_by_one:
            for t in tokens:  # one llama_decode of one token each: the sparse decode kernels
                llm.eval([t])
        else:
            llm.eval(tokens)  # one batch: dense products of the masked inputs
        return np.array(llm.scores[:n_tokens])

    runtime.trace_masks("record")
    try:
        out = {"tokens": tokens, "sparse_decode": run(LEVEL, True)}
        recorded = runtime.recorded_masks(llm)
    finally:
        runtime.trace_masks("off")
    out["runtime_stats"] = actsparse.sparse_stats(llm)
    out["sparse_prefill"] = run(LEVEL, False)
    out["dense_prefill"] = run(0, False)
    out["dense_decode"] = run(0, True)
    model = reference.load_model(model_path, threads=THREADS)
    out["ref_dense"] = reference.token_logits(model, tokens)
    for level in (0.4, LEVEL, 0.6):
        with reference.chess_masks(model, model_path, level) as masks:
            out[f"ref_sparse_{level}"] = reference.token_logits(model, tokens)
            out[f"ref_stats_{level}"] = masks.stats()
    with reference.chess_masks(model, model_path, LEVEL, replay=recorded) as masks:
        out["ref_replay"] = reference.token_logits(model, tokens)
        out["replay_disagreements"] = masks.disagreements()
    out["ref_dense_after"] = reference.token_logits(model, tokens)
    return out


@pytest.fixture(scope="module")
def measured(sparse_model: Path) -> dict:
    """Every engine on the default model's file (Q4_1, F16 KV cache), 512 tokens."""
    return engine_logits(sparse_model, N_TOKENS)


@pytest.fixture(scope="module")
def measured_f32(small_f32_sparse_model: Path) -> dict:
    """The same on its weights in F32 with an F32 KV cache: float arithmetic in both engines."""
    return engine_logits(small_f32_sparse_model, N_TOKENS_F32, f32_kv=True)


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
    """The dense logits after the masked runs equal those before, up to torch's CPU arithmetic, which
    is not always bit-reproducible (one run in two on an Intel Xeon differed in the fourth decimal);
    the mildest mask moves them by 12."""
    before, after = measured["ref_dense"], measured["ref_dense_after"]
    noise = float(np.abs(before - after).max())
    assert noise < 1e-2, noise
    assert float(np.abs(measured["ref_sparse_0.4"] - before).max()) > 100 * max(noise, 1e-2)
    assert kl(before, after) < 1e-8


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
    reason="measured 80% top-1 (the issue asks >= 95%): each engine deciding its own masks, the "
    "thresholds amplify rounding differences (85% even in F32); with the same masks 97.9%. "
    "See the module docstring.",
)
def test_sparse_decode_top1_matches_reference(measured: dict) -> None:
    """The issue's requirement read strictly: sparse decode (level 0.5) and the transformers
    reference, each comparing with the same thresholds itself, pick the same top-1 token on >= 95%
    of held-out positions."""
    assert top1(measured["sparse_decode"], measured[f"ref_sparse_{LEVEL}"]) >= 0.95


def test_sparse_decode_matches_the_reference_applying_its_masks(measured: dict) -> None:
    """Sparse decode against transformers replaying the masks decode recorded (so that both apply
    the same masks from the same thresholds): >= 95% top-1 on the 512 held-out positions, and no
    further from the reference than dense llama.cpp is from dense transformers. The recorded
    decisions differ from the reference's own comparison on a small fraction of inputs only: those
    that llama.cpp's 8-bit activation rounding moves across their thresholds."""
    ours, ref = measured["sparse_decode"], measured["ref_replay"]
    assert top1(ours, ref) >= 0.95
    assert kl(ref, ours) <= 1.5 * kl(measured["ref_dense"], measured["dense_decode"])
    for kind, d in measured["replay_disagreements"].items():
        assert d["fraction"] < 0.03, (kind, d)


def test_float_runtime_matches_the_reference(measured_f32: dict) -> None:
    """On the default model's weights in F32 (F32 KV cache, F32 transposed copies) the two engines
    compute the same numbers to float rounding: dense, and sparse with decode's masks replayed
    (measured: every top-1 equal, logits within 1.2e-4). The runtime's mask decisions equal
    ``|a| > t`` computed by transformers except for a few inputs within float rounding of their
    thresholds (measured 15 of 10 million, all within 2.2e-5 relative)."""
    m = measured_f32
    for name in ("dense_decode", "dense_prefill"):
        assert top1(m[name], m["ref_dense"]) >= 0.99, name
        assert np.abs(m[name] - m["ref_dense"]).max() < 1e-2, name
    assert top1(m["sparse_decode"], m["ref_replay"]) >= 0.99
    assert np.abs(m["sparse_decode"] - m["ref_replay"]).max() < 1e-2
    for kind, d in m["replay_disagreements"].items():
        assert d["fraction"] < 1e-5 and d["max_margin"] < 1e-3, (kind, d)
    # each engine deciding its own masks: those few flips change later inputs by whole channels, so
    # the two drift apart (measured 89% top-1 over 256 positions), yet stay far nearer each other
    # than either is to the dense model
    assert top1(m["sparse_decode"], m["ref_sparse_0.5"]) > top1(m["sparse_decode"], m["ref_dense"]) + 0.05


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
