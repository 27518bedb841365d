"""`compressor.benchmark`: time artifacts side by side (interleaved) and measure their accuracy, as `compressor bench` does.

    run = compressor.benchmark(["build/baseline/model.tflite", "build/model.tflite"], data="val.npz")
    run.report["results"][1]["ratio_to_first"]     # 0.42: the second takes 42% of the first's time
    run = compressor.benchmark(paths, data="val.npz", metric="mse", metric_output="score")
    run.report["results"][1]["metric_value"]       # its mean squared error on output "score"

Runs without TensorFlow (numpy, ai-edge-litert, onnxruntime), here or on a board reached by
a command (`remote="ssh user@board"`). With a `baseline` (an earlier report), `run.passed`
says whether every median stayed within `max_regression` of it.

(`compressor.bench` is the package of the runtimes, so the call has a name of its own.)
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from compressor.api.inputs import as_dataset, is_path
from compressor.errors import OptionError

if TYPE_CHECKING:
    from compressor.bench.gate import GateResult
    from compressor.metrics import Metric


@dataclass(frozen=True)
class BenchRun:
    """One timing run.

    Attributes:
        report: What `compressor bench --json` prints: "results" per artifact (latency_ms,
            accuracy, metric_value, ratio_to_first, ...), how it was measured ("metric":
            {"name", "higher_is_better", "output"}), "host", and "gate" when compared with
            a baseline.
        gate: The comparison with the baseline (`compressor.bench.gate.GateResult`), or None.
    """

    report: Mapping[str, Any]
    gate: Optional[GateResult] = None

    @property
    def passed(self) -> bool:
        """False when a median got slower than the baseline allows (True without a baseline)."""
        return self.gate is None or self.gate.passed


def check_bench(data: Any, remote: Optional[str], remote_python: Optional[str], remote_timeout: Optional[float],
                baseline: Any, max_regression: float, metric: Optional[str] = None,
                metric_higher_is_better: Optional[bool] = None) -> Optional[dict]:
    """Refuse, before any timing, a request that cannot work; return the baseline report (None without one).

    Raises:
        OptionError: Remote settings without `remote`; a metric that is unknown, has no
            data to be measured on, is a hook through `remote`, or has a direction it
            must not have (built-in) or lacks (hook).
        CompressorError: A bad `max_regression`, a missing data path, or a baseline
            that is not a report with median latencies.
    """
    from compressor.bench.gate import check_max_regression, load_report, medians

    check_max_regression(max_regression)
    bench_metric(metric, metric_higher_is_better, data, remote)
    if is_path(data):
        from compressor.io.data import check_data_spec

        check_data_spec(data, "data")
    if remote is None and (remote_python is not None or remote_timeout is not None):
        raise OptionError("{remote_python} and {remote_timeout} apply only with {remote}")
    if baseline is None or not is_path(baseline):
        if baseline is not None:
            medians(baseline, "baseline")
        return baseline
    return load_report(baseline)


def benchmark(
    artifacts: Sequence[str | Path],
    data: Any = None,
    *,
    runs: int = 100,
    warmup: int = 10,
    threads: int = 1,
    xnnpack: bool = True,
    onnx_provider: Optional[str] = None,
    remote: Optional[str] = None,
    remote_python: Optional[str] = None,
    remote_timeout: Optional[float] = None,
    baseline: Any = None,
    max_regression: float = 0.10,
    metric: Optional[str] = None,
    metric_output: Optional[str] = None,
    metric_higher_is_better: Optional[bool] = None,
) -> BenchRun:
    """Time .tflite/.onnx artifacts at batch 1 in interleaved rounds, and measure top-1 accuracy (or `metric`) on `data`.

    Per artifact the report also has its load time (`init_ms`), its first call
    (`first_inference_ms`), its peak memory in a fresh process (`peak_memory_bytes`),
    and the threads, delegate (TFLite) or execution provider (ONNX) it ran with.

    Args:
        artifacts: Artifacts of the same model; the first is the reference of the ratios.
        data: Inputs to time on (and labels to measure accuracy with): a path, a hook,
            (x, y) arrays, x alone or a tf.data.Dataset; None times one generated input.
        runs: Timed calls per artifact.
        warmup: Untimed calls per artifact before them.
        threads: Threads per runtime (0: the runtime's default).
        xnnpack: Let LiteRT apply its default XNNPACK delegate to TFLite artifacts
            (False: its builtin kernels alone).
        onnx_provider: onnxruntime's execution provider for ONNX artifacts (default
            CPUExecutionProvider); one that onnxruntime lacks is an OptionError.
        remote: Time on another machine, through this command (e.g. "ssh user@board").
        remote_python: The Python to run there (default python3).
        remote_timeout: Seconds to wait for the remote run (default: no limit).
        baseline: An earlier report (a path, or the dict) to compare medians with.
        max_regression: Allowed slow-down against `baseline`, a fraction of its median.
        metric: What else to measure on `data`, per artifact as `metric_value`: "top1"
            (the share right), "top5", "mse" or "mae" (the mean error against the
            targets in `y`), "agreement" (the share of samples whose top-1 class is the
            FIRST artifact's; no labels needed) or a "pkg.module:function(y_true, y_pred)
            -> float" hook (its mean over the samples; not through `remote`). Default:
            top-1 on labelled data, and unlabelled data is not scored.
        metric_output: The output the metric reads, by name, for artifacts with several
            (required for mse, mae and hooks; class metrics default to the first output
            with class scores).
        metric_higher_is_better: A hook's direction (required for a hook, refused for
            a built-in metric); recorded in the report's "metric".

    Returns:
        The report, and the comparison with the baseline.

    Raises:
        OptionError, CompressorError: Bad options, artifacts, data or baseline; a failed remote run.
    """
    previous = check_bench(data, remote, remote_python, remote_timeout, baseline, max_regression, metric,
                           metric_higher_is_better)
    measured = bench_metric(metric, metric_higher_is_better, data, remote)
    numeric = measured is not None and measured.labels != "classes"
    dataset = as_dataset("data", data, numeric=numeric) if data is not None and not is_path(data) else data
    options = dict(data=dataset, runs=runs, warmup=warmup, threads=threads, xnnpack=xnnpack,
                   onnx_provider=onnx_provider, metric_output=metric_output)
    report = _measure(artifacts, options, measured, dict(prefix=remote, timeout=remote_timeout, python=remote_python))
    gate = None
    if previous is not None:
        from compressor.bench.gate import compare_latency

        gate = compare_latency(report, previous, max_regression)
        report["gate"] = gate.to_dict()
    return BenchRun(report, gate)


def bench_metric(metric: Optional[str], higher_is_better: Optional[bool], data: Any,
                 remote: Optional[str]) -> Optional[Metric]:
    """The metric asked for (a hook is imported here), or None for the default (top-1 on labelled data).

    Raises:
        OptionError: See `check_bench`.
    """
    from compressor.metrics import BUILTIN, resolve_metric

    if metric is None and higher_is_better is None:
        return None
    name = "top1" if metric is None else metric
    if remote is not None and isinstance(name, str) and name.strip().lower() not in BUILTIN:
        raise OptionError("a remote bench measures {known}: metric {name} is a function of a module the board does "
                          "not have (measure it without {remote})", known=", ".join(BUILTIN), name=name)
    resolved = resolve_metric(name, higher_is_better)
    if data is None:
        raise OptionError("metric {name} is measured on data: give {data}", name=resolved.name)
    return resolved


def _measure(artifacts: Sequence[str | Path], options: dict[str, Any], metric: Optional[Metric],
             remote: dict[str, Any]) -> dict[str, Any]:
    """The report as a dict, timed here or on the remote machine."""
    if remote["prefix"] is not None:
        from compressor.bench.remote import bench_remote

        settings = {key: value for key, value in remote.items() if value is not None or key == "timeout"}
        return bench_remote(artifacts, **settings, **options, metric=None if metric is None else metric.name)
    from compressor.bench.benchmark import benchmark as bench_here

    report = bench_here(artifacts, **options, metric=metric).to_dict()
    report["host"] = {"machine": platform.machine(), "name": platform.node()}
    return report
