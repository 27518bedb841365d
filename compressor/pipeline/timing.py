"""The timing stage: time and score each artifact against the original's artifact of the same format.

Each runtime format is timed in one interleaved run (the original's artifact first, then
the model before gates if any, then ours), so ratios stay fair on a noisy machine, and
scored on the labelled held-out data; the Keras artifact is scored in Keras. Each one's
load time, first call and peak memory (in a fresh process) come with its latency. Each
artifact's drop against the original's artifact is measured paired on the same samples,
with its confidence interval (`drop_ci`, one-sided bounds at the run's confidence).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.export import runtime_formats
from compressor.pipeline.records import Exported

if TYPE_CHECKING:
    from compressor.bench.benchmark import BenchReport
    from compressor.config import CompressOptions
    from compressor.export.verify import ArtifactCheck
    from compressor.io.data import Dataset


def time_artifacts(ctx: RunContext, run: Run, exported: Exported) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Time and score the exported artifacts.

    Returns:
        The report's entry of each of our artifacts, and the measurements of the model
        before gates as TFLite (or None).
    """
    options, held_out = ctx.options, ctx.data.held_out
    runtime = runtime_formats(options.export)
    labelled = held_out if held_out is not None and held_out.y is not None else None
    entries = [artifact_entry(check) for check in exported.checks]
    extra = {"tflite": exported.static} if exported.static is not None else {}
    static_entry = None
    for done, fmt in enumerate(runtime):
        ctx.progress("timing artifacts", done, len(runtime))
        mine = [entry for entry in entries if entry["format"] == fmt]
        others = [extra[fmt].path] if fmt in extra else []
        baseline = exported.baselines[fmt]
        bench = benchmark_against(baseline.path, others + [entry["path"] for entry in mine], labelled, options)
        original, *ours = bench.results
        if others:
            static_result, *ours = ours
            static_entry = {**static_result.to_dict(), "max_abs_diff": extra[fmt].max_abs_diff}
        for entry, result in zip(mine, ours):
            entry.update(
                accuracy=result.accuracy,
                drop_ci=drop_interval(original.correct, result.correct, options.confidence),
                baseline_accuracy=original.accuracy,
                latency_ms=result.latency_ms.to_dict(),
                baseline_latency_ms=original.latency_ms.to_dict(),
                latency_ratio=result.ratio_to_first,
                baseline_path=baseline.path,
                baseline_bytes=baseline.bytes,
                **result.runtime_dict(),
                baseline_peak_memory_bytes=original.peak_memory_bytes,
            )
    if runtime:
        ctx.progress("timing artifacts", len(runtime), len(runtime))
    if labelled is not None:
        from compressor.search.evaluate import correct_predictions

        for entry in entries:
            if entry["format"] == "keras":
                ours, original = correct_predictions(run.compressed, labelled), correct_predictions(ctx.model, labelled)
                entry.update(accuracy=float(ours.mean()), baseline_accuracy=float(original.mean()),
                             drop_ci=drop_interval(original, ours, options.confidence))
    return entries, static_entry


def drop_interval(original: Optional[np.ndarray], ours: Optional[np.ndarray], confidence: float) -> Optional[list[float]]:
    """[lower, upper] bounds of the paired drop from per-sample correctness (None without labels)."""
    if original is None or ours is None:
        return None
    from compressor.search.confidence import paired_drop

    measured = paired_drop(original, ours, confidence)
    return [measured.lower, measured.upper]


def benchmark_against(original: str, artifacts: list[str], data: Optional[Dataset], options: CompressOptions) -> BenchReport:
    """Time the original's artifact and ours in one interleaved run (ratios stay fair on a noisy machine)."""
    from compressor.bench.benchmark import benchmark

    return benchmark([original, *artifacts], data=data, runs=options.runs, warmup=options.warmup,
                     threads=options.threads, seed=options.seed)


def artifact_entry(check: ArtifactCheck) -> dict[str, Any]:
    """An artifact's entry in the report, before it is timed."""
    return {
        "format": check.format,
        "quantize": check.quantize,
        "path": check.path,
        "bytes": check.bytes,
        "accuracy": None,
        "max_abs_diff": check.max_abs_diff,
        "top1_agreement": check.top1_agreement,
        "latency_ms": None,
        "baseline_latency_ms": None,
    }
