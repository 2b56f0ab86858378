"""Levels asked for by their quality (`--sparsity kld:X`): the largest sparsity whose mean KL
divergence against dense, measured with the real runtime on calibration text, stays within X.

The converter writes the file with a provisional level in each budget's row, then bisects each
budget's level on the written file (kld_probe.py) and rewrites the levels in place; the found
level is a level like any other (`--sparse LEVEL` selects it) and the file records the budget
beside it (schema.KEY_LEVEL_BUDGETS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import schema
from .allocation import MAX_SPARSITY

PREFIX = "kld:"
MIN_SPARSITY = 0.02  # a budget this level already exceeds is refused
BISECTION_STEPS = 7  # the level to within (MAX_SPARSITY - MIN_SPARSITY) / 2^7 = 0.007


def parse_sparsity(text: str) -> tuple[list[float], list[float]]:
    """'0.3,kld:0.05,0.5' -> ([0.3, 0.5], [0.05]): the numeric levels and the KL budgets, each
    sorted and unique."""
    from .thresholds import parse_levels

    items = [x.strip() for x in text.split(",") if x.strip()]
    budgets = []
    for item in items:
        if not item.startswith(PREFIX):
            continue
        try:
            v = float(item[len(PREFIX) :])
        except ValueError:
            raise ValueError(f"quality budget '{item}' is not kld:NUMBER") from None
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"quality budget '{item}' must be a positive KL divergence")
        budgets.append(v)
    numeric = [x for x in items if not x.startswith(PREFIX)]
    levels = parse_levels(",".join(numeric)) if numeric else []
    if not levels and not budgets:
        raise ValueError("no sparsity level given")
    return levels, sorted(set(budgets))


def provisional_levels(levels: list[float], n: int) -> list[float]:
    """`levels` and n placeholder levels for the budgets' rows until they are found: distinct from
    the levels and from one another, all sorted."""
    spare = [v for v in np.round(np.arange(0.05, 0.96, 0.01), 4) if all(abs(v - x) > 1e-3 for x in levels)]
    return sorted(levels + [float(v) for v in spare[:n]])


@dataclass(frozen=True)
class Found:
    budget: float
    level: float
    kld: float  # measured at the level on calibration text


def search_level(
    budget: float, kld_at: Callable[[float], float], on_step: Callable[[], None] | None = None
) -> Found:
    """The largest sparsity in [MIN_SPARSITY, MAX_SPARSITY] whose kld_at stays within the budget
    (kld_at rises with the sparsity); ValueError when even MIN_SPARSITY costs more."""

    def at(s: float) -> float:
        v = kld_at(s)
        if on_step is not None:
            on_step()
        return v

    top = at(MAX_SPARSITY)
    if top <= budget:
        return Found(budget, MAX_SPARSITY, top)
    low = at(MIN_SPARSITY)
    if low > budget:
        raise ValueError(
            f"{PREFIX}{budget:g} cannot be met: sparsity {MIN_SPARSITY:g} already costs a KLD of {low:.4f}"
        )
    lo, hi, lo_kld = MIN_SPARSITY, MAX_SPARSITY, low
    for _ in range(BISECTION_STEPS):
        mid = round(0.5 * (lo + hi), 4)
        v = at(mid)
        if v <= budget:
            lo, lo_kld = mid, v
        else:
            hi = mid
    return Found(budget, lo, lo_kld)


def runs_per_budget() -> int:
    return 2 + BISECTION_STEPS


def final_levels(levels: list[float], found: list[Found]) -> tuple[list[float], list[float]]:
    """(levels, budgets per level, 0 where none): the numeric levels and the found ones, sorted; a
    found level that meets another is moved just below it (less sparse, so within its budget)."""
    taken = list(levels)
    rows: list[tuple[float, float]] = [(v, 0.0) for v in levels]
    for f in sorted(found, key=lambda f: f.level):
        v = f.level
        while any(schema.same_level(v, x) or abs(v - x) < 1e-3 for x in taken):
            v = round(v - 1e-3, 6)
        taken.append(v)
        rows.append((v, f.budget))
    rows.sort()
    return [v for v, _ in rows], [b for _, b in rows]
