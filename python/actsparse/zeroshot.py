"""Zero-shot multiple-choice scoring (the 8 CHESS tasks) on this project's llama.cpp runtime.

    import actsparse
    from actsparse import zeroshot
    llm = actsparse.Llama("MODEL.sparse.gguf", n_threads=2, verbose=False)
    zeroshot.score_tasks(llm, ["arc_easy", "piqa"], limit=100, sparse=0.5)
    # {"arc_easy": {"acc": ..., "acc_norm": ..., "n": 100}, ..., "average": {"acc": ..., "acc_norm": ...}}

Requests are built the way lm-evaluation-harness builds log-likelihood requests: trailing
whitespace of the context moves to the front of the continuation, ``whole = tokenize(context +
continuation)``, ``context_tokens = tokenize(context)``, the continuation tokens are
``whole[len(context_tokens):]``, and the model reads ``context_tokens + continuation_tokens``.
Tokens come from llama.cpp's tokenizer, with a BOS token exactly when the model's vocabulary
asks for one (``tokenizer.ggml.add_bos_token``); :mod:`actsparse.reference` scores the same token
ids with transformers.

The log-likelihood of a request is the sum over its continuation tokens of
``log softmax(logits at the previous position)[token]``.

Efficiency: the choices of one question share their context. For each question the longest
common token prefix of its choices is decoded once, into one sequence, and copied to the other
choices' sequences with ``llama_memory_seq_cp`` (one unified KV cache: the copy shares the
cells); then every choice's remaining tokens are decoded. Several questions form one group (up
to ``group_cells`` KV cells and ``n_seq_max`` sequences), each phase of a group goes through
``llama_decode`` in batches of up to ``n_batch`` tokens mixing choices and questions, and the
memory is cleared between groups. Winogrande (a context per choice, one shared continuation)
needs nothing special: its common prefix is the sentence up to the option.

Exactness: the log-likelihoods are bit-identical to decoding each request alone in an empty
cache, whatever the grouping, batch size or ``limit`` (tested). That takes three rules:

* every ``llama_decode`` call gets at least two tokens. For sparse scoring this keeps the
  semantics fixed: the runtime computes a batch of several tokens as dense products of the
  masked inputs (the CHESS semantics, which :mod:`actsparse.reference` reproduces), and only a
  single-token batch would use the sparse decode kernels and their transposed weight copies;
* without flash attention (whose CPU kernel switches to a tiled accumulation for larger
  batches), ggml's softmax and attention-weighted sum run over KV cells in SIMD blocks of
  ``kv_align`` (16 for AVX-512; a multiple of AVX2's 8 and NEON's 4), summing each block on its
  own. A sequence's positions ``16b .. 16b+15`` must therefore sit in one block of cells at the
  same offsets, as they do alone. So the shared prefix is rounded down to whole blocks, and
  every choice's remaining tokens start a new block; the rest of its last block is filled with
  tokens of a scratch sequence (computed and discarded). Other rounding would not be harmless
  here: this 4-bit model with 8-bit activations turns a one-ulp change of a softmax sum into up
  to 0.5 nat in a log-likelihood;
* the prefix stops at least one token before the shortest context, so every output row comes
  from the per-choice phase.

On the first 13 questions of every task the aligned layout decodes 28% fewer tokens than
scoring every choice in full, and 1.7x the tokens of sharing unaligned prefixes (``kv_align=1``:
faster, but results then depend on the grouping).

Metrics (as lm-evaluation-harness defines them for ``multiple_choice`` tasks):

* ``acc``: 1 when ``argmax_i loglik_i`` is the label (ties go to the first choice, as
  ``numpy.argmax``).
* ``acc_norm``: 1 when ``argmax_i loglik_i / len(choice_i)`` is the label, where ``len`` is the
  length in *characters* of the choice string. The harness divides by ``len`` of the strings
  ``doc_to_choice`` returns, i.e. the answer without the target delimiter (one space) that
  starts the request's continuation; so here ``len(continuation.removeprefix(" "))``. For
  Winogrande every choice has the same continuation, so ``acc_norm == acc`` (the harness reports
  only ``acc`` for it).

Each task's figures are means over its questions; ``average`` is the unweighted mean over the
tasks (as the CHESS paper averages its 8 tasks).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import data, engine, runtime

__all__ = [
    "Request",
    "Scorer",
    "UnknownTaskError",
    "choice_length",
    "encode_request",
    "metrics",
    "predictions",
    "question_requests",
    "request_logliks",
    "shared_context",
    "score_tasks",
]

DEFAULT_N_CTX = 2048  # the largest question must fit (BoolQ's longest request: 1,300 tokens)
DEFAULT_GROUP_CELLS = 512
DEFAULT_N_BATCH = 512
DEFAULT_N_SEQ_MAX = 64
DEFAULT_KV_ALIGN = 16  # ggml's SIMD block over KV cells on AVX-512 (a multiple of AVX2's, NEON's)
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Request:
    """One log-likelihood request in tokens: score ``continuation_tokens`` after ``context_tokens``."""

    context: str
    continuation: str
    context_tokens: tuple[int, ...]
    continuation_tokens: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.context_tokens + self.continuation_tokens


def _add_bos_default(llm: Any) -> bool:
    lib = engine.llama_cpp()
    return bool(lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(llm.model)))


def _tokenize(llm: Any, text: str, bos: bool) -> list[int]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []
    return [llm.token_bos(), *tokens] if bos else tokens


def encode_request(llm: Any, context: str, continuation: str, add_bos: bool | None = None) -> Request:
    """Tokenize one request as lm-evaluation-harness does (see the module docstring).

    ``add_bos``: None = the model's default. A context that tokenizes to nothing gets the BOS
    token as its context (something must predict the first continuation token).
    """
    bos = _add_bos_default(llm) if add_bos is None else add_bos
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tokenize(llm, context + continuation, bos)
    ctx = _tokenize(llm, context, bos)
    if not ctx:
        ctx = [llm.token_bos()]
        whole = ctx + whole
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"empty continuation for request {context[-40:]!r} + {continuation!r}")
    return Request(context, continuation, tuple(ctx), tuple(cont))


def question_requests(llm: Any, question: data.TaskQuestion, add_bos: bool | None = None) -> list[Request]:
    """The requests of one question, one per choice, in choice order."""
    bos = _add_bos_default(llm) if add_bos is None else add_bos
    return [
        encode_request(llm, c, ch, bos) for c, ch in zip(question.contexts, question.choices, strict=True)
    ]


def choice_length(continuation: str) -> int:
    """Characters of the choice string behind a continuation (the harness's acc_norm divisor)."""
    return len(continuation.removeprefix(TARGET_DELIMITER))


# --- the llama.cpp scorer ------------------------------------------------------------------------


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def shared_context(requests: Sequence[Request]) -> int:
    """Tokens a question's choices share, up to one token before the shortest context (each
    choice still predicts its first continuation token from its own row); 0 for one choice."""
    if len(requests) < 2:
        return 0
    return min(_common_prefix([r.tokens for r in requests]), min(len(r.context_tokens) for r in requests) - 1)


def _shared_prefix(requests: Sequence[Request], align: int) -> int:
    """Tokens the choices share, rounded down to whole blocks of ``align`` cells (see Scorer)."""
    p = shared_context(requests)
    p -= p % align
    return p if p >= 2 else 0  # (a shorter prefix would need a single-token decode)


def _blocks(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class _Plan:
    """One question inside a group: its requests, shared prefix and first sequence id."""

    index: int  # position in the caller's list of questions
    requests: list[Request]
    prefix: int  # tokens decoded once and copied to every choice's sequence
    seq0: int = 0  # choice k uses sequence seq0 + k

    def cells(self, align: int) -> int:
        """KV cells the question takes, alignment gaps included."""
        return self.prefix + sum(_blocks(len(r.tokens) - self.prefix, align) for r in self.requests)


# One token to decode: (token, position, sequence, output slot or -1). Output slots index a list
# of (key, target token): the log-probability of target after this token is added to key's sum.
_Tok = tuple[int, int, int, int]


class Scorer:
    """Scores log-likelihood requests in a llama_context of its own on ``llm``'s model.

    The context has ``n_seq_max`` sequences in one unified KV cache of ``n_ctx`` cells (the
    largest question must fit; questions are grouped up to ``group_cells``, because without
    flash attention every token attends over all cells in use). ``llm``'s own context is left
    alone; its thread counts and KV types are copied. ``sparse`` is this context's level
    (0/None/False = dense, True = the file's default, or one of its levels); the runtime has
    no getter for the level of ``llm``'s context, so it must be given here.

    Results do not depend on how requests are grouped (see the module docstring): flash
    attention is turned off in this context, ``kv_align`` is the block of KV cells that ggml sums
    on its own (16 covers AVX-512, AVX2 and NEON; 1 turns the alignment off), and the last
    sequence id is the scratch sequence that fills alignment gaps.
    """

    def __init__(
        self,
        llm: Any,
        sparse: float | bool | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = DEFAULT_N_BATCH,
        n_seq_max: int = DEFAULT_N_SEQ_MAX,
        group_cells: int = DEFAULT_GROUP_CELLS,
        kv_align: int = DEFAULT_KV_ALIGN,
    ) -> None:
        lib = engine.llama_cpp()
        if n_batch < 3:
            raise ValueError("n_batch must be at least 3")
        if kv_align < 1:
            raise ValueError("kv_align must be >= 1")
        # the context sizes its output buffer for max(outputs, n_seq_max) <= n_batch rows
        n_seq_max = max(2, min(n_seq_max, n_batch, int(lib.llama_max_parallel_sequences())))
        self._lib = lib
        self._closed = True
        self.llm = llm
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.kv_align = kv_align
        self.n_vocab = int(llm.n_vocab())
        params = lib.llama_context_params.from_buffer_copy(llm.context_params)  # a copy
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch  # one ubatch per llama_decode, exactly the tokens given
        params.n_seq_max = n_seq_max
        params.kv_unified = True  # one pool of cells: a copied prefix is shared, not duplicated
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_outputs_max = 0
        params.n_outputs_max_per_seq = 0
        params.embeddings = False
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed for the scoring context")
        self._closed = False
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.group_cells = min(group_cells, self.n_ctx)
        self._scratch = n_seq_max - 1  # the sequence that fills alignment gaps
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        try:
            handle = types.SimpleNamespace(_ctx=types.SimpleNamespace(ctx=self.ctx))
            runtime.set_sparse_prompt(handle, True)  # every scored position at the level (CHESS's setting)
            runtime.enable_sparse(handle, sparse)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ctx)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- decoding --

    def _decode_stream(
        self, stream: list[_Tok], outputs: list[tuple[Any, int]], acc: dict[Any, float]
    ) -> None:
        """Decode tokens in calls of at most n_batch and add each output's target log-probability
        to ``acc``. No call has a single token (that is decode, with its own kernels), nor a
        single output row: llama.cpp computes the last layer's FFN only for the output rows, and a
        one-row product takes ggml's mat-vec path, which rounds differently from the batched one.
        """
        lib = self._lib
        b = self._batch
        i = 0
        n = len(stream)
        while i < n:
            take = min(self.n_batch, n - i)
            if n - i - take == 1:  # keep the tail at two tokens or more
                take -= 1
            chunk = stream[i : i + take]
            rows = []
            for j, (tok, pos, seq, slot) in enumerate(chunk):
                b.token[j] = tok
                b.pos[j] = pos
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq
                b.logits[j] = slot >= 0
                if slot >= 0:
                    rows.append((j, slot))
            if len(rows) == 1:  # a second output row, discarded
                b.logits[1 if rows[0][0] == 0 else 0] = True
            b.n_tokens = take
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {take} tokens")
            if rows:
                logits = np.empty((len(rows), self.n_vocab), dtype=np.float32)
                for r, (j, _) in enumerate(rows):
                    logits[r] = np.ctypeslib.as_array(
                        lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,)
                    )
                targets = np.array([outputs[slot][1] for _, slot in rows])
                for (_, slot), lp in zip(rows, _target_logprobs(logits, targets), strict=True):
                    key = outputs[slot][0]
                    acc[key] = acc.get(key, 0.0) + lp
            i += take

    def _clear(self) -> None:
        self._lib.llama_memory_clear(self.memory, False)

    def _check_fits(self, cells: int, what: str) -> None:
        if cells > self.n_ctx:
            raise ValueError(f"{what} needs {cells} KV cells, more than n_ctx={self.n_ctx}; raise n_ctx")

    @staticmethod
    def _segment(r: Request, seq: int, start: int, key: Any, outputs: list[tuple[Any, int]]) -> list[_Tok]:
        """Tokens start.. of a request in sequence seq, with an output wherever a continuation
        token follows."""
        toks = r.tokens
        first_out = len(r.context_tokens) - 1
        seg = []
        for pos in range(start, len(toks)):
            slot = -1
            if first_out <= pos < len(toks) - 1:
                slot = len(outputs)
                outputs.append((key, toks[pos + 1]))
            seg.append((toks[pos], pos, seq, slot))
        return seg

    def score_alone(self, requests: Iterable[Request]) -> list[float]:
        """Each request alone in an empty cache (one sequence): the plain reference."""
        out = []
        for r in requests:
            self._check_fits(len(r.tokens), "a request")
            self._clear()
            outputs: list[tuple[Any, int]] = []
            acc: dict[Any, float] = {}
            self._decode_stream(self._segment(r, 0, 0, 0, outputs), outputs, acc)
            out.append(acc[0])
        self._clear()
        return out

    def score_groups(self, questions: Sequence[Sequence[Request]], progress: Any = None) -> list[list[float]]:
        """Log-likelihoods of the requests of each question (its choices), sharing each question's
        prefix; ``progress`` (a tqdm bar) is advanced by one per question."""
        plans = [
            _Plan(i, list(reqs), _shared_prefix(reqs, self.kv_align)) for i, reqs in enumerate(questions)
        ]
        result: list[list[float]] = [[0.0] * len(p.requests) for p in plans]
        group: list[_Plan] = []
        cells = seqs = 0
        for plan in plans:
            if len(plan.requests) > self.n_seq_max - 1:
                raise ValueError(
                    f"a question with {len(plan.requests)} choices needs n_seq_max > {len(plan.requests)}"
                )
            need = plan.cells(self.kv_align)
            self._check_fits(need, "a question")
            if group and (cells + need > self.group_cells or seqs + len(plan.requests) > self.n_seq_max - 1):
                self._score_group(group, result, progress)
                group, cells, seqs = [], 0, 0
            plan.seq0 = seqs
            group.append(plan)
            cells += need
            seqs += len(plan.requests)
        if group:
            self._score_group(group, result, progress)
        return result

    def _score_group(self, group: list[_Plan], result: list[list[float]], progress: Any) -> None:
        align = self.kv_align
        self._clear()
        acc: dict[Any, float] = {}
        # phase 1: each shared prefix (whole blocks), once, into its question's first sequence
        stream: list[_Tok] = []
        for p in group:
            stream.extend((t, pos, p.seq0, -1) for pos, t in enumerate(p.requests[0].tokens[: p.prefix]))
        if stream:
            self._decode_stream(stream, [], acc)
            for p in group:
                for k in range(1, len(p.requests) if p.prefix else 0):
                    self._lib.llama_memory_seq_cp(self.memory, p.seq0, p.seq0 + k, 0, p.prefix)
        # phase 2: the rest of every choice, each segment starting a block (the cache hands out
        # cells in batch order after the prefixes), the gaps filled by the scratch sequence
        outputs: list[tuple[Any, int]] = []
        stream = []
        scratch = 0
        for p in group:
            for k, r in enumerate(p.requests):
                seg = self._segment(r, p.seq0 + k, p.prefix, (p.index, k), outputs)
                stream.extend(seg)
                for _ in range(_blocks(len(seg), align) - len(seg)):
                    stream.append((0, scratch, self._scratch, -1))
                    scratch += 1
        self._decode_stream(stream, outputs, acc)
        for (qi, k), ll in acc.items():
            result[qi][k] = ll
        self._clear()
        if progress is not None:
            progress.update(len(group))


