"""Measurement core on a fake clock: no assertion here depends on real time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv.profile.stats import (
    MAD_TO_SIGMA,
    measure_interleaved,
    paired_ratio,
    percentile,
    summarize,
    wall_timer,
)


class FakeClock:
    """A clock that only moves when a fake model 'runs'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def model(clock: FakeClock, durations: list[float], log: list[str], name: str):
    """A call that takes durations[i] fake seconds on its i-th invocation (cycling) and logs itself."""
    count = [0]

    def call() -> None:
        clock.advance(durations[count[0] % len(durations)])
        count[0] += 1
        log.append(name)

    return call


floats = st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(floats, st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_known_values() -> None:
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.100])  # seconds -> reported in ms
    assert s.samples == 5
    assert s.median_ms == pytest.approx(3.0)
    assert s.min_ms == pytest.approx(1.0)
    assert s.max_ms == pytest.approx(100.0)
    assert s.mean_ms == pytest.approx(22.0)
    assert s.std_ms == pytest.approx(float(np.std([1, 2, 3, 4, 100], ddof=1)))
    assert s.p90_ms == pytest.approx(float(np.percentile([1, 2, 3, 4, 100], 90)))
    assert s.iqr_ms == pytest.approx(2.0)
    # the outlier moves the std a lot, the robust spread (MAD) not at all
    assert s.mad_ms == pytest.approx(1.0)
    assert s.robust_sigma_ms == pytest.approx(MAD_TO_SIGMA)


def test_summarize_single_sample_has_zero_spread() -> None:
    s = summarize([0.005])
    assert (s.std_ms, s.iqr_ms, s.mad_ms) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratio_median_and_iqr() -> None:
    ref = [2.0, 2.0, 4.0, 4.0, 10.0]
    cand = [1.0, 1.5, 2.0, 3.0, 5.0]  # ratios 0.5, 0.75, 0.5, 0.75, 0.5
    r = paired_ratio(ref, cand)
    assert r.pairs == 5
    assert r.median == pytest.approx(0.5)
    assert (r.p25, r.p75) == (pytest.approx(0.5), pytest.approx(0.75))
    assert r.speedup == pytest.approx(2.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_paired_ratio_cancels_drift_that_biases_blocked_timing() -> None:
    """Machine slows down 3x halfway: the per-pair ratio still sees the true 0.5."""
    clock = FakeClock()
    speed = [1.0]
    log: list[str] = []

    def a() -> None:
        clock.advance(0.010 * speed[0])
        log.append("a")

    def b() -> None:
        clock.advance(0.005 * speed[0])
        log.append("b")
        if len(log) >= 50:
            speed[0] = 3.0

    samples = measure_interleaved([a, b], warmup=0, iters=50, clock=clock)
    r = paired_ratio(samples[0], samples[1])
    assert r.median == pytest.approx(0.5) and r.p25 == pytest.approx(0.5) and r.p75 == pytest.approx(0.5)


def test_interleaved_order_rotates_and_warmup_is_untimed() -> None:
    clock = FakeClock()
    log: list[str] = []
    a = model(clock, [0.002], log, "a")
    b = model(clock, [0.001], log, "b")
    samples = measure_interleaved([a, b], warmup=2, iters=3, clock=clock)
    # warm-up AB BA, then timed AB BA AB
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert samples[0] == pytest.approx([0.002] * 3)
    assert samples[1] == pytest.approx([0.001] * 3)


def test_seconds_budget_on_fake_clock() -> None:
    clock = FakeClock()
    log: list[str] = []
    calls = [model(clock, [0.01], log, "a"), model(clock, [0.03], log, "b")]
    samples = measure_interleaved(calls, warmup=0, seconds=1.0, clock=clock)
    # each repetition costs 0.04 fake seconds: the loop stops at the first check past 1.0 s
    assert len(samples[0]) == len(samples[1]) == math.ceil(1.0 / 0.04)


def test_min_iters_beats_tiny_budget_and_max_iters_caps() -> None:
    clock = FakeClock()
    log: list[str] = []
    slow = model(clock, [10.0], log, "slow")
    assert len(measure_interleaved([slow], warmup=0, seconds=0.5, clock=clock, min_iters=4)[0]) == 4
    fast = model(clock, [0.0], log, "fast")  # the fake clock never advances: only the cap stops it
    assert len(measure_interleaved([fast], warmup=0, seconds=1.0, clock=clock, max_iters=7)[0]) == 7


def test_wall_timer_syncs_around_the_call() -> None:
    clock = FakeClock()
    events: list[str] = []

    def sync() -> None:
        events.append("sync")
        clock.advance(0.5)  # waiting for queued work: before the call it is excluded, after it counted

    timer = wall_timer(clock, sync)

    def fn() -> None:
        events.append("fn")
        clock.advance(0.25)

    assert timer(fn) == pytest.approx(0.75)  # call + the synchronize that waits for it
    assert events == ["sync", "fn", "sync"]


@pytest.mark.parametrize("kwargs", [{"warmup": -1, "iters": 1}, {"warmup": 0, "iters": 0},
                                    {"warmup": 0}, {"warmup": 0, "seconds": 0.0}])
def test_measure_rejects_bad_counts(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        measure_interleaved([lambda: None], **kwargs)


def test_cuda_event_timer_brackets_the_call_and_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU needed: the CUDA path's order of operations, with torch.cuda mocked."""
    import contextlib

    import torch

    from repconv.profile import runtimes

    log: list[str] = []

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            FakeEvent.count += 1
            self.name = "start" if FakeEvent.count % 2 else "end"

        def record(self) -> None:
            log.append(f"record {self.name}")

        def synchronize(self) -> None:
            log.append(f"wait {self.name}")

        def elapsed_time(self, other: FakeEvent) -> float:
            return 2.5  # milliseconds, as torch reports them

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    timer = runtimes.cuda_event_timer(torch.device("cuda", 0))
    assert timer(lambda: log.append("launch")) == pytest.approx(0.0025)
    assert log == ["synchronize", "record start", "launch", "record end", "wait end"]
