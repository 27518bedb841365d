"""report.json's "early_exit": what the exits do, measured, and the early-exit TFLite file against the static one.

Present when the run asked for early exits (or replayed a plan with them):

- applied: whether exits were kept; when not, `reason` (and the search's
  `latency_check`, when the exits were timed before being dropped).
- exits: per kept exit, its point (the layer it follows), threshold, the share of the
  held-out inputs it answered, their accuracy, and the FLOPs an input answered there runs;
  `final` the same for the inputs that ran the whole network.
- flops_per_input: mean and percentiles over the held-out inputs; `expected_flops_fraction`
  the mean as a fraction of the static model's FLOPs.
- tflite: the early-exit TFLite file's mean per-input latency against the static model's,
  timed interleaved on the held-out inputs (`mean_latency_ratio`).
- parity: each runtime artifact run one input at a time against the Keras model, per exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from compressor.pipeline.context import Run
    from compressor.pipeline.records import Measured
    from compressor.surgery.plan import Plan


def exit_entry(run: Run, plan: Plan, measured: Measured) -> Optional[dict[str, Any]]:
    """report.json's "early_exit" (module docstring); None when the run has no exit stage."""
    from compressor.pipeline.records import ExitRecord

    record = run.record(ExitRecord)
    outcome = record.outcome if record is not None else None
    if record is None:
        return None
    search = _search(outcome) if outcome is not None else None
    if plan.early_exit is None:
        reason = outcome.reason if outcome is not None else "the guard rejected an earlier model"
        return {"applied": False, "reason": reason or "not trained", **({"search": search} if search else {})}
    entry: dict[str, Any] = {"applied": True, "points": list(plan.early_exit["points"]),
                             "thresholds": list(plan.early_exit["thresholds"])}
    if search:
        entry["search"] = search
    exits = measured.exits
    if exits is not None:
        entry.update(exits)
        entry["expected_flops_fraction"] = exits["flops_per_input"]["mean"] / exits["static_flops"]
    static = measured.static_tflite
    dynamic = next((a for a in measured.artifacts if a["format"] == "tflite" and a.get("quantize", "none") == "none"), None)
    if static is not None and dynamic is not None and dynamic.get("latency_ms"):
        entry["tflite"] = {
            "path": dynamic["path"],
            "latency_ms": dynamic["latency_ms"],
            "static_path": static["path"],
            "static_latency_ms": static["latency_ms"],
            "static_bytes": static["bytes"],
            "mean_latency_ratio": dynamic["latency_ms"]["mean"] / static["latency_ms"]["mean"],
        }
    return entry


def _search(outcome: Any) -> dict[str, Any]:
    """What training and calibration saw on the search data."""
    return {
        "points": [point.name for point in outcome.points],
        "head_accuracy": list(outcome.head_accuracy),
        "thresholds": [float(t) for t in outcome.thresholds],
        "rates": list(outcome.rates),
        "flops_fraction": None if outcome.mean_flops is None else outcome.mean_flops / max(outcome.static_flops, 1),
        "accuracy": outcome.accuracy,
        "baseline_accuracy": outcome.baseline_accuracy,
        "latency_check": outcome.latency_check,
        "seconds": round(outcome.seconds, 3),
    }