def _target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] per row, the normaliser summed in float64."""
    m = logits.max(axis=1)
    s = np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return picked - m.astype(np.float64) - np.log(s)


def request_logliks(
    llm: Any,
    questions: Sequence[Sequence[Request]],
    *,
    sparse: float | bool | None = None,
    share_prefix: bool = True,
    progress: bool = False,
    **scorer_options: Any,
) -> list[list[float]]:
    """Log-likelihood of every request, grouped as given (one inner list per question).

    ``share_prefix=True``: the batched shared-prefix path; False: every request alone in an
    empty cache (slow; the reference the batched path is tested against). ``scorer_options``:
    ``n_ctx``, ``n_batch``, ``n_seq_max``, ``group_cells``, ``kv_align`` (see :class:`Scorer`).
    """
    with Scorer(llm, sparse, **scorer_options) as scorer:
        if not share_prefix:
            return [scorer.score_alone(reqs) for reqs in questions]
        with _bar(len(questions), "questions", progress) as bar:
            return scorer.score_groups(questions, bar)


# --- metrics --------------------------------------------------------------------------------------


def metrics(questions: Sequence[data.TaskQuestion], logliks: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc and acc_norm (module docstring) of questions given their choices' log-likelihoods."""
    if not questions:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
    acc = acc_norm = 0
    for q, ll in zip(questions, logliks, strict=True):
        pred, pred_norm = predictions(q, ll)
        acc += pred == q.label
        acc_norm += pred_norm == q.label
    n = len(questions)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def predictions(question: data.TaskQuestion, logliks: Sequence[float]) -> tuple[int, int]:
    """(argmax loglik, argmax loglik / choice length in characters) of one question."""
    ll = np.asarray(logliks, dtype=np.float64)
    lengths = np.array([max(1, choice_length(c)) for c in question.choices], dtype=np.float64)
    return int(np.argmax(ll)), int(np.argmax(ll / lengths))


