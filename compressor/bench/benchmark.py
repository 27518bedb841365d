"""Benchmark .tflite and .onnx artifacts: latency side by side, and accuracy on data.

    report = benchmark(["model.tflite", "small.tflite"], data="val.npz")
    report.results[1].ratio_to_first   # 0.42: the second runs in 42% of the first's time

The first artifact is the reference the others are compared with. Latency is timed at
batch 1 with interleaved rounds (see `latency.py`); accuracy is top-1 over all the data,
and a metric (`compressor.metrics`, default top1) is measured on it too (`scoring.py`).

This module must not import TensorFlow or Keras: it runs on target boards where only
numpy, ai-edge-litert and onnxruntime are installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import time

import numpy as np

from compressor.bench.latency import LatencyStats, time_interleaved
from compressor.bench.memory import peak_memory_bytes
from compressor.bench.runtime import ArtifactRunner, open_artifact
from compressor.bench.scoring import check_scoring, score_artifacts, top1_classes
from compressor.errors import CompressorError, DataError, OptionError
from compressor.io.data import Dataset, Samples, Shape, Shapes, check_fits, load_data, sample_count, sample_rows
from compressor.metrics import TOP1, Metric


DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class BenchResult:
    """What was measured for one artifact.

    Attributes:
        path: The artifact, as given.
        format: "tflite" or "onnx".
        bytes: File size.
        batch: Batch size of the timed calls (1 unless the artifact has a fixed batch).
        latency_ms: Latency of one call, over the timed runs (not the first call, not warm-up).
        accuracy: Top-1 accuracy over the data, or None without class labels (also
            under metrics whose `y` is not class labels: mse, mae, hooks, agreement).
        ratio_to_first: Median latency divided by the first artifact's median.
        init_ms: Time to load it into its runtime (`ArtifactRunner.init_ms`).
        first_inference_ms: Its first call after loading, before warm-up and timed runs.
        peak_memory_bytes: Peak resident memory that loading and running it took, in a
            fresh process of its own (`compressor.bench.memory`); None when not measured.
        threads: Threads its runtime could use (0: the runtime's default).
        delegate: TFLite: "xnnpack" or "none" (LiteRT's builtin kernels only); None for ONNX.
        provider: ONNX: the execution provider it ran on; None for TFLite.
        correct: Per sample, the metric's value (`Metric.values`; top-1: whether the
            prediction was right), None without labelled data; for paired comparisons
            between artifacts, not in `to_dict`.
        metric_value: The report's metric over the data: the share right (top1, top5,
            agreement with the first artifact), the mean error (mse, mae), a hook's mean.
    """

    path: str
    format: str
    bytes: int
    batch: int
    latency_ms: LatencyStats
    accuracy: Optional[float]
    ratio_to_first: Optional[float]
    init_ms: float = 0.0
    first_inference_ms: float = 0.0
    peak_memory_bytes: Optional[int] = None
    threads: int = DEFAULT_THREADS
    delegate: Optional[str] = None
    provider: Optional[str] = None
    correct: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    metric_value: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "batch": self.batch,
            "latency_ms": self.latency_ms.to_dict(),
            "accuracy": self.accuracy,
            "ratio_to_first": self.ratio_to_first,
            **self.runtime_dict(),
            "metric_value": self.metric_value,
        }

    def runtime_dict(self) -> dict[str, Any]:
        """What else was measured and how: load, first call, peak memory, threads, delegate, provider."""
        return {
            "init_ms": self.init_ms,
            "first_inference_ms": self.first_inference_ms,
            "peak_memory_bytes": self.peak_memory_bytes,
            "threads": self.threads,
            "delegate": self.delegate,
            "provider": self.provider,
        }


@dataclass(frozen=True)
class BenchReport:
    """Results for all artifacts, in the order given, and how they were measured.

    Attributes:
        results: One per artifact; the first is the reference for the ratios.
        runs: Timed calls per artifact.
        warmup: Untimed calls per artifact before them.
        threads: Threads each runtime could use (0: the runtime's default).
        input: Where the timed inputs came from: the data source, or "generated".
        samples: Number of samples the metric was measured on (0 without labelled data;
            agreement needs no labels).
        xnnpack: Whether LiteRT could apply its XNNPACK delegate to TFLite artifacts.
        onnx_provider: The execution provider asked for ONNX artifacts (None: the default).
        metric: What `metric_value` measures: {"name", "higher_is_better", "output"}
            (output: the one read, by name; None for the artifacts' only output).
    """

    results: tuple[BenchResult, ...]
    runs: int
    warmup: int
    threads: int
    input: str
    samples: int
    xnnpack: bool = True
    onnx_provider: Optional[str] = None
    metric: dict[str, Any] = field(default_factory=lambda: metric_entry(TOP1, None))

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [result.to_dict() for result in self.results],
            "runs": self.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "input": self.input,
            "samples": self.samples,
            "xnnpack": self.xnnpack,
            "onnx_provider": self.onnx_provider,
            "metric": dict(self.metric),
        }


def metric_entry(metric: Metric, output: Optional[str]) -> dict[str, Any]:
    """The report's `metric`: the metric's name, its direction, and the output it read (None: the only one)."""
    return {"name": metric.name, "higher_is_better": metric.higher_is_better, "output": output}


def benchmark(
    paths: Sequence[str | Path],
    data: str | Path | Dataset | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = DEFAULT_THREADS,
    seed: int = 0,
    xnnpack: bool = True,
    onnx_provider: Optional[str] = None,
    memory: bool = True,
    metric: Optional[Metric] = None,
    metric_output: Optional[str] = None,
) -> BenchReport:
    """Time artifacts side by side and measure their accuracy.

    Per artifact: the time to load it (`init_ms`), its first call, then `warmup`
    untimed rounds and `runs` timed ones, interleaved; then, with `memory`, its peak
    memory in a fresh process of its own.

    Args:
        paths: .tflite and .onnx files taking the same input; the first is the reference.
        data: A data spec for `load_data` (or a loaded Dataset). Timed calls cycle
            through its samples; with labels, accuracy is measured on all of them.
            Without data, every call gets one fixed generated input.
        runs: Timed calls per artifact (>= 1).
        warmup: Untimed calls per artifact first (>= 0).
        threads: Threads per runtime (>= 0; 0 lets the runtime choose).
        seed: Seed of the generated input.
        xnnpack: Let LiteRT apply its default XNNPACK delegate to TFLite artifacts.
        onnx_provider: onnxruntime's execution provider (default CPUExecutionProvider).
        memory: Measure each artifact's peak memory (a fresh Python process each).
        metric: What `metric_value` measures (`compressor.metrics`; `scoring.py`); given,
            data without the labels it needs is refused. Default: top-1, on labelled
            data only.
        metric_output: The output the metric reads, by name (several outputs).

    Returns:
        The report, results in the order of `paths`.

    Raises:
        OptionError: An execution provider onnxruntime does not have here.
        CompressorError: Bad options; a missing, unknown or unreadable artifact;
            artifacts with different inputs.
        DataError: The data cannot be read or does not fit the artifacts or the metric.
    """
    check_options(paths, runs, warmup, threads, xnnpack, onnx_provider)
    runners = [open_artifact(path, threads, xnnpack=xnnpack, onnx_provider=onnx_provider) for path in paths]
    sample_shape = common_sample_shape(runners)
    dataset = _load(data, sample_shape, numeric=metric is not None and metric.labels != "classes")
    # Refused before minutes of timing; scored after it, so that the first call is the first.
    check_scoring(runners, dataset, metric or TOP1, metric_output, required=metric is not None)
    if dataset is None:
        sample = None
        inputs = [_batches(r, generated_input(sample_shape, r, seed)) for r in runners]
    else:
        # Only as many samples as there are calls: a large dataset need not be copied.
        sample = sample_rows(dataset.x, slice(0, min(len(dataset), warmup + runs)))
        inputs = [_batches(r, sample) for r in runners]
    calls = [_call(runner, batches) for runner, batches in zip(runners, inputs)]
    first_ms = [_first_call_ms(call) for call in calls]
    samples_ns = time_interleaved(calls, runs, warmup)
    peaks = [
        peak_memory_bytes(r.path, batches[0], threads, xnnpack, onnx_provider) if memory else None
        for r, batches in zip(runners, inputs)
    ]
    output, scores = score_artifacts(runners, dataset, metric or TOP1, metric_output, required=metric is not None)
    stats = [LatencyStats.from_ns(ns) for ns in samples_ns]
    results = tuple(
        BenchResult(
            path=str(path),
            format=runner.format,
            bytes=runner.path.stat().st_size,
            batch=sample_count(batches[0]),
            latency_ms=stat,
            accuracy=score.accuracy,
            ratio_to_first=_ratio(stat.median, stats[0].median),
            init_ms=runner.init_ms,
            first_inference_ms=first,
            peak_memory_bytes=peak,
            threads=threads,
            delegate=runner.delegate,
            provider=runner.provider,
            correct=score.values,
            metric_value=score.metric_value,
        )
        for path, runner, batches, stat, score, first, peak in zip(
            paths, runners, inputs, stats, scores, first_ms, peaks
        )
    )
    return BenchReport(
        results=results,
        runs=runs,
        warmup=warmup,
        threads=threads,
        input="generated" if dataset is None else dataset.source,
        samples=0 if scores[0].values is None else len(scores[0].values),
        xnnpack=xnnpack,
        onnx_provider=onnx_provider,
        metric=metric_entry(metric or TOP1, output),
    )


def common_sample_shape(runners: Sequence[ArtifactRunner]) -> Shapes:
    """The per-sample input shape all artifacts accept (None where all are free); one per input name for several.

    Raises:
        CompressorError: Two artifacts take inputs of different shapes or names.
    """
    shapes = _sample_shapes(runners[0])
    for runner in runners[1:]:
        other = _sample_shapes(runner)
        if set(other) != set(shapes):
            raise CompressorError(
                f"artifacts take different inputs: {runners[0].path.name} takes {', '.join(shapes)} but "
                f"{runner.path.name} takes {', '.join(other)}; benchmark artifacts of the same model together"
            )
        for name, shape in list(shapes.items()):
            theirs = other[name]
            if len(theirs) != len(shape) or any(
                a is not None and b is not None and a != b for a, b in zip(shape, theirs)
            ):
                raise CompressorError(
                    f"artifacts take different inputs: {runners[0].path.name} expects "
                    f"{_show(shape)} per sample but {runner.path.name} expects {_show(theirs)}; "
                    "benchmark artifacts of the same model together"
                )
            shapes[name] = tuple(a if a is not None else b for a, b in zip(shape, theirs))
    return shapes if runners[0].multi_input else next(iter(shapes.values()))


def _sample_shapes(runner: ArtifactRunner) -> dict[str, Shape]:
    if not runner.multi_input:
        return {"": tuple(runner.input_shape[1:])}
    return {info.name: tuple(info.shape[1:]) for info in runner.inputs}


def generated_input(shape: Shapes, runner: ArtifactRunner, seed: int = 0) -> Samples:
    """One fixed, realistic sample (batch of 1) for timing without data: one array per input for several.

    Float inputs get standard-normal values, like normalized images or features:
    zeros or tiny values would take fast paths, and random garbage can produce
    denormal floats that run ten times slower than real inputs.

    Raises:
        CompressorError: The input has a free dimension, so no shape can be made up.
    """
    if isinstance(shape, dict):
        dtypes = {info.name: info.dtype for info in runner.inputs}
        return {name: _generated(one, dtypes[name], runner, seed + k) for k, (name, one) in enumerate(shape.items())}
    return _generated(shape, runner.input_dtype, runner, seed)


def _generated(shape: Shape, dtype: np.dtype, runner: ArtifactRunner, seed: int) -> np.ndarray:
    if any(d is None for d in shape):
        raise CompressorError.naming(
            "{name} takes inputs of shape {shape} with free dimensions; give data ({data}) so that the timed "
            "inputs have a real shape", name=runner.path.name, shape=_show(shape),
        )
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=(1, *shape), dtype=dtype)
    return rng.standard_normal((1, *shape)).astype(dtype)


def top1_accuracy(runner: ArtifactRunner, data: Dataset) -> float:
    """Share of samples whose highest output is the label (`top1_correct`)."""
    return float(np.mean(top1_correct(runner, data)))


def top1_correct(runner: ArtifactRunner, data: Dataset) -> np.ndarray:
    """Per sample, whether its highest output is the label.

    A single output column is read as a sigmoid probability, thresholded at 0.5
    (like Keras' binary accuracy).

    Raises:
        DataError: The data has no labels, or labels the outputs cannot express.
    """
    if data.y is None:
        raise DataError(f"data from {data.source} has no labels; accuracy needs labels (y)")
    if len(data) == 0:
        raise DataError(f"data from {data.source} has no samples")
    outputs = runner.predict(data.x, output=data.output).reshape(len(data), -1)
    classes = max(outputs.shape[1], 2)
    if int(data.y.max()) >= classes:
        raise DataError(
            f"data from {data.source} has labels up to {int(data.y.max())}, but "
            f"{runner.path.name} outputs {outputs.shape[1]} class scores"
        )
    return top1_classes(outputs) == data.y


def check_options(
    paths: Sequence[Any], runs: int, warmup: int, threads: int, xnnpack: bool = True, onnx_provider: Any = None
) -> None:
    """Check the options of `benchmark` before any artifact is loaded.

    Raises:
        CompressorError: No artifacts, or a count out of range.
    """
    if isinstance(paths, (str, Path)) or len(paths) == 0:
        raise CompressorError(
            f"expected a list of one or more .tflite/.onnx artifacts. Received: paths={paths!r}"
        )
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0), ("threads", threads, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise CompressorError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")
    if not isinstance(xnnpack, (bool, np.bool_)):
        raise CompressorError(f"xnnpack must be True or False. Received: xnnpack={xnnpack!r}")
    if onnx_provider is not None and (not isinstance(onnx_provider, str) or not onnx_provider.strip()):
        raise OptionError("{onnx_provider} must name an onnxruntime execution provider, e.g. CPUExecutionProvider. "
                          "Received: {value!r}", value=onnx_provider)


def _load(data: str | Path | Dataset | None, sample_shape: Shapes, numeric: bool = False) -> Optional[Dataset]:
    if data is None:
        return None
    dataset = data if isinstance(data, Dataset) else load_data(data, input_shape=sample_shape, numeric=numeric)
    check_fits(dataset, sample_shape)
    if len(dataset) == 0:
        raise DataError(f"data from {dataset.source} has no samples")
    return dataset


def _batches(runner: ArtifactRunner, samples: Samples) -> list[Samples]:
    """Prepared inputs, one per sample, each with the batch the artifact runs (a dict per sample for several inputs)."""
    batch = runner.fixed_batch or 1
    prepared = runner.prepare(samples)
    # An artifact converted with a fixed batch > 1 only accepts that batch: repeat
    # the sample to fill it, and report the batch next to the latency.
    if isinstance(prepared, dict):
        return [{name: np.repeat(values[i : i + 1], batch, axis=0) for name, values in prepared.items()}
                for i in range(sample_count(prepared))]
    return [np.repeat(prepared[i : i + 1], batch, axis=0) for i in range(len(prepared))]


def _call(runner: ArtifactRunner, batches: list[np.ndarray]):
    def call(round_index: int) -> object:
        return runner.invoke(batches[round_index % len(batches)])

    return call


def _first_call_ms(call) -> float:
    """The first inference after loading (round 0's input), apart from warm-up and timed runs."""
    start = time.perf_counter_ns()
    call(0)
    return (time.perf_counter_ns() - start) / 1e6


def _ratio(median: float, reference: float) -> Optional[float]:
    return median / reference if reference > 0 else None


def _show(shape: Shape) -> tuple:
    return tuple("?" if d is None else d for d in shape)
