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
- search: what the search data showed: each head's accuracy, the thresholds chosen, and
  every calibrated exit set (`candidates`) with its rates, FLOPs and measured latency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from compressor.pipeline.context import Run
    from compressor.pipeline.records import Measured
    from compressor.surgery.plan import Plan


def exit_entry(run: Run, plan: Plan, measured: Measured) -> Optional[dict[str, Any]]:
    """report.json's "early_exit" (module docstring); None when the run has no exit stage."""
    from compressor.pipeline.records import ExitRecord
    from compressor.report.build import dynamic_tflite

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
    tflite = dynamic_tflite(measured)
    if tflite is not None:
        entry["tflite"] = tflite
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
        "candidates": list(outcome.candidates),
        "seconds": round(outcome.seconds, 3),
    }


def exits_markdown(report: Mapping[str, Any]) -> str:
    """report.md's "Early exits": per exit its rate and accuracy, FLOPs and TFLite latency per input, parity."""
    from compressor.report.cells import MISSING, count, integer, percent, table
    from compressor.report.markdown import dynamic_rows
    from compressor.report.plots import is_number, list_of, mapping_of

    entry = mapping_of(report.get("early_exit"))
    if not entry:
        return ""
    if not entry.get("applied"):
        return f"## Early exits\n\nNot applied: {entry.get('reason') or MISSING}."
    exits = [mapping_of(e) for e in list_of(entry.get("exits"))]
    final = mapping_of(entry.get("final"))
    rows = [[f"after `{e.get('point', '?')}`", f"{e.get('threshold', 0):.3f}" if is_number(e.get("threshold")) else MISSING,
             percent(e.get("rate")), percent(e.get("accuracy")), integer(e.get("flops"))] for e in exits]
    rows.append(["the whole network", MISSING, percent(final.get("rate")), percent(final.get("accuracy")),
                 integer(final.get("flops"))])
    intro = (f"{count(len(exits), 'exit')} answer the inputs they are confident on (largest softmax probability at "
             f"least the threshold); the rest of the network does not run for them. Measured on "
             f"{entry.get('samples', MISSING)} {entry.get('measured_on') or ''} inputs.")
    summary = dynamic_rows(entry)
    parts = ["## Early exits", intro, table(["exit", "threshold", "answers", "accuracy there", "FLOPs per input"], rows, "lrrrr"),
             table(["", "without exits", "with exits"], summary, "lrr")]
    parity = [mapping_of(p) for p in list_of(entry.get("parity"))]
    if parity:
        cells = []
        for artifact in parity:
            for per_exit in (mapping_of(e) for e in list_of(artifact.get("per_exit"))):
                where = "end" if per_exit.get("exit") == "end" else f"exit {per_exit.get('exit')}"
                cells.append([f"{artifact.get('format')} ({artifact.get('quantize')})", where, integer(per_exit.get("inputs")),
                              f"{per_exit.get('max_abs_diff', 0):.2g}" if is_number(per_exit.get("max_abs_diff")) else MISSING,
                              percent(per_exit.get("top1_agreement"))])
        parts.append("Each artifact run one input at a time against the Keras model, by where the input left:")
        parts.append(table(["artifact", "left at", "inputs", "max abs diff", "same top-1"], cells, "llrrr"))
    return "\n\n".join(parts)

