"""report.json assembled from the stage records of one run, and written.

    report = build_report(ctx, run, measured, timings)
    write_report(folder / "report.json", report)

The keys are the contract in `compressor.report.schema` (and the README). Accuracy
figures are the held-out ones measured on the artifacts (`Measured`); what the search
saw on its own data is reported next to them ("search_achieved", "search").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from compressor.errors import CompressorError
from compressor.pipeline.records import (
    BlockRecord,
    ChannelRecord,
    ExitRecord,
    FinetuneRecord,
    GatingRecord,
    LayerRecord,
    Measured,
    step_tuning,
)
from compressor.report.schema import SCHEMA

if TYPE_CHECKING:
    from compressor.graph.cost import ModelCost
    from compressor.pipeline.context import Run, RunContext
    from compressor.search.budgets import Budget
    from compressor.surgery.plan import ChannelRemoval, Plan

FORMAT_ORDER = {"tflite": 0, "onnx": 1, "keras": 2}


STAGE_TIMINGS = ("load", "blocks", "channels", "layers", "finetune", "acceptance", "gating", "early_exit", "writing",
                 "verification", "timing")
"""The stages report.json's "timings_s" gives one by one, in run order (README schema)."""


@dataclass(frozen=True)
class Timings:
    """Wall time of the run's parts, in seconds; the total runs until the report is built.

    Attributes:
        search: Every model stage (blocks, channels, layers, fine-tuning, gating), searching or replaying.
        export: Writing, verifying and timing the artifacts.
        started: time.perf_counter() at the start of the run.
        stages: Stage name (`STAGE_TIMINGS`) → its wall time; a stage that did not run counts 0.
    """

    search: float
    export: float
    started: float
    stages: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Each stage of `STAGE_TIMINGS`, then "search", "export" and "total"."""
        found = {name: round(float(self.stages.get(name, 0.0)), 3) for name in STAGE_TIMINGS}
        return {**found, "search": round(self.search, 3), "export": round(self.export, 3),
                "total": round(time.perf_counter() - self.started, 3)}


def build_report(ctx: RunContext, run: Run, measured: Measured, timings: Timings) -> dict[str, Any]:
    """The report of one run (README schema), with paths as they are in the staging folder.

    Raises:
        CompressorError: An accuracy budget without labelled held-out data to measure it on.
    """
    from compressor.graph.cost import model_cost, stored_params

    options, model, budget, plan = ctx.options, ctx.model, ctx.budget, run.plan()
    base_cost, working_cost, comp_cost = model_cost(model), model_cost(run.working), model_cost(run.compressed)
    artifacts = measured.artifacts
    counted = counted_artifact(artifacts)
    baseline = {
        "params": stored_params(model),
        "flops": base_cost.flops,
        "accuracy": None if counted is None else counted.get("baseline_accuracy"),
    }
    result = {
        "params": stored_params(run.compressed),
        "flops": comp_cost.flops,
        "accuracy": None if counted is None else counted.get("accuracy"),
        "dense_params": comp_cost.params,
    }
    budget_entry = _budget_entry(budget, baseline, result, search_achieved(run, budget), counted)
    if counted is not None and counted.get("drop_ci") is not None and budget is not None and budget.kind == "accuracy_drop":
        budget_entry.update(ci=counted["drop_ci"], confidence=options.confidence)
    if budget is not None and budget.kind == "accuracy_drop" and ctx.metric.name != "top1":
        values = {} if counted is None or "metric_value" not in counted else {
            "baseline_value": counted["baseline_metric_value"], "value": counted["metric_value"]}
        budget_entry["metric"] = {**ctx.metric.to_dict(), **values}
    channels = run.record(ChannelRecord)
    calibration = measured.calibration
    report = {
        "schema": SCHEMA,
        "status": "ok" if budget_entry["met"] in (True, None) else "budget_not_met",
        "method": options.method or "plan",
        "budget": budget_entry,
        "baseline": baseline,
        "compressed": result,
        "quantize": options.quantize,
        "layers": _block_rows(model, plan) + _channel_rows(plan, base_cost, working_cost)
        + _layer_rows(run, plan, working_cost),
        "artifacts": artifacts,
        "search": _search_entry(ctx, run),
        "channels": channels.result.to_dict() if channels is not None and channels.result is not None else None,
        **_blocks_entry(run),
        "gating": _gating_entry(ctx, run, plan, measured),
        **_exits(run, plan, measured),
        "finetune": _finetune_entry(run),
        "calibration": None if calibration.samples is None else {"samples": len(calibration.samples), "data": calibration.source},
        "timings_s": timings.to_dict(),
        "options": options.to_dict(),
        "notes": _notes(run, calibration.source) + _time_limit_notes(channels, options.time_limit) + slower_notes(artifacts),
    }
    dynamic = report["gating"] if report["gating"] and report["gating"]["applied"] else report.get("early_exit")
    if dynamic and dynamic["applied"] and "flops_per_input" in dynamic:
        result["expected_flops"] = dynamic["flops_per_input"]["mean"]
    return report


def _exits(run: Run, plan: Plan, measured: Measured) -> dict[str, Any]:
    """{"early_exit": ...} when the run has an early-exit stage (`compressor.report.exits`), else {}."""
    from compressor.report.exits import exit_entry

    entry = exit_entry(run, plan, measured)
    return {} if entry is None else {"early_exit": entry}


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write report.json atomically."""
    import json

    from compressor.io.atomic import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def relocate(report: dict[str, Any], staging: Path, out: Path) -> None:
    """Point the artifact paths of the report at where the files will be after the move from `staging` to `out`."""
    dynamic = [(report.get(key) or {}).get("tflite") or {} for key in ("gating", "early_exit")]
    for entry in [*report["artifacts"], *dynamic]:
        for key in ("path", "baseline_path", "static_path"):
            if entry.get(key):
                entry[key] = str(Path(out) / Path(entry[key]).relative_to(staging))


