"""The measurement core: interleaved timing loop and the statistics reported for it.

Standard library only (and Python 3.9 compatible), on purpose: :func:`repconv.profile.bundle.write_bundle`
ships this file verbatim (as ``repconv_stats.py``) beside the bundle's standalone benchmark, so numbers
measured on a target device are computed exactly as the local ones.

Why interleave: on a real machine the speed drifts (turbo, thermal state, other processes). Timing
variant A for ten seconds and then variant B lets that drift land on one side only. Here every
repetition runs each variant once, rotating the order, so drift hits all variants alike, and each
repetition yields one *pair* of samples whose ratio is free of slow drift; the spread of those
per-pair ratios is the honest uncertainty of "fused is X times faster".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

Clock = Callable[[], float]
# A timer runs the callable once and returns its duration in seconds (wall clock, or CUDA events).
Timer = Callable[[Callable[[], object]], float]

# Scale turning a median absolute deviation into a standard deviation for normally distributed data.
MAD_TO_SIGMA = 1.4826


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass(frozen=True)
class Stats:
    """Summary of latency samples, in milliseconds."""

    samples: int
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float  # sample standard deviation (n - 1)
    iqr_ms: float  # p75 - p25
    mad_ms: float  # median absolute deviation from the median (robust spread)

    @property
    def robust_sigma_ms(self) -> float:
        """A standard-deviation-like spread that a few outliers cannot inflate."""
        return MAD_TO_SIGMA * self.mad_ms

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(seconds: Sequence[float]) -> Stats:
    """Statistics of per-call durations given in seconds."""
    if not seconds:
        raise ValueError("no samples to summarize")
    ms = [s * 1e3 for s in seconds]
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / (n - 1)) if n > 1 else 0.0
    med = median(ms)
    return Stats(
        samples=n,
        median_ms=med,
        mean_ms=mean,
        min_ms=min(ms),
        max_ms=max(ms),
        p90_ms=percentile(ms, 90.0),
        p99_ms=percentile(ms, 99.0),
        std_ms=std,
        iqr_ms=percentile(ms, 75.0) - percentile(ms, 25.0),
        mad_ms=median([abs(v - med) for v in ms]),
    )


@dataclass(frozen=True)
class RatioStats:
    """Per-pair ratio candidate/reference over interleaved repetitions (< 1: candidate is faster)."""

    pairs: int
    median: float
    p25: float
    p75: float

    @property
    def speedup(self) -> float:
        return 1.0 / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict[str, float | int]:
        return {"pairs": self.pairs, "ratio_median": self.median, "ratio_p25": self.p25,
                "ratio_p75": self.p75, "speedup": self.speedup}


def paired_ratio(reference: Sequence[float], candidate: Sequence[float]) -> RatioStats:
    """Ratio of samples taken in the same repetition: candidate[i] / reference[i]."""
    if len(reference) != len(candidate):
        raise ValueError(f"unpaired samples: {len(reference)} reference vs {len(candidate)} candidate")
    # No zip(strict=...): this file also runs on the device's Python, which may be 3.9.
    ratios = [c / r for r, c in zip(reference, candidate) if r > 0]  # noqa: B905
    if not ratios:
        raise ValueError("no usable pairs (all reference samples are zero)")
    return RatioStats(pairs=len(ratios), median=median(ratios), p25=percentile(ratios, 25.0),
                      p75=percentile(ratios, 75.0))


def wall_timer(clock: Clock = time.perf_counter, sync: Callable[[], object] | None = None) -> Timer:
    """Timer reading ``clock`` around one call; ``sync`` (if given) drains asynchronous work first and after."""

    def timer(fn: Callable[[], object]) -> float:
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - t0

    return timer


def measure_interleaved(
    calls: Sequence[Callable[[], object]],
    *,
    warmup: int,
    iters: int | None = None,
    seconds: float | None = None,
    timer: Timer | None = None,
    clock: Clock = time.perf_counter,
    min_iters: int = 5,
    max_iters: int = 100_000,
) -> list[list[float]]:
    """Time each call once per repetition, rotating the order; return per-call durations (seconds).

    Exactly ``iters`` repetitions if given, otherwise repeat until ``seconds`` of ``clock`` time have
    passed (at least ``min_iters``, at most ``max_iters`` repetitions). ``warmup`` untimed
    repetitions come first, interleaved the same way.
    """
    if not calls:
        raise ValueError("nothing to measure")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters is not None and iters <= 0:
        raise ValueError(f"iters must be positive, got {iters}")
    if iters is None and (seconds is None or seconds <= 0):
        raise ValueError("give a positive iters or seconds")
    timer = timer or wall_timer(clock)
    k = len(calls)
    for r in range(warmup):
        for j in range(k):
            calls[(j + r) % k]()
    samples: list[list[float]] = [[] for _ in calls]
    start = clock()
    r = 0
    while True:
        if iters is not None:
            if r >= iters:
                break
        elif r >= max_iters or (r >= min_iters and clock() - start >= seconds):  # type: ignore[operator]
            break
        # Rotating start position: with two variants the orders alternate AB, BA, AB, ... so neither
        # always runs with the other's caches/frequency state behind it.
        for j in range(k):
            i = (j + r) % k
            samples[i].append(timer(calls[i]))
        r += 1
    return samples
