"""Time several artifacts side by side: warm-up, then interleaved rounds.

On a shared, noisy machine the speed of the CPU drifts during a run (other jobs,
frequency scaling, thermal limits). Timing artifact A for 100 runs and then artifact
B for 100 runs lets that drift show up as a difference between A and B. Here every
round times each artifact once, in an order that rotates from round to round, so
drift spreads evenly over all of them and their ratio stays fair.

Numpy only: this runs on target boards without TensorFlow.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

Call = Callable[[int], object]
"""One timed call: receives the round number (to pick its input) and runs the model."""


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one artifact over the timed runs, in milliseconds.

    Attributes:
        median: Median run.
        p90: 90th percentile (linear interpolation between runs).
        min: Fastest run.
        max: Slowest run.
        mean: Mean run: with inputs that take different paths (a gated model skips
            blocks for some inputs), the expected latency per input.
        std: Standard deviation of the runs (over all of them, as LiteRT's
            benchmark_model reports it: the root of the mean squared deviation).
        p5: 5th percentile (linear interpolation, as p90).
        p95: 95th percentile (linear interpolation, as p90).
    """

    median: float
    p90: float
    min: float
    max: float
    mean: float
    std: float
    p5: float
    p95: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int]) -> "LatencyStats":
        """Summarize run times given in nanoseconds."""
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if ms.size == 0:
            raise ValueError("no timed runs to summarize")
        p5, p90, p95 = (float(value) for value in np.percentile(ms, [5, 90, 95]))
        return cls(
            median=float(np.median(ms)),
            p90=p90,
            min=float(ms.min()),
            max=float(ms.max()),
            mean=float(ms.mean()),
            std=float(ms.std()),
            p5=p5,
            p95=p95,
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def rotated_order(count: int, round_index: int) -> list[int]:
    """Order of the artifacts in one round: each one goes first equally often."""
    start = round_index % count
    return list(range(start, count)) + list(range(start))


def time_interleaved(calls: Sequence[Call], runs: int, warmup: int) -> list[np.ndarray]:
    """Time each call `runs` times, one call of each per round, after warm-up rounds.

    Args:
        calls: One callable per artifact; it gets the round number and runs one inference.
        runs: Timed rounds (>= 1).
        warmup: Untimed rounds first (>= 0), for lazy allocation, caches and
            the runtimes' first-run work.

    Returns:
        Per call, the `runs` durations in nanoseconds (int64).
    """
    count = len(calls)
    for round_index in range(warmup):
        for i in rotated_order(count, round_index):
            calls[i](round_index)
    samples = np.zeros((count, runs), dtype=np.int64)
    # A collection in the middle of a call would be charged to whichever artifact
    # was running; timeit turns the collector off for the same reason.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for run in range(runs):
            round_index = warmup + run
            for i in rotated_order(count, round_index):
                start = time.perf_counter_ns()
                calls[i](round_index)
                samples[i, run] = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return list(samples)
