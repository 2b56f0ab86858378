"""Conversion: model -> calibration statistics -> thresholds -> sparse GGUF.

`python python/convert_with_thresholds.py MODEL.gguf` and `actsparse convert MODEL.gguf` both
land in `main()`. The output schema is docs/gguf-format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from . import (
    __version__,
    allocation,
    calibration,
    column_norms,
    copy_choice,
    gguf_io,
    quality_budget,
    schema,
    thresholds,
    transpose,
)
from .gguf_io import GGUFError, ModelInfo, NewTensor
from .kld_probe import KLDProbe, ProbeText
from .options import from_args
from .progress import Stage, StagedProgress

DEFAULT_LEVELS = "0.3,0.4,0.5,0.6,0.7"
DEFAULT_LEVEL = 0.5
DEFAULT_TOKENS = 65536
DEFAULT_REFINE_TOKENS = 8192
DEFAULT_WINDOW = 512
DEFAULT_TRANSPOSED_TYPE = copy_choice.AUTO
TRANSPOSED_TYPE_CHOICES = (copy_choice.AUTO, *transpose.TRANSPOSED_TYPE_CHOICES)
DEFAULT_ALLOCATE_TOKENS = allocation.DEFAULT_PROBE_TOKENS


class UsageError(ValueError):
    """Bad arguments or input; reported as one line with exit code 2."""


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion (the converter's command line, one field per option)."""

    model: Path
    output: Path | None = None  # default: MODEL.sparse.gguf beside the input
    sparsity: str = DEFAULT_LEVELS
    default_level: float | None = None
    method: str = "chess"
    attn: bool = True
    calib_file: Path | None = None
    calib_tokens: int = DEFAULT_TOKENS
    refine_tokens: int | None = None  # default: min(calib_tokens, DEFAULT_REFINE_TOKENS)
    window: int = DEFAULT_WINDOW
    transposed_type: str = DEFAULT_TRANSPOSED_TYPE
    weighted_scores: bool = False
    allocate: bool = False
    allocate_tokens: int = DEFAULT_ALLOCATE_TOKENS
    save_stats: Path | None = None
    load_stats: Path | None = None
    threads: int = 2
    force: bool = False
    quiet: bool = False


