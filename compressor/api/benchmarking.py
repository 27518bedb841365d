"""`compressor.benchmark`: time artifacts side by side (interleaved) and measure their accuracy, as `compressor bench` does.

    run = compressor.benchmark(["build/baseline/model.tflite", "build/model.tflite"], data="val.npz")
    run.report["results"][1]["ratio_to_first"]     # 0.42: the second takes 42% of the first's time

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


@dataclass(frozen=True)
class BenchRun:
    """One timing run.

    Attributes:
        report: What `compressor bench --json` prints: "results" per artifact (latency_ms,
            accuracy, ratio_to_first, ...), how it was measured, "host", and "gate"
            when compared with a baseline.
        gate: The comparison with the baseline (`compressor.bench.gate.GateResult`), or None.
    """

    report: Mapping[str, Any]
    gate: Optional[GateResult] = None

    @property
    def passed(self) -> bool:
        """False when a median got slower than the baseline allows (True without a baseline)."""
        return self.gate is None or self.gate.passed


def check_bench(data: Any, remote: Optional[str], remote_python: Optional[str], remote_timeout: Optional[float],
                baseline: Any, max_regression: float) -> Optional[dict]:
    """Refuse, before any timing, a request that cannot work; return the baseline report (None without one).

    Raises:
        OptionError: Remote settings without `remote`.
        CompressorError: A bad `max_regression`, a missing data path, or a baseline
            that is not a report with median latencies.
    """
    from compressor.bench.gate import check_max_regression, load_report, medians

    check_max_regression(max_regression)
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
) -> BenchRun:
    """Time .tflite/.onnx artifacts at batch 1 in interleaved rounds, and measure top-1 accuracy on `data`.

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

    Returns:
        The report, and the comparison with the baseline.

    Raises:
        OptionError, CompressorError: Bad options, artifacts, data or baseline; a failed remote run.
    """
    previous = check_bench(data, remote, remote_python, remote_timeout, baseline, max_regression)
    dataset = as_dataset("data", data) if data is not None and not is_path(data) else data
    report = _measure(artifacts, dict(data=dataset, runs=runs, warmup=warmup, threads=threads, xnnpack=xnnpack,
                                      onnx_provider=onnx_provider),
                      dict(prefix=remote, timeout=remote_timeout, python=remote_python))
    gate = None
    if previous is not None:
        from compressor.bench.gate import compare_latency

        gate = compare_latency(report, previous, max_regression)
        report["gate"] = gate.to_dict()
    return BenchRun(report, gate)


def _measure(artifacts: Sequence[str | Path], options: dict[str, Any], remote: dict[str, Any]) -> dict[str, Any]:
    """The report as a dict, timed here or on the remote machine."""
    if remote["prefix"] is not None:
        from compressor.bench.remote import bench_remote

        settings = {key: value for key, value in remote.items() if value is not None or key == "timeout"}
        return bench_remote(artifacts, **settings, **options)
    from compressor.bench.benchmark import benchmark as bench_here

    report = bench_here(artifacts, **options).to_dict()
    report["host"] = {"machine": platform.machine(), "name": platform.node()}
    return report
