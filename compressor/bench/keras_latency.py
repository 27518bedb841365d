"""Time Keras models as the TFLite files `compress` would write for them.

A decision that rests on speed (are the gates worth their cost?) is taken on the
artifact, not on the Keras model: both models are converted as `compress` exports
them, into a temporary folder, and timed interleaved in one run
(`compressor.bench.benchmark`), so the machine's drift hits both alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import numpy as np

from compressor.bench.benchmark import benchmark
from compressor.io.data import Dataset


def tflite_latency(
    static: keras.Model, gated: keras.Model, x: np.ndarray, runs: int = 200, threads: int = 1, seed: int = 0
) -> tuple[float, float]:
    """Mean TFLite latency per input (ms) of two models, timed interleaved over `x`.

    Each timed call takes the next input of `x`, so a gated model's mean is its
    expected latency over those inputs.

    Args:
        static: The first model (the one without gates).
        gated: The second model.
        x: Inputs, batch first.
        runs: Timed calls per model.
        threads: Interpreter threads.
        seed: Seeds the order of the inputs.

    Returns:
        (mean ms of `static`, mean ms of `gated`).

    Raises:
        ExportError: A model does not convert to TFLite.
    """
    static_ms, gated_ms = tflite_latencies([static, gated], x, runs=runs, threads=threads, seed=seed)
    return static_ms, gated_ms


def tflite_latencies(models: list[keras.Model], x: np.ndarray, runs: int = 200, threads: int = 1,
                     seed: int = 0) -> list[float]:
    """Mean TFLite latency per input (ms) of each model, timed interleaved over `x` (as `tflite_latency`).

    Raises:
        ExportError: A model does not convert to TFLite.
    """
    from compressor.export.writers import export_tflite

    with tempfile.TemporaryDirectory(prefix="compressor-dynamic-") as folder:
        paths = [export_tflite(model, Path(folder) / f"model{i}.tflite") for i, model in enumerate(models)]
        data = Dataset(x, None, "search data")
        report = benchmark(paths, data=data, runs=runs, warmup=10, threads=threads, seed=seed, memory=False)
    return [result.latency_ms.mean for result in report.results]
