"""The conversion's progress bar: one bar over stages, its ETA from measured rates."""

from __future__ import annotations

import pytest

from actsparse import progress
from actsparse.progress import Stage, StagedProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def test_later_stages_are_estimated_from_the_rate_measured_so_far(clock: Clock) -> None:
    bar = StagedProgress(
        [
            Stage("statistics", 1000, rate_guess=1.0),  # a poor first guess: 1000 s
            Stage("writing", 100, rate_guess=100.0),  # 1 s
            Stage("sparse-aware", 500, rate_guess=1.0, like="statistics"),
        ],
        enabled=False,
    )
    assert bar._estimate() == pytest.approx(1000 + 1 + 500)
    with bar.stage("statistics") as update:
        clock.now = 10.0
        update(500)  # 50 tokens/s measured
        # the first stage's rest and the stage that runs like it both follow the measured rate
        assert bar._estimate() == pytest.approx(20 + 1 + 10)
        assert bar._position() == pytest.approx(10)
        clock.now = 20.0
        update(1000)
    with bar.stage("writing") as update:
        clock.now = 22.0
        update(100)
    with bar.stage("sparse-aware") as update:
        clock.now = 32.0
        update(500)
    assert bar._estimate() == pytest.approx(32.0)
    assert bar.close() == "statistics 20.0 s, writing 2.0 s, sparse-aware 10.0 s; total 32.0 s"


def test_a_stage_that_ends_short_of_its_units_counts_as_done(clock: Clock) -> None:
    # a calibration text shorter than --calib-tokens: the collector stops early
    bar = StagedProgress([Stage("statistics", 1000, rate_guess=100.0)], enabled=False)
    with bar.stage("statistics") as update:
        clock.now = 3.0
        update(300)
    assert bar._position() == pytest.approx(bar._estimate()) == pytest.approx(3.0)