@dataclass
class CalibText:
    name: str
    text: str
    recorded_sha256: str = ""  # of a text only known through saved statistics

    @property
    def sha256(self) -> str:
        return self.recorded_sha256 or hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="input GGUF (any supported gated-FFN model)")
    p.add_argument(
        "-o", "--output", type=Path, help="output GGUF (default: MODEL.sparse.gguf beside the input)"
    )
    p.add_argument(
        "--sparsity", default=DEFAULT_LEVELS,
        help=f"comma-separated target sparsity levels in (0,1) (default {DEFAULT_LEVELS}); kld:X asks "
        "for the largest sparsity whose mean KL divergence against dense, measured on calibration "
        "text, stays within X (e.g. 0.3,kld:0.05,0.5)",
    )  # fmt: skip
    p.add_argument(
        "--default-level", type=float, default=None,
        help=f"level --sparse uses without a value (default {DEFAULT_LEVEL} if listed, else the middle one)",
    )  # fmt: skip
    p.add_argument(
        "--method", choices=schema.METHODS, default="chess",
        help="threshold method (default chess): chess (channel-wise FFN thresholds), cats (one FFN threshold "
        "per layer), or r-sparse (the input of every projection, q k v o gate up down, scored by "
        "|x_i| ||W[:, i]||; no low-rank term yet)",
    )  # fmt: skip
    p.add_argument(
        "--no-attn", dest="attn", action="store_false", help="no selective attention thresholds (FFN only)"
    )
    p.add_argument("--calib-file", type=Path, help="calibration text file (default: the project's corpus)")
    p.add_argument(
        "--calib-tokens", type=int, default=DEFAULT_TOKENS,
        help=f"calibration tokens (default {DEFAULT_TOKENS}). More tokens make each layer's realized "
        "sparsity closer to its level on other text, not the quality: at 0.5, the worst layer on "
        "held-out text misses by 0.030 / 0.025 / 0.024 with 4,096 / 16,384 / 65,536 tokens on "
        "SmolLM2-135M (mean KLD 0.225 / 0.229 / 0.230), and by 0.026 / 0.024 with 8,192 / 65,536 on "
        "Qwen2.5-Coder-1.5B (0.282 / 0.278; docs/gguf-format.md). Conversion time "
        "grows with it: about one forward pass over these tokens, plus the sparse-aware pass",
    )  # fmt: skip
    p.add_argument(
        "--refine-tokens", type=int, default=None, metavar="N",
        help="tokens of the sparse-aware pass, which runs the written model at each level and the "
        "dense model once over the same windows and corrects each threshold by the ratio of the two "
        f"quantiles (default: min(--calib-tokens, {DEFAULT_REFINE_TOKENS}); 0 skips it)",
    )  # fmt: skip
    p.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})"
    )
    p.add_argument(
        "--transposed-type", choices=TRANSPOSED_TYPE_CHOICES, default=DEFAULT_TRANSPOSED_TYPE,
        help="type of the transposed copies decode reads ffn_down, attn_q and attn_output through. auto "
        "(default) measures on calibration text what same-type copies cost in KL divergence against "
        "q8_0 copies and keeps same only where, at every level, it reads fewer bytes at equal quality "
        "(5 runs of --allocate-tokens; docs/gguf-format.md)",
    )  # fmt: skip
    p.add_argument(
        "--weighted-scores", action=argparse.BooleanOptionalAction, default=False,
        help="score each sparse input by its magnitude times the norm of the weight column it reads "
        "(|a_i| E|u_i| ||W_down[:, i]|| for FFN channels, |x_i| ||W[:, i]|| for the attention inputs), "
        "the output it moves, instead of CHESS's magnitude alone. Model-dependent: at equal bytes it "
        "lowered Qwen2.5-Coder-1.5B's KLD by 7-14%% and raised SmolLM2-135M's by 8-28%% "
        "(default off; docs/gguf-format.md)",
    )  # fmt: skip
    p.add_argument(
        "--allocate", action=argparse.BooleanOptionalAction, default=False,
        help="spread each level's saving over layers and kinds by measured sensitivity instead of "
        "giving each the level: every layer's FFN, q input and o input is run alone sparse, its KL "
        "divergence against dense measured, and each level skips the bytes uniform sparsity skips at "
        "the least modelled cost. On SmolLM2-135M it lowered the KLD at 0.5 from 0.223 to 0.201 at "
        "equal bytes (0.3 and 0.7: -1%%, -2%%) for about 2.3x the conversion time "
        "(default off; docs/gguf-format.md)",
    )  # fmt: skip
    p.add_argument(
        "--allocate-tokens", type=int, default=DEFAULT_ALLOCATE_TOKENS, metavar="N",
        help="calibration tokens of each llama-perplexity run of --allocate (one per layer and kind, "
        "and each kind whole at 3 sparsities), of a kld:X level's search and of --transposed-type "
        "auto's measurement "
        f"(default {DEFAULT_ALLOCATE_TOKENS})",
    )  # fmt: skip
    p.add_argument(
        "--save-stats", type=Path, metavar="PATH",
        help="also keep the calibration statistics (a GGUF) for later conversions with --load-stats",
    )  # fmt: skip
    p.add_argument(
        "--load-stats", type=Path, metavar="PATH",
        help="use statistics saved by --save-stats from the same model instead of calibrating again "
        "(another method or level set without re-running the model)",
    )  # fmt: skip
    p.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument(
        "--force", action="store_true", help="re-calibrate an input that already carries thresholds"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def default_output(model: Path) -> Path:
    name = model.name[: -len(".gguf")] if model.name.endswith(".gguf") else model.name
    return model.with_name(name + ".sparse.gguf")


def check_output(model: Path, out: Path) -> None:
    if out.resolve() == model.resolve() or (out.exists() and os.path.samefile(out, model)):
        raise UsageError(f"output path {out} is the input; choose another with -o")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")


def load_calibration_text(path: Path | None) -> CalibText:
    if path is not None:
        try:
            return CalibText(path.name, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read calibration text {path}: {e.__class__.__name__}") from None
    from . import data

    corpus = data.calibration_corpus()
    return CalibText(corpus.name, corpus.text)


def loaded_stats(
    path: Path, info: ModelInfo, method: str, weighted: bool, kinds: Sequence[schema.Kind]
) -> calibration.CalibrationStats:
    """Statistics saved by --save-stats, checked against the model they are applied to."""
    if not path.is_file():
        raise UsageError(f"statistics file {path} does not exist")
    stats = calibration.read_stats(path)
    n_ff = [int(layer.mean_abs_up.shape[0]) for layer in stats.layers]
    if len(stats.layers) != info.n_layer or any(n != info.n_ff for n in n_ff):
        raise UsageError(
            f"statistics {path} were collected on a different model (layers or FFN width differ)"
        )
    if method == "chess" and not stats.has_scores:
        raise UsageError(f"statistics {path} lack the CHESS pass (collected for cats); calibrate again")
    if method == "r-sparse" and any(ls.input_hist(k) is None for ls in stats.layers for k in kinds):
        raise UsageError(f"statistics {path} were not collected for r-sparse (its input scores are missing)")
    if stats.weighted_scores != weighted:
        have, want, fix = (
            ("weighted", "plain", "add") if stats.weighted_scores else ("plain", "weighted", "drop")
        )
        raise UsageError(
            f"statistics {path} hold {have} scores, the conversion asks for {want} ones; "
            f"{fix} --weighted-scores or calibrate again"
        )
    return stats


def choose_default_level(levels: list[float], requested: float | None) -> float:
    if requested is not None:
        if not any(schema.same_level(requested, v) for v in levels):
            raise UsageError(f"--default-level {requested} is not one of the levels {levels}")
        return requested
    if any(schema.same_level(DEFAULT_LEVEL, v) for v in levels):
        return DEFAULT_LEVEL
    return levels[len(levels) // 2]


def kind_thresholds(
    ls: calibration.LayerStats, kind: schema.Kind, targets: Sequence[float], method: str
) -> np.ndarray:
    """[len(targets), n] thresholds of one layer's `kind`, one row per target sparsity (0: none
    skipped, threshold 0)."""
    if kind is schema.FFN:
        if method == "chess":
            if ls.score_hist is None:
                raise RuntimeError("CHESS scores missing from the statistics")
            scale = ls.mean_abs_up * ls.col_norms["ffn"] if "ffn" in ls.col_norms else ls.mean_abs_up

            def at(levels: list[float]) -> np.ndarray:
                return thresholds.chess_thresholds(scale, ls.score_hist, levels)

            width = ls.mean_abs_up.size
        else:

            def at(levels: list[float]) -> np.ndarray:
                return thresholds.cats_thresholds(ls.act_hist, levels)

            width = 1
    else:
        hist = ls.input_hist(kind)
        if hist is None:
            raise calibration.CalibrationError(f"statistics of {kind.name} missing (its input was not seen)")
        norms = ls.col_norms.get(kind.name)

        # weighted: a histogram of |x_i| ||W[:, i]||, so input i's threshold is tau / ||W[:, i]||
        def at(levels: list[float]) -> np.ndarray:
            if norms is None:
                return thresholds.layer_thresholds(hist, levels)
            return thresholds.chess_thresholds(norms, hist, levels)

        width = 1 if norms is None else norms.size
    out = np.zeros((len(targets), width), dtype=np.float32)
    live = [i for i, v in enumerate(targets) if v > 0]
    if live:
        out[live] = at([float(targets[i]) for i in live])
    return out


def threshold_tensors(
    info: ModelInfo, stats: calibration.CalibrationStats, targets: np.ndarray, method: str, attn: bool
) -> list[NewTensor]:
    """Every threshold tensor; `targets` [levels, n_layer, kinds] is each layer's kind's sparsity at
    each level (allocation.uniform for uniform levels)."""
    out: list[NewTensor] = []
    f32 = GGMLQuantizationType.F32
    kinds = schema.sparse_kinds(method, attn)
    for il, ls in enumerate(stats.layers):
        for kind in kinds:
            t = kind_thresholds(ls, kind, targets[:, il, schema.KINDS.index(kind)].tolist(), method)
            out.append(_const(kind.thresh_name(il), t, f32))
    return out


def _const(name: str, values: np.ndarray, qtype: GGMLQuantizationType) -> NewTensor:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise UsageError(f"{name}: non-finite or negative threshold computed (damaged statistics)")
    return NewTensor(name, (values.shape[1], values.shape[0]), qtype, lambda: values)


def reuses_dense_windows(p: Plan) -> bool:
    """Whether the sparse-aware pass reads the very windows of the dense calibration, whose own
    thresholds then stand for its dense run (as when --refine-tokens equals --calib-tokens)."""
    o = p.options
    windows = -(-p.refine_tokens // o.window)
    return o.load_stats is None and windows == -(-o.calib_tokens // o.window)


def sparse_aware_thresholds(
    model: Path,
    dense_model: Path,
    info: ModelInfo,
    text: str,
    dense_stats: Path,
    dense_thresholds: dict[str, np.ndarray],
    p: Plan,
    targets: np.ndarray,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Each level's thresholds corrected by statistics of the runtime at that level.

    The first calibration ran the model dense, but at runtime a layer's input comes from sparse
    layers, so its activations are a little different and deep layers realize more sparsity than
    their target. Here `model` (already carrying the first thresholds) runs at each level over a
    subset of the text's windows, and `dense_model` runs dense over the same windows once. Each
    threshold becomes its dense value times the ratio of the sparse to the dense quantile on those
    windows: the ratio measures the sparse layers' effect with the text's own variation cancelled,
    so a few thousand tokens per level do what a full pass per level would. CHESS keeps the first
    pass's E|u_i|, so only each layer's tau moves. `targets` are each layer's kind's sparsity per
    level. Returns the new [levels, n] values of every threshold tensor.
    """
    o = p.options
    tokens = p.refine_tokens

    def run(k: int, source: Path, row: int | None) -> dict[str, np.ndarray]:
        """Pass k: `source` at level `row` of the file (None: dense, every level's thresholds)."""
        level = 0.0 if row is None else p.levels[row]
        stats = calibration.collect(
            source, text, tokens=tokens, window=o.window, threads=o.threads,
            chess=o.method == "chess", sparse=level,
            mean_abs_up_from=dense_stats if o.method == "chess" else None,
            column_norms=dense_stats if p.weighted else None,  # the statistics carry the norms
            on_progress=None if on_progress is None else lambda n: on_progress(k * tokens + n),
        )  # fmt: skip
        at = targets if row is None else targets[row : row + 1]
        return {t.name: t.make() for t in threshold_tensors(info, stats, at, o.method, o.attn)}

    same_windows = reuses_dense_windows(p)
    dense_subset = dense_thresholds if same_windows else run(0, dense_model, None)
    first = 0 if same_windows else 1
    rows: dict[str, list[np.ndarray]] = {}
    for k in range(len(p.levels)):
        for name, sparse in run(k + first, model, k).items():
            dense_full, dense_sub = dense_thresholds[name][k], dense_subset[name][k]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(dense_sub > 0, sparse[0] / dense_sub, 1.0)
            corrected = np.where(dense_sub > 0, dense_full * ratio, sparse[0])
            rows.setdefault(name, []).append(np.minimum(corrected, thresholds.FLT_MAX))
    # a level's thresholds never fall below the previous level's, as the runtime expects
    return {name: np.maximum.accumulate(np.stack(v), axis=0) for name, v in rows.items()}


def overwrite_thresholds(
    path: Path,
    values: dict[str, np.ndarray],
    targets: np.ndarray | None = None,
    fields: dict[str, Sequence[float] | float] | None = None,
) -> None:
    """Write new values into the threshold tensors of a GGUF in place (same shapes), new targets
    into its schema.KEY_ALLOCATION and new f32 values into `fields` (same lengths)."""
    reader = gguf_io.open_for_rewrite(path)
    tensors = {t.name: t for t in reader.tensors}
    for name, v in values.items():
        tensors[name].data[...] = v.reshape(tensors[name].data.shape)
    fields = dict(fields or {})
    if targets is not None:
        fields[schema.KEY_ALLOCATION] = np.asarray(targets).reshape(-1).tolist()
    for key, value in fields.items():
        f = reader.get_field(key)
        flat = np.atleast_1d(np.asarray(value, dtype=np.float32))
        if f is None or len(f.data) != flat.size:
            raise RuntimeError(f"{path}: no room for {key}")
        for i, v in zip(f.data, flat, strict=True):
            f.parts[i][0] = v
    reader.data.flush()


def allocated_targets(
    p: Plan,
    stats: calibration.CalibrationStats,
    written: Path,
    text: str,
    on_progress: Callable[[int], None] | None = None,
) -> Callable[[Sequence[float]], np.ndarray]:
    """Stage --allocate: each unit's sensitivity measured on `written` (its thresholds at the
    first level rewritten per probe); returns the levels -> allocation function (allocation.py)."""
    o = p.options
    unit_list = allocation.units(p.info, stats, o.method, p.kinds)
    zeros = {t.name: np.zeros_like(t.make()) for t in threshold_tensors(
        p.info, stats, allocation.uniform(p.levels, p.info.n_layer), o.method, o.attn)}  # fmt: skip

    def probe_thresholds(u: allocation.Unit, s: float) -> tuple[str, np.ndarray]:
        name = u.kind.thresh_name(u.layer)
        values = zeros[name].copy()
        values[0] = kind_thresholds(stats.layers[u.layer], u.kind, [s], o.method)[0]
        return name, values

    probe = probe_options(p)
    sens = allocation.measure_sensitivity(
        written, p.levels[0], unit_list, probe_thresholds, lambda v: overwrite_thresholds(written, v), zeros,
        text, probe, on_progress,
    )  # fmt: skip
    return lambda levels: allocation.allocation(unit_list, sens, levels, p.info.n_layer)


def budget_levels(
    p: Plan,
    stats: calibration.CalibrationStats,
    written: Path,
    text: str,
    targets_for: Callable[[Sequence[float]], np.ndarray],
    copy_cost: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[Plan, list[quality_budget.Found]]:
    """Stage kld:X: each budget's level bisected on `written` (its first level's thresholds
    rewritten per run; `copy_cost`, what decode's copies add, counted in), then the levels, default
    level and budgets rewritten in the file."""
    o = p.options
    at_level = level_kld(p, stats, written, targets_for)
    step = run_counter(on_progress)

    def kld_at(s: float) -> float:
        return at_level(probe, s) + copy_cost

    found = []
    with KLDProbe(written, p.levels[0], text, probe_text(o)) as probe:
        step()
        for budget in p.budgets:
            try:
                found.append(quality_budget.search_level(budget, kld_at, step))
            except ValueError as e:
                raise calibration.CalibrationError(str(e)) from None
    levels, per_level = quality_budget.final_levels(p.numeric_levels, found)
    default = choose_default_level(levels, o.default_level)
    return replace(p, levels=levels, default_level=default, level_budgets=per_level), found


def run_counter(on_progress: Callable[[int], None] | None) -> Callable[[], None]:
    """A callback that counts the runs done into on_progress."""
    runs = 0

    def step() -> None:
        nonlocal runs
        runs += 1
        if on_progress is not None:
            on_progress(runs)

    return step


def level_kld(
    p: Plan,
    stats: calibration.CalibrationStats,
    written: Path,
    targets_for: Callable[[Sequence[float]], np.ndarray],
) -> Callable[[KLDProbe, float], float]:
    """(probe, s) -> the mean KLD of `written` at any sparsity s: its first level's thresholds
    rewritten to s's (the other levels' kept), measured at that slot."""
    o = p.options
    current = {
        t.name: t.make() for t in threshold_tensors(p.info, stats, targets_for(p.levels), o.method, o.attn)
    }

    def at(probe: KLDProbe, s: float) -> float:
        row = {t.name: t.make() for t in threshold_tensors(p.info, stats, targets_for([s]), o.method, o.attn)}
        overwrite_thresholds(written, {n: np.vstack([row[n], v[1:]]) for n, v in current.items()})
        return probe.kld()

    return at


COPY_CHOICE_RUNS = 5  # dense, the sparsity at two levels, each candidate's copies


def choose_copies(
    p: Plan,
    stats: calibration.CalibrationStats,
    written: Path,
    text: str,
    targets_for: Callable[[Sequence[float]], np.ndarray],
    tmp: Path,
    on_progress: Callable[[int], None] | None = None,
) -> copy_choice.CopyChoice:
    """Stage --transposed-type auto: each candidate's copy cost and the sparsity's own cost at two
    levels measured on `written` (its thresholds restored after), then copy_choice.choose."""
    o = p.options
    at_level = level_kld(p, stats, written, targets_for)
    verdict_levels = p.numeric_levels or list(copy_choice.FALLBACK_LEVELS)
    step = run_counter(on_progress)

    with KLDProbe(written, p.levels[0], text, probe_text(o)) as probe:
        step()
        sparsity = {}
        for s in copy_choice.probe_levels(verdict_levels):
            sparsity[s] = at_level(probe, s)
            step()
        copies = {}
        for policy in copy_choice.CANDIDATES:
            effective = tmp / f"copies-{policy}.gguf"
            copy_choice.write_effective_model(p.info, effective, policy, p.kinds)
            copies[policy] = probe.dense_kld(effective)
            effective.unlink()
            step()
    current = threshold_tensors(p.info, stats, targets_for(p.levels), o.method, o.attn)
    overwrite_thresholds(written, {t.name: t.make() for t in current})

    def weight_bytes(policy: str, s: float) -> float:
        return copy_choice.decode_weight_bytes(p.info, p.kinds, policy, s)

    return copy_choice.choose(copies, sparsity, verdict_levels, weight_bytes)


def rewrite_copies(
    info: ModelInfo, kinds: Sequence[schema.Kind], written: Path, choice: copy_choice.CopyChoice
) -> None:
    """Record the measured copy costs in `written` and, where its copies are of another type than
    the chosen one, rewrite them in that type (all else kept)."""
    costs = [choice.copy_kld[c] for c in copy_choice.CANDIDATES]
    current = gguf_io.open_gguf(written)
    if gguf_io.field_value(current, schema.KEY_TRANSPOSED_TYPE) == choice.policy:
        del current
        overwrite_thresholds(written, {}, fields={schema.KEY_TRANSPOSED_TYPE_KLD: costs})
        return
    kv = {
        schema.KEY_TRANSPOSED_TYPE: (choice.policy, GGUFValueType.STRING),
        schema.KEY_TRANSPOSED_TYPE_KLD: (costs, GGUFValueType.ARRAY),
    }
    copies = transposed_tensors(info, kinds, choice.policy)
    copy_names = {t.name for t in copies}
    with gguf_io.atomic_output(written) as again:
        gguf_io.write_gguf(current, info.arch, again, kv, copies, drop=lambda name: name in copy_names)
    del current


def probe_options(p: Plan) -> allocation.ProbeOptions:
    """--allocate's probes: the whole kinds also at the lowest and highest level."""
    o = p.options
    fit = (min(levels), max(levels)) if (levels := p.numeric_levels) else (0.3, 0.7)
    return allocation.ProbeOptions(fit=fit, text=probe_text(o))


def probe_text(o: ConvertOptions) -> ProbeText:
    """The calibration text of each --allocate and kld:X run."""
    return ProbeText(o.allocate_tokens, min(o.window, o.allocate_tokens), o.threads)


def transposed_tensors(info: ModelInfo, kinds: Sequence[schema.Kind], policy: str) -> list[NewTensor]:
    out = []
    for il in range(info.n_layer):
        for kind in schema.copies(kinds):
            src = info.tensor(kind.weight_name(il))
            ne0, ne1 = int(src.shape[0]), int(src.shape[1])
            qtype = transpose.transposed_type(src.tensor_type, ne1, policy)
            out.append(
                NewTensor(
                    kind.copy_name(il),
                    (ne1, ne0),
                    qtype,
                    lambda s=src, q=qtype: transpose.transposed_copy(s, q),
                )
            )
    return out


@dataclass(frozen=True)
class Plan:
    """Options checked against the input: what the stages do."""

    options: ConvertOptions
    info: ModelInfo
    out: Path
    levels: list[float]  # provisional in the budgets' rows until they are found
    default_level: float
    refine_tokens: int
    numeric_levels: list[float] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # kld:X
    level_budgets: list[float] = field(default_factory=list)  # per level: its budget, 0 where none
    choose_copies: bool = False  # --transposed-type auto with candidates that differ for this model

    @property
    def kinds(self) -> tuple[schema.Kind, ...]:
        return schema.sparse_kinds(self.options.method, self.options.attn)

    @property
    def weighted(self) -> bool:
        """Weight-aware scores: asked for, or R-Sparse's own."""
        return self.options.weighted_scores or self.options.method == "r-sparse"

    @property
    def first_copies(self) -> str:
        """The copy type written first (auto: q8_0 until the choice is made)."""
        policy = self.options.transposed_type
        return copy_choice.CANDIDATES[0] if policy == copy_choice.AUTO else policy


def plan(options: ConvertOptions) -> Plan:
    try:
        numeric, budgets = quality_budget.parse_sparsity(options.sparsity)
    except ValueError as e:
        raise UsageError(str(e)) from None
    levels = quality_budget.provisional_levels(numeric, len(budgets))
    if options.default_level is not None and not numeric:
        raise UsageError("--default-level must be one of the numeric --sparsity levels")
    default_level = choose_default_level(numeric or levels, options.default_level)
    if options.calib_tokens < 1 or options.window < 2 or options.threads < 1:
        raise UsageError("--calib-tokens, --window and --threads must be positive")
    if options.method not in schema.METHODS:
        raise UsageError(f"unknown method {options.method!r}; choose one of {', '.join(schema.METHODS)}")
    if options.transposed_type not in TRANSPOSED_TYPE_CHOICES:
        raise UsageError(f"unknown transposed type {options.transposed_type!r}")
    info = gguf_io.describe_model(gguf_io.open_gguf(options.model), options.model)
    if info.has_sparsity and not options.force:
        raise UsageError(
            f"{options.model} already carries actsparse thresholds; pass --force to re-calibrate it"
        )
    out = options.output or default_output(options.model)
    check_output(options.model, out)
    refine_tokens = options.refine_tokens
    if refine_tokens is None:
        refine_tokens = min(options.calib_tokens, DEFAULT_REFINE_TOKENS)
    if refine_tokens < 0:
        raise UsageError("--refine-tokens must be 0 or more")
    if options.allocate_tokens < 2:
        raise UsageError("--allocate-tokens must be 2 or more")
    kinds = schema.sparse_kinds(options.method, options.attn)
    choose = options.transposed_type == copy_choice.AUTO and copy_choice.policies_differ(info, kinds)
    return Plan(
        options, info, out, levels, default_level, refine_tokens, numeric, budgets, [0.0] * len(levels),
        choose,
    )  # fmt: skip


def statistics_stage(
    p: Plan, tmp: Path, on_progress: Callable[[int], None] | None = None, norms: Path | None = None
) -> tuple[calibration.CalibrationStats, CalibText, Path]:
    """Stage 1: the dense calibration statistics (or the saved ones), the text they came from and
    the statistics file the sparse-aware pass reads E|u_i| (and the column norms) from."""
    o = p.options
    if o.load_stats is not None:
        stats = loaded_stats(o.load_stats, p.info, o.method, p.weighted, p.kinds)
        calib = CalibText(stats.source or o.load_stats.name, "", stats.source_sha256)
        stats_file = o.load_stats
    else:
        calib = load_calibration_text(o.calib_file)
        stats_file = tmp / "stats.gguf"
        stats = calibration.collect(
            o.model, calib.text, save_to=stats_file, tokens=o.calib_tokens, window=o.window,
            threads=o.threads, chess=o.method == "chess", source=(calib.name, calib.sha256),
            column_norms=norms, on_progress=on_progress,
        )  # fmt: skip
        if o.save_stats is not None:
            with gguf_io.atomic_output(o.save_stats) as dest:
                shutil.copyfile(stats_file, dest)
    if stats.activation != p.info.activation:
        raise RuntimeError(f"collector used {stats.activation}, the architecture needs {p.info.activation}")
    return stats, calib, stats_file


def metadata(
    p: Plan, stats: calibration.CalibrationStats, calib: CalibText
) -> dict[str, tuple[object, GGUFValueType]]:
    o = p.options
    allocated = {}
    if o.allocate:  # uniform until the allocation stage writes its values in place
        flat = allocation.uniform(p.levels, p.info.n_layer).reshape(-1).tolist()
        allocated[schema.KEY_ALLOCATION] = (flat, GGUFValueType.ARRAY)
    if p.budgets:  # zeros until the budgets' levels are found
        allocated[schema.KEY_LEVEL_BUDGETS] = ([0.0] * len(p.levels), GGUFValueType.ARRAY)
    if p.choose_copies:  # measured by the copy-type stage
        allocated[schema.KEY_TRANSPOSED_TYPE_KLD] = ([0.0] * len(copy_choice.CANDIDATES), GGUFValueType.ARRAY)
    return allocated | {
        schema.KEY_FORMAT_VERSION: (schema.FORMAT_VERSION, GGUFValueType.UINT32),
        schema.KEY_METHOD: (o.method, GGUFValueType.STRING),
        schema.KEY_LEVELS: (p.levels, GGUFValueType.ARRAY),
        schema.KEY_DEFAULT_LEVEL: (p.default_level, GGUFValueType.FLOAT32),
        schema.KEY_ATTN: (o.attn, GGUFValueType.BOOL),
        schema.KEY_ACTIVATION: (p.info.activation, GGUFValueType.STRING),
        schema.KEY_UP_STATISTIC: ("mean_abs", GGUFValueType.STRING),
        schema.KEY_TRANSPOSED_TYPE: (p.first_copies, GGUFValueType.STRING),
        schema.KEY_WEIGHTED_SCORES: (p.weighted, GGUFValueType.BOOL),
        schema.KEY_CALIB_SOURCE: (calib.name, GGUFValueType.STRING),
        schema.KEY_CALIB_SHA256: (calib.sha256, GGUFValueType.STRING),
        schema.KEY_CALIB_TOKENS: (stats.tokens, GGUFValueType.UINT64),
        schema.KEY_CALIB_WINDOW: (stats.window, GGUFValueType.UINT32),
        schema.KEY_CALIB_SPARSE_AWARE_TOKENS: (p.refine_tokens, GGUFValueType.UINT64),
        schema.KEY_TOOL: (f"actsparse {__version__}", GGUFValueType.STRING),
    }


def progress_stages(p: Plan, new_bytes: int) -> list[Stage]:
    """The conversion's stages with their work and first guesses of their rates."""
    o = p.options
    file_bytes = sum(t.n_bytes for t in p.info.reader.tensors)
    # A first guess only (replaced by the measured rate within a second): decode reads every
    # weight once per token, and a batch of tokens runs about 60x faster per byte on 2 threads.
    tokens_per_s = 6e10 / max(file_bytes, 1)
    stages = []
    if o.load_stats is None and p.weighted:
        stages.append(Stage("column norms", p.info.n_layer, 1.0))
    if o.load_stats is None:
        stages.append(Stage("statistics", o.calib_tokens, tokens_per_s))
    stages.append(Stage("writing", file_bytes + new_bytes, 2e8))
    if o.allocate:
        stages.append(
            Stage(
                "allocation",
                allocation.probe_runs(p.info, p.kinds, probe_options(p)),
                tokens_per_s / max(o.allocate_tokens, 1),
            )
        )
    if p.choose_copies:
        stages.append(Stage("copy type", COPY_CHOICE_RUNS, tokens_per_s / max(o.allocate_tokens, 1)))
    if p.budgets:
        runs = 1 + len(p.budgets) * quality_budget.runs_per_budget()
        stages.append(Stage("quality budgets", runs, tokens_per_s / max(o.allocate_tokens, 1)))
    if p.refine_tokens > 0:
        stages.append(Stage("sparse-aware", len(p.levels) * p.refine_tokens, tokens_per_s, like="statistics"))
    return stages


def convert(options: ConvertOptions) -> Path:
    """Statistics, thresholds, the file written to a temporary path, the sparse-aware pass on it,
    then the rename: the output appears complete or not at all."""
    p = plan(options)
    o = p.options
    copies = transposed_tensors(p.info, p.kinds, p.first_copies)
    bar = StagedProgress(progress_stages(p, sum(t.nbytes for t in copies)), enabled=not o.quiet)
    try:
        return _convert(p, copies, bar)
    except BaseException:
        bar.close()  # the error that follows starts a line of its own
        raise
    finally:
        gguf_io.close_rewrites()  # a removed temporary file keeps its disk space while mapped


def _convert(p: Plan, copies: list[NewTensor], bar: StagedProgress) -> Path:
    o = p.options
    with tempfile.TemporaryDirectory(prefix="actsparse-convert-") as tmp:
        norms = None
        if o.load_stats is None and p.weighted:
            norms = Path(tmp) / "column-norms.gguf"
            with bar.stage("column norms", "(weights dequantized)") as update:
                done = 0

                def layer_done() -> None:
                    nonlocal done
                    done += 1
                    update(done)

                column_norms.write_column_norms(norms, column_norms.column_norms(p.info, p.kinds, layer_done))
        if o.load_stats is None:
            with bar.stage("statistics", f"({o.calib_tokens} tokens, dense)") as update:
                stats, calib, stats_file = statistics_stage(p, Path(tmp), update, norms)
        else:
            stats, calib, stats_file = statistics_stage(p, Path(tmp))
        targets = allocation.uniform(p.levels, p.info.n_layer)
        first = threshold_tensors(p.info, stats, targets, o.method, o.attn)
        new = first + copies
        reader = p.info.reader
        with gguf_io.atomic_output(p.out) as written:
            with bar.stage("writing", "(thresholds and transposed copies)") as update:
                done = 0

                def wrote(n: int) -> None:
                    nonlocal done
                    done += n
                    update(done)

                gguf_io.write_gguf(
                    reader, p.info.arch, written, metadata(p, stats, calib), new,
                    drop=lambda name: name.startswith(schema.KEY_PREFIX) or schema.is_sparsity_tensor(name),
                    progress=wrote,
                )  # fmt: skip
            gguf_io.release_pages(reader)  # the input's pages, read once, need not stay beside the pass
            text = calib.text if o.load_stats is None else load_calibration_text(o.calib_file).text
            n_layer = p.info.n_layer

            def targets_for(levels: Sequence[float]) -> np.ndarray:
                return allocation.uniform(levels, n_layer)

            if o.allocate:
                runs = allocation.probe_runs(p.info, p.kinds, probe_options(p))
                detail = f"({runs} sensitivity runs of {o.allocate_tokens} tokens)"
                with bar.stage("allocation", detail) as update:
                    targets_for = allocated_targets(p, stats, written, text, update)
                    targets = targets_for(p.levels)
                    first = threshold_tensors(p.info, stats, targets, o.method, o.attn)
                    overwrite_thresholds(written, {t.name: t.make() for t in first}, targets)
            choice = None
            if p.choose_copies:
                detail = f"({COPY_CHOICE_RUNS} runs of {o.allocate_tokens} tokens)"
                with bar.stage("copy type", detail) as update:
                    choice = choose_copies(p, stats, written, text, targets_for, Path(tmp), update)
                    rewrite_copies(p.info, p.kinds, written, choice)
            found: list[quality_budget.Found] = []
            if p.budgets:
                per = quality_budget.runs_per_budget()
                detail = f"({len(p.budgets)} x up to {per} runs of {o.allocate_tokens} tokens)"
                with bar.stage("quality budgets", detail) as update:
                    copy_cost = 0.0 if choice is None else choice.decode_copy_cost
                    p, found = budget_levels(p, stats, written, text, targets_for, copy_cost, update)
                    targets = targets_for(p.levels)
                    first = threshold_tensors(p.info, stats, targets, o.method, o.attn)
                    overwrite_thresholds(
                        written, {t.name: t.make() for t in first}, targets if o.allocate else None,
                        {schema.KEY_LEVELS: p.levels, schema.KEY_DEFAULT_LEVEL: p.default_level,
                         schema.KEY_LEVEL_BUDGETS: p.level_budgets},
                    )  # fmt: skip
            if p.refine_tokens > 0:
                dense_run = "" if reuses_dense_windows(p) else "dense + "
                detail = f"({dense_run}{len(p.levels)} levels x {p.refine_tokens} tokens)"
                with bar.stage("sparse-aware", detail) as update:
                    refined = sparse_aware_thresholds(
                        written, o.model, p.info, text, stats_file, {t.name: t.make() for t in first}, p,
                        targets, on_progress=update,
                    )  # fmt: skip
                    overwrite_thresholds(written, refined)
    summary = bar.close()
    if not o.quiet:
        if choice is not None:
            print(choice.summary(), file=sys.stderr)
        for f in found:
            budget = f"{quality_budget.PREFIX}{f.budget:g}"
            print(f"{budget}: level {f.level:g} (KLD {f.kld:.4f} on calibration text)", file=sys.stderr)
        print(f"converted in {summary}", file=sys.stderr)
    return p.out


def build_parser(prog: str = "convert_with_thresholds.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Calibrate CHESS/CATS/R-Sparse activation-sparsity thresholds on a GGUF model and "
        "write a new GGUF that carries them (docs/gguf-format.md).",
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(from_args(ConvertOptions, build_parser().parse_args(argv)))


def run(options: ConvertOptions) -> int:
    try:
        out = convert(options)
    except (UsageError, GGUFError, calibration.CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
