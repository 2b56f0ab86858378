"""zeroshot.py: log-likelihood multiple-choice scoring on the llama.cpp runtime.

(a) The shared-prefix batched path gives bit-identical log-likelihoods to scoring every request
    alone in an empty cache, however requests are grouped and batched.
(b) The scorer is checked against the transformers reference (reference.py) scoring the same
    token ids on the first questions of all 8 CHESS tasks (dense).

Tolerances of (b), from 104 questions (13 per task) measured on this build: llama.cpp multiplies
the 4-bit weights with activations rounded to 8 bits (q8_1) and keeps K/V in float16, while
transformers dequantizes the weights and computes in float32. On this 135M model that moves a
request's log-likelihood by a median 0.15 nat (0.04 per token), at most 0.70 nat for a 2-token
and 1.28 for a 30-token continuation; so per request |diff| <= 0.8 + 0.1 * tokens, and the
median per token < 0.1. Predictions then differ only on near-ties: 5 of 104 (acc) and 2 of 104
(acc_norm), all where the reference's best choice won by < 0.15 nat, and the pooled acc over
the 104 questions differed by one question (0.96 points), acc_norm by none. This test pools 40
questions to stay short, too few for one question to be under a point; instead it asserts
per-question agreement wherever the reference's margin is >= 0.5 nat, >= 90% agreement overall,
and pooled acc / acc_norm within one question.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actsparse
from actsparse import data, zeroshot
from actsparse.zeroshot import Request

THREADS = int(os.environ.get("ACTSPARSE_TEST_THREADS", "2"))
PER_TASK = 5  # questions per task compared with transformers (40 in all)
ALONE = 1  # of those, per task, also scored one request at a time


@pytest.fixture(scope="module")
def llm(small_model_path: Path) -> Any:
    return actsparse.Llama(
        small_model_path, n_ctx=256, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )


@pytest.fixture(scope="module")
def subset(llm: Any) -> dict[str, tuple[list[data.TaskQuestion], list[list[Request]]]]:
    out = {}
    for task in data.CHESS_TASKS:
        questions = data.load_task(task, limit=PER_TASK)
        out[task] = (questions, [zeroshot.question_requests(llm, q) for q in questions])
    return out


@pytest.fixture(scope="module")
def ours(llm: Any, subset: dict) -> dict[str, list[list[float]]]:
    """The batched shared-prefix scorer, all 40 questions in one call (default grouping)."""
    tasks = list(subset)
    flat = [reqs for t in tasks for reqs in subset[t][1]]
    lls = zeroshot.request_logliks(llm, flat)
    out, i = {}, 0
    for t in tasks:
        n = len(subset[t][1])
        out[t] = lls[i : i + n]
        i += n
    return out


# --- requests and metrics ----------------------------------------------------------------------


def test_requests_move_trailing_space_to_the_continuation(llm: Any) -> None:
    r = zeroshot.encode_request(llm, "Question: Is water wet?\nAnswer: ", "yes")
    assert r.context == "Question: Is water wet?\nAnswer:" and r.continuation == " yes"
    assert list(r.tokens) == llm.tokenize(b"Question: Is water wet?\nAnswer: yes", add_bos=False)
    assert list(r.context_tokens) == llm.tokenize(b"Question: Is water wet?\nAnswer:", add_bos=False)
    bos = zeroshot.encode_request(llm, "Answer:", " no", add_bos=True)
    assert (
        bos.context_tokens[0] == llm.token_bos()
        and bos.tokens[1:] == zeroshot.encode_request(llm, "Answer:", " no", add_bos=False).tokens
    )


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    """lm-evaluation-harness: argmax of loglik / len(choice), the choice without the " " that
    starts the continuation."""
    q = data.TaskQuestion("t", 0, None, ("ctx", "ctx"), (" ab", " abcd"), label=1)
    assert zeroshot.predictions(q, [-2.0, -3.5]) == (0, 1)  # -2/2 = -1 < -3.5/4
    assert zeroshot.metrics([q], [[-2.0, -3.5]]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert zeroshot.predictions(q, [-2.0, -4.5]) == (0, 0)  # -1 > -1.125
    # Winogrande: one continuation, contexts per choice, so acc_norm == acc
    w = data.TaskQuestion("winogrande", 0, None, ("A went", "B went"), (" home.", " home."), label=1)
    assert zeroshot.predictions(w, [-5.0, -4.0]) == (1, 1)


def test_unknown_task_is_a_value_error_listing_the_tasks(llm: Any) -> None:
    with pytest.raises(ValueError) as e:
        zeroshot.score_tasks(llm, ["arc_easy", "arc_hard"], limit=1, progress=False)
    assert isinstance(e.value, data.UnknownTaskError)
    assert "'arc_hard'" in str(e.value) and all(t in str(e.value) for t in data.CHESS_TASKS)


def test_score_tasks_reports_each_task_and_the_average(llm: Any, capsys: pytest.CaptureFixture) -> None:
    res = zeroshot.score_tasks(llm, ["winogrande", "openbookqa"], limit=3, progress=True)
    assert set(res) == {"winogrande", "openbookqa", "average"}
    for task in ("winogrande", "openbookqa"):
        assert res[task]["n"] == 3 and 0 <= res[task]["acc"] <= 1 and 0 <= res[task]["acc_norm"] <= 1
    for m in ("acc", "acc_norm"):
        assert res["average"][m] == pytest.approx((res["winogrande"][m] + res["openbookqa"][m]) / 2)
    assert "6/6" in capsys.readouterr().err  # tqdm's bar, on stderr


# --- (a) batched == alone -------------------------------------------------------------------------


def test_shared_prefix_batches_equal_scoring_each_request_alone(llm: Any, subset: dict, ours: dict) -> None:
    """Every task (Winogrande's per-choice contexts included): the default grouping and a
    grouping forced into many small groups and decode calls both reproduce, bit for bit, each
    request decoded alone in an empty cache."""
    questions = [reqs for t in subset for reqs in subset[t][1][:ALONE]]
    batched = [lls for t in subset for lls in ours[t][:ALONE]]
    assert any(zeroshot._shared_prefix(q, 16) for q in questions)  # the prefix path is exercised
    alone = zeroshot.request_logliks(llm, questions, share_prefix=False)
    small = zeroshot.request_logliks(llm, questions, n_batch=24, n_seq_max=5, group_cells=192)
    for a, b, c, reqs in zip(alone, batched, small, questions, strict=True):
        assert len(a) == len(reqs)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-9)


# --- (b) against transformers -----------------------------------------------------------------------


def _margin(values: list[float]) -> float:
    top = sorted(values, reverse=True)
    return top[0] - top[1]


def test_scores_match_the_transformers_reference(small_model_path: Path, subset: dict, ours: dict) -> None:
    pytest.importorskip("transformers")
    from actsparse import reference

    model = reference.load_model(small_model_path, threads=THREADS)
    n = agree = agree_norm = 0
    acc = {"ours": [0, 0], "ref": [0, 0]}
    per_token = []
    for task, (questions, requests) in subset.items():
        ref = reference.request_logliks(model, requests)
        for q, reqs, a, b in zip(questions, requests, ours[task], ref, strict=True):
            for r, x, y in zip(reqs, a, b, strict=True):
                k = len(r.continuation_tokens)
                assert abs(x - y) <= 0.8 + 0.1 * k, (task, q.doc_id, r.continuation, x, y)
                per_token.append(abs(x - y) / k)
            pa, pb = zeroshot.predictions(q, a), zeroshot.predictions(q, b)
            lengths = [max(1, zeroshot.choice_length(c)) for c in q.choices]
            if _margin(b) >= 0.5:
                assert pa[0] == pb[0], (task, q.doc_id, a, b)
            if _margin([v / c for v, c in zip(b, lengths, strict=True)]) >= 0.5 / min(lengths):
                assert pa[1] == pb[1], (task, q.doc_id, a, b)
            n += 1
            agree += pa[0] == pb[0]
            agree_norm += pa[1] == pb[1]
            for who, p in (("ours", pa), ("ref", pb)):
                acc[who][0] += p[0] == q.label
                acc[who][1] += p[1] == q.label
    assert n == PER_TASK * len(data.CHESS_TASKS)
    assert float(np.median(per_token)) < 0.1
    assert agree >= 0.9 * n and agree_norm >= 0.9 * n
    assert abs(acc["ours"][0] - acc["ref"][0]) <= 1  # pooled acc within one question
    assert abs(acc["ours"][1] - acc["ref"][1]) <= 1