def counted_artifact(artifacts: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The artifact whose accuracy the budget is measured on: the one asked for.

    That is the quantized one when quantization was asked for, TFLite before ONNX before
    Keras, among those with a measured accuracy.
    """
    measured = [entry for entry in artifacts if entry.get("accuracy") is not None]
    if not measured:
        return None
    return min(measured, key=lambda e: (e.get("quantize", "none") == "none", FORMAT_ORDER[e["format"]]))


def search_achieved(run: Run, budget: Optional[Budget]) -> Optional[float]:
    """The search data's measure of the budget, when one search alone made the result (or gating last)."""
    if budget is None:
        return None
    gating, channels, layers = run.record(GatingRecord), run.record(ChannelRecord), run.record(LayerRecord)
    gated = gating.outcome if gating is not None else None
    if gated is not None and gated.model is not None and budget.kind == "accuracy_drop":
        return None if gated.accuracy is None else gated.baseline_accuracy - gated.accuracy
    exits = run.record(ExitRecord)
    if exits is not None and exits.outcome is not None and exits.outcome.model is not None:
        return exits.outcome.baseline_accuracy - exits.outcome.accuracy
    pruned = channels.result if channels is not None else None
    search = layers.search if layers is not None else None
    if pruned is None:
        return None if search is None else search.achieved
    if search is None and budget.kind == "accuracy_drop" and pruned.accuracy is not None:
        return pruned.baseline_accuracy - pruned.accuracy
    return None


def _budget_entry(budget: Optional[Budget], baseline: dict, result: dict, search_achieved: Optional[float],
                  counted: Optional[dict]) -> dict[str, Any]:
    from compressor.search.budgets import achieved_drop, achieved_fraction

    if budget is None:
        return {"kind": None, "limit": None, "achieved": None, "met": None}
    if budget.kind == "accuracy_drop":
        if baseline["accuracy"] is None or result["accuracy"] is None:
            raise CompressorError("the accuracy budget needs labelled held-out data")
        achieved = achieved_drop(baseline["accuracy"], result["accuracy"])
        name = Path(counted["path"]).name
        measured_on = f"held-out data, on {name} against the original's {counted['format']} artifact"
    else:
        achieved = achieved_fraction(result[budget.kind], baseline[budget.kind])
        measured_on = f"{budget.kind} of the compressed model"
    entry = {"kind": budget.kind, "limit": budget.limit, "achieved": achieved, "met": budget.met(achieved), "measured_on": measured_on}
    if counted is not None:
        entry["artifact"] = Path(counted["path"]).name
    if search_achieved is not None:
        entry["search_achieved"] = search_achieved
    return entry


def _search_entry(ctx: RunContext, run: Run) -> dict[str, Any]:
    data = ctx.data
    entry = {
        "search_samples": 0 if data.search is None else len(data.search),
        "held_out_samples": 0 if data.held_out is None else len(data.held_out),
        "evaluations": 0,
        "cached_evaluations": 0,
        "trials": [],
    }
    channels, layers = run.record(ChannelRecord), run.record(LayerRecord)
    if channels is not None and channels.result is not None:
        entry["trials"] += [trial.to_dict() for trial in channels.result.trials]
    search = layers.search if layers is not None else None
    if search is not None:
        entry.update(
            evaluations=search.evaluations,
            cached_evaluations=search.cached_evaluations,
            baseline_accuracy=search.baseline_accuracy,
            accuracy=search.accuracy,
        )
        entry["trials"] += [trial.to_dict() for trial in search.trials]
    if run.acceptance is not None:
        entry["acceptance"] = run.acceptance.to_dict()
    return entry


def _finetune_entry(run: Run) -> dict[str, Any]:
    channels, blocks, tuning = run.record(ChannelRecord), run.record(BlockRecord), run.record(FinetuneRecord)
    channel_epochs = channels.epochs if channels is not None else 0
    block_epochs = blocks.epochs if blocks is not None else 0
    last = tuning.result if tuning is not None else None
    plan_entry = (tuning.entry if tuning is not None else None) or {}
    final = last.epochs_run if last is not None else 0
    final_steps = last.steps if last is not None else 0
    search_epochs, search_steps = step_tuning(run.records)
    entry = {
        "epochs": search_epochs + final,
        "channel_steps_epochs": channel_epochs,
        "final_epochs": final,
        "steps": search_steps + final_steps,
        "final_steps": final_steps,
        "steps_per_run": plan_entry.get("steps_per_run"),
        "learning_rate": plan_entry.get("learning_rate"),
        "replicas": last.replicas if last is not None else None,
        "stopped_early": bool(last.stopped_early) if last is not None else None,
        "history": list(last.history) if last is not None else [],
    }
    if blocks is not None:
        entry["block_steps_epochs"] = block_epochs
    return entry


def _blocks_entry(run: Run) -> dict[str, Any]:
    """The block search's account under "blocks" when blocks were removed (None after a replay; the key is optional)."""
    blocks = run.record(BlockRecord)
    if blocks is None:
        return {}
    return {"blocks": blocks.result.to_dict() if blocks.result is not None else None}


def _block_rows(model: Any, plan: Plan) -> list[dict[str, Any]]:
    """One row per removed residual block, named after its Add: the cost of its branch, all gone."""
    if not plan.blocks:
        return []
    from compressor.graph.cost import model_cost
    from compressor.techniques.blocks import removable_blocks

    layers = {row.name: row for row in model_cost(model).layers}
    rows = []
    for block in removable_blocks(model):
        if block.add in plan.blocks:
            costs = [layers[name] for name in block.layers if name in layers]
            rows.append({"name": block.add, "technique": "blocks", "params_before": sum(c.params for c in costs),
                         "params_after": 0, "flops_before": sum(c.flops for c in costs), "flops_after": 0})
    return rows


def _channel_rows(plan: Plan, base_cost: ModelCost, working_cost: ModelCost) -> list[dict[str, Any]]:
    """One row per layer with weights that channel removal narrowed, and per pruned group.

    A group is named after its first producer layer: that layer's row also says how many
    of the group's channels went. Costs compare the original with the pruned model,
    before any per-layer edit (those have rows of their own).
    """
    if not plan.channels:
        return []
    removals = {removal.group: removal for removal in plan.channels}
    after = {row.name: row for row in working_cost.layers}
    rows = []
    for before in base_cost.layers:
        now, removal = after.get(before.name), removals.pop(before.name, None)
        if now is None or not before.params or (removal is None and (now.params, now.flops) == (before.params, before.flops)):
            continue
        row = {"name": before.name, "technique": "channels", "params_before": before.params, "params_after": now.params,
               "flops_before": before.flops, "flops_after": now.flops}
        if removal is not None:
            row.update(_group_fields(removal))
        rows.append(row)
    return rows + [{"name": removal.group, "technique": "channels", **_group_fields(removal)} for removal in removals.values()]


def _group_fields(removal: ChannelRemoval) -> dict[str, Any]:
    return {"criterion": removal.criterion, "channels_before": removal.size, "channels_after": removal.size - len(removal.remove)}


def _layer_rows(run: Run, plan: Plan, cost: ModelCost) -> list[dict[str, Any]]:
    """One row per edited layer (its cost before and after) and per layer left alone (why)."""
    before = {row.name: row for row in cost.layers}
    layers = run.record(LayerRecord)
    costs = layers.costs if layers is not None else {}
    rows = []
    for edit in plan.edits:
        row = before.get(edit.layer)
        params_after, flops_after = costs[edit.layer]
        rows.append(
            {
                "name": edit.layer,
                "technique": edit.technique,
                "params_before": row.params if row else None,
                "params_after": params_after,
                "flops_before": row.flops if row else None,
                "flops_after": flops_after,
                **{k: v for k, v in edit.to_dict().items() if k not in ("layer", "technique")},
            }
        )
    for skip in plan.skipped:
        row = before.get(skip.layer)
        rows.append(
            {
                "name": skip.layer,
                "technique": "skipped",
                "reason": skip.reason,
                "params_before": row.params if row else None,
                "params_after": row.params if row else None,
                "flops_before": row.flops if row else None,
                "flops_after": row.flops if row else None,
            }
        )
    return rows


def _gating_entry(ctx: RunContext, run: Run, plan: Plan, measured: Measured) -> Optional[dict[str, Any]]:
    """What the gates do: skip rate per block, FLOPs per input, TFLite latency per input against the static model."""
    record = plan.gating
    gating = run.record(GatingRecord)
    trained = gating.outcome if gating is not None else None
    if record is None and trained is None:
        return None
    attempts = trained.attempts if trained is not None else []
    if record is None:
        return {"applied": False, "target": ctx.options.gating_target, "attempts": attempts, "reason": trained.reason,
                "latency_check": trained.latency_check}
    gates = measured.gates
    entry = {
        "applied": True,
        "blocks": [{"name": name, "flops": gating.flops[name], "skip_rate": None} for name in record["blocks"]],
        "target": ctx.options.gating_target if trained is not None else record["target"],
        "trained_target": record["target"],
        "network": record["network"],
        "epochs": record["epochs"],
        "offset": record["offset"],
        "attempts": attempts,
        "latency_check": trained.latency_check if trained is not None else None,
        "history": list(trained.history) if trained is not None else [],
        "measured_on": gates.data,
        "static_flops": gates.static_flops,
    }
    if record.get("removed"):
        entry["removed_blocks"] = list(record["removed"])
    if gates.statistics is not None:
        entry.update(gates.statistics)
        entry["expected_flops_fraction"] = gates.statistics["flops_per_input"]["mean"] / gates.static_flops
    tflite = dynamic_tflite(measured)
    if tflite is not None:
        entry["tflite"] = tflite
    return entry


def dynamic_tflite(measured: Measured) -> Optional[dict[str, Any]]:
    """A dynamic model's float TFLite file against the static model's, timed in the same run (None: not timed)."""
    static = measured.static_tflite
    dynamic = next((a for a in measured.artifacts if a["format"] == "tflite" and a.get("quantize", "none") == "none"), None)
    if static is None or dynamic is None or not dynamic.get("latency_ms"):
        return None
    return {
        "path": dynamic["path"],
        "latency_ms": dynamic["latency_ms"],
        "static_path": static["path"],
        "static_latency_ms": static["latency_ms"],
        "static_bytes": static["bytes"],
        "mean_latency_ratio": dynamic["latency_ms"]["mean"] / static["latency_ms"]["mean"],
    }


SLOWER = 1.10
"""An artifact whose median latency is above this multiple of the original's (same format, same run) gets a note."""


def slower_notes(artifacts: list[dict[str, Any]]) -> list[str]:
    """A note for each artifact that runs slower than the original's artifact of its format.

    Fewer params and FLOPs do not make every runtime faster: one may run an edited layer
    less well than the original (tf2onnx makes a native ONNX LSTM of Keras' LSTM, but a
    loop of a low-rank one). Timing noise on a shared machine stays within about 10%.
    """
    notes = []
    for entry in artifacts:
        ratio, ours, theirs = entry.get("latency_ratio"), entry.get("latency_ms"), entry.get("baseline_latency_ms")
        if ratio is None or ratio <= SLOWER or not ours or not theirs:
            continue
        name = Path(str(entry["path"])).name
        notes.append(
            f"{name} runs slower than the original's {entry['format']} file ({ours['median']:.3g} ms against "
            f"{theirs['median']:.3g} ms median, {ratio:.2f}×): this runtime runs some edited layer less well than "
            "the original's; the other format, or techniques that leave that layer whole, may serve better."
        )
    return notes


def _time_limit_notes(channels: Optional[ChannelRecord], limit: Optional[float]) -> list[str]:
    """A note when the channel search stopped at `--time-limit` rather than at its own end."""
    if channels is None or channels.result is None or channels.result.stopped != "time limit":
        return []
    steps = channels.result.steps
    kept = sum(1 for step in steps if step.accepted)
    return [f"The channel search stopped at its time limit ({limit:g} min) after {kept} kept of {len(steps)} "
            "step(s): a longer --time-limit may compress further."]


def _notes(run: Run, calibration_source: Optional[str]) -> list[str]:
    notes = []
    if calibration_source == "held-out":
        notes.append(
            "Quantization was calibrated on the held-out data the accuracy is measured on (no training "
            "or search data was given), which flatters the quantized artifact's accuracy a little."
        )
    layers = run.record(LayerRecord)
    if layers is not None and layers.sparse_weights:
        notes.append(
            "Sparse weights make the TFLite file smaller (stored sparsely), but TFLite runs "
            "convolutions dense: compare latency_ms, not the parameter count, for speed."
        )
    warning = run.acceptance.too_few_warning() if run.acceptance is not None else None
    if warning:
        notes.append(warning[0].upper() + warning[1:] + ".")
    return notes
