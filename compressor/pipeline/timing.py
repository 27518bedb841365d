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
    from compressor.metrics import Metric


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
        bench = benchmark_against(baseline.path, others + [entry["path"] for entry in mine], labelled, options, ctx.metric)
        original, *ours = bench.results
        if others:
            static_result, *ours = ours
            static_entry = {**static_result.to_dict(), "max_abs_diff": extra[fmt].max_abs_diff}
        for entry, result in zip(mine, ours):
            scores = scored(ctx, original.correct, result.correct)  # keys in the order reports have always had
            entry.update(
                accuracy=scores.pop("accuracy"),
                drop_ci=scores.pop("drop_ci"),
                baseline_accuracy=scores.pop("baseline_accuracy", original.accuracy),
                latency_ms=result.latency_ms.to_dict(),
                baseline_latency_ms=original.latency_ms.to_dict(),
                latency_ratio=result.ratio_to_first,
                mean_latency_ratio=result.latency_ms.mean / original.latency_ms.mean,
                baseline_path=baseline.path,
                baseline_bytes=baseline.bytes,
                **result.runtime_dict(),
                baseline_peak_memory_bytes=original.peak_memory_bytes,
                **scores,
            )
    if runtime:
        ctx.progress("timing artifacts", len(runtime), len(runtime))
    if labelled is not None:
        from compressor.search.evaluate import sample_values

        for entry in entries:
            if entry["format"] == "keras":
                ours, original = sample_values(run.compressed, labelled, ctx.metric), sample_values(ctx.model, labelled, ctx.metric)
                scores = scored(ctx, original, ours)
                entry.update(accuracy=scores.pop("accuracy"), baseline_accuracy=scores.pop("baseline_accuracy", float(original.mean())),
                             drop_ci=scores.pop("drop_ci"), **scores)
    return entries, static_entry


def scored(ctx: RunContext, original: Optional[np.ndarray], ours: Optional[np.ndarray]) -> dict[str, Any]:
    """An artifact's accuracy and drop interval from per-sample values (the original's first).

    Top-1: accuracy (share right) and `drop_ci`. Another metric: `accuracy` and
    `baseline_accuracy` are mean scores in the budget's unit (`Metric.scores`, the
    original's value as reference), with the metric's own values beside them
    (`metric_value`, `baseline_metric_value`).
    """
    confidence, metric = ctx.options.confidence, ctx.metric
    if original is None or ours is None:
        return {"accuracy": None, "drop_ci": None}
    if metric.name == "top1":
        return {"accuracy": float(np.mean(ours)), "drop_ci": drop_interval(original, ours, confidence)}
    from compressor.search.confidence import paired_difference, paired_drop

    reference = float(np.mean(original))
    base, mine = metric.scores(original, reference), metric.scores(ours, reference)
    measured = paired_drop(base, mine, confidence) if metric.binary else paired_difference(base, mine, confidence)
    return {"accuracy": float(np.mean(mine)), "baseline_accuracy": float(np.mean(base)),
            "drop_ci": [measured.lower, measured.upper],
            "metric_value": float(np.mean(ours)), "baseline_metric_value": reference}


def drop_interval(original: Optional[np.ndarray], ours: Optional[np.ndarray], confidence: float) -> Optional[list[float]]:
    """[lower, upper] bounds of the paired drop from per-sample correctness (None without labels)."""
    if original is None or ours is None:
        return None
    from compressor.search.confidence import paired_drop

    measured = paired_drop(original, ours, confidence)
    return [measured.lower, measured.upper]


def benchmark_against(original: str, artifacts: list[str], data: Optional[Dataset], options: CompressOptions,
                      metric: Optional[Metric] = None) -> BenchReport:
    """Time the original's artifact and ours in one interleaved run (ratios stay fair on a noisy machine)."""
    from compressor.bench.benchmark import benchmark
    from compressor.metrics import TOP1

    # Under agreement the data is labelled with the Keras original's classes: top-1 against
    # them is the agreement (the bench's own agreement would be with the original's artifact).
    if metric is not None and metric.name == "agreement":
        metric = TOP1
    return benchmark([original, *artifacts], data=data, runs=options.runs, warmup=options.warmup,
                     threads=options.threads, seed=options.seed, metric=metric)


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