UnknownTaskError = data.UnknownTaskError


def score_tasks(
    llm: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    progress: bool = True,
    *,
    sparse: float | bool | None = None,
    add_bos: bool | None = None,
    variant: str = data.DEFAULT_VARIANT,
    **scorer_options: Any,
) -> dict[str, dict[str, float]]:
    """Score CHESS tasks: ``{task: {"acc", "acc_norm", "n"}, ..., "average": {"acc", "acc_norm"}}``.

    ``limit``: the first ``limit`` questions of each task (None: all). ``sparse``: the level to
    score at (see :class:`Scorer`; None = dense). ``add_bos``: None = the model's default.
    ``scorer_options``: see :func:`request_logliks`. Unknown task names raise
    :class:`UnknownTaskError` (a ValueError) listing the known ones.
    """
    tasks = list(tasks)
    data.check_tasks(tasks)
    if not tasks:
        raise ValueError(f"no tasks given; known tasks: {', '.join(data.CHESS_TASKS)}")
    bos = _add_bos_default(llm) if add_bos is None else add_bos
    loaded = {t: data.load_task(t, variant=variant, limit=limit) for t in tasks}
    out: dict[str, dict[str, float]] = {}
    with (
        Scorer(llm, sparse, **scorer_options) as scorer,
        _bar(sum(len(q) for q in loaded.values()), "questions", progress) as bar,
    ):
        for task, questions in loaded.items():
            if bar is not None:
                bar.set_description(task)
            reqs = [question_requests(llm, q, bos) for q in questions]
            out[task] = metrics(questions, scorer.score_groups(reqs, bar))
    out["average"] = {
        "acc": float(np.mean([out[t]["acc"] for t in tasks])),
        "acc_norm": float(np.mean([out[t]["acc_norm"] for t in tasks])),
    }
    return out


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _bar(total: int, unit: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)
