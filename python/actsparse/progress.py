"""One progress bar over a job of several stages, with an ETA in seconds of the whole job.

Each stage counts its own units (tokens, bytes). The bar advances in estimated seconds: a stage's
units divided by its rate, which is measured while it runs and, before it starts, taken from a
stage it runs like (the sparse-aware pass runs as the dense pass does) or from a first guess. The
total is re-estimated as rates become known, so the ETA covers every stage still to come.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class Stage:
    name: str
    units: float  # work in this stage's own units
    rate_guess: float  # units per second until measured
    like: str | None = None  # a stage whose measured rate this one shares
    rate_scale: float = 1.0  # this stage's rate relative to that stage's
    done: float = 0.0
    seconds: float = 0.0
    rate: float | None = None  # measured
    finished: bool = False

    def expected_rate(self, stages: dict[str, Stage]) -> float:
        if self.rate is not None:
            return self.rate
        other = stages.get(self.like) if self.like else None
        if other is not None and other.rate is not None:
            return other.rate * self.rate_scale
        return self.rate_guess


@dataclass
class StagedProgress:
    stages: list[Stage]
    enabled: bool = True
    _bar: tqdm | None = field(default=None, init=False)
    _last_refresh: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.stages}

    def _seconds(self, s: Stage, units: float) -> float:
        """Seconds that `units` of stage s take: as measured once it has finished, else estimated."""
        if s.finished:
            return s.seconds * units / max(s.units, 1e-9)
        return units / max(s.expected_rate(self._by_name), 1e-9)

    def _estimate(self) -> float:
        return max(sum(self._seconds(s, s.units) for s in self.stages), 1e-9)

    def _position(self) -> float:
        return sum(self._seconds(s, s.done) for s in self.stages)

    def _refresh(self, desc: str, force: bool = True) -> None:
        if not self.enabled or not any(s.done for s in self.stages):
            return  # drawn from the first unit done: an input refused at once prints only its error
        if self._bar is None:
            self._bar = tqdm(
                total=self._estimate(), dynamic_ncols=True, file=sys.stderr,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
            )  # fmt: skip
        now = time.perf_counter()
        if not force and now - self._last_refresh < 0.25:
            return
        self._last_refresh = now
        self._bar.total = self._estimate()
        self._bar.n = min(self._position(), self._bar.total)
        self._bar.set_description_str(desc, refresh=False)
        self._bar.refresh()

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[Callable[[float], None]]:
        """Run a stage; the callable it yields reports units done (absolute count)."""
        s = self._by_name[name]
        t0 = time.perf_counter()
        label = f"{name} {detail}".strip()

        def update(done: float) -> None:
            s.done = min(done, s.units)
            elapsed = time.perf_counter() - t0
            if s.done > 0 and elapsed > 0.5:
                s.rate = s.done / elapsed
            self._refresh(label, force=False)

        self._refresh(label)
        yield update
        s.seconds = time.perf_counter() - t0
        s.done = s.units
        s.finished = True
        self._refresh(label)

    def close(self) -> str:
        """Ends the bar; returns one line with each stage's time."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        parts = [f"{s.name} {s.seconds:.1f} s" for s in self.stages if s.seconds > 0]
        return ", ".join(parts) + f"; total {sum(s.seconds for s in self.stages):.1f} s"
