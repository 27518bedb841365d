"""The early-exit stage: internal classifiers on the statically compressed model, last (`--techniques early-exit`).

Runs under an accuracy budget, with training data (`compressor.search.early_exit`
trains the heads and calibrates the thresholds). The budget is shared: the static
stages before it aim at `EXIT_SHARE` of it and get all but `EXIT_TIME` of the time
left under `--time-limit` (`static_context`), and the exits spend what they left, their
thresholds held against the original with the same step rule and the same guard as
every static step.

Every calibrated set of exits is timed as a TFLite file against the static model on the
search data, one input after another; the fastest is kept only when it is faster per
input than the static one, and when the run's guard accepts it. The plan records the exit points, thresholds and
training settings (`exit_entry`); a replay trains the heads again with them (the
network is frozen, so that is deterministic) and sets the thresholds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.channels import judged_top1
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.records import ExitRecord
from compressor.surgery.plan import Plan

if TYPE_CHECKING:
    import keras

    from compressor.search.early_exit import ExitOutcome, ExitSettings

EXIT_SHARE = 0.5
"""The part of an accuracy budget the static stages aim at when exits follow; the exits spend the rest."""

EXIT_TIME = 0.15
"""The part of the time left under `--time-limit` kept for training, calibrating and timing the exits."""

PARITY_SAMPLES = 500
"""Held-out inputs each exported artifact is run on, one at a time, to check it answers as the Keras model per exit."""


def static_context(ctx: RunContext) -> RunContext:
    """The context the static stages see: with exits to follow, part of the budget and of the time (module docstring)."""
    if "early-exit" not in ctx.options.techniques or ctx.options.plan is not None:
        return ctx
    budget = ctx.budget
    if policy.is_accuracy(budget):
        budget = dataclasses.replace(budget, limit=budget.limit * EXIT_SHARE)
    deadline = ctx.deadline
    if deadline is not None:
        now = time.perf_counter()
        deadline = now + max(deadline - now, 0.0) * (1 - EXIT_TIME)
    return dataclasses.replace(ctx, budget=budget, deadline=deadline)


class ExitStage:
    """Search: train and calibrate exits, keep them if faster and accepted. Replay: train the recorded exits again."""

    name = "early_exit"
    dynamic = True  # sees the whole budget (`static_context` is for the stages before it)

    def check(self, ctx: RunContext, record: Optional[ExitRecord]) -> None:
        """Before minutes of static search: the model must have an exit point."""
        if (record is None and "early-exit" in ctx.options.techniques) or (record is not None and record.entry):
            from compressor.techniques.early_exit import exit_points

            if not exit_points(ctx.model):
                raise OptionError(
                    "{techniques} early-exit: model '{name}' has no exit point (a feature map every path from its "
                    "input to its output goes through, before the last 5% of its FLOPs)", name=ctx.model.name)

    def search(self, ctx: RunContext, run: Run) -> Optional[ExitRecord]:
        from compressor.search.early_exit import add_exits
        from compressor.search.evaluate import sample_values

        if "early-exit" not in ctx.options.techniques:
            return None
        static, search = run.compressed, ctx.data.labelled_search
        if run.acceptance is not None and run.acceptance.closed:
            ctx.log("early exits: not trained, the guard rejected an earlier model and accepts nothing more")
            return ExitRecord(None)
        judge = judged_top1(run)
        timer, timed_on = _timer(ctx)
        outcome = add_exits(static, ctx.data.train, search, sample_values(ctx.model, search), ctx.budget.limit,
                            _settings(ctx), final_correct=judge(static, search) if judge else None,
                            timer=timer, log=ctx.log)
        check = outcome.latency_check
        if check is not None:
            check.update(timed_on)
        if outcome.model is not None and check["gated_ms"] >= check["static_ms"]:
            outcome.model = None
            outcome.reason = (
                f"the fastest early-exit TFLite model took {check['gated_ms']:.3f} ms per input on average against "
                f"{check['static_ms']:.3f} ms without exits ({check['samples']} {check['data']} inputs): the exits cost "
                "more than they skip")
        if outcome.model is not None and not run.accepts("early exits", outcome.model):
            outcome.model = None
            outcome.reason = "the guard did not accept the early-exit model (drop not confirmed within the budget)"
        if outcome.model is None:
            ctx.log(f"early exits: not applied, {outcome.reason}")
            return ExitRecord(None, outcome)
        run.static, run.compressed = static, outcome.model
        return ExitRecord(exit_entry(outcome), outcome)

    def recorded(self, plan: Plan) -> Optional[ExitRecord]:
        return ExitRecord(plan.early_exit) if plan.early_exit is not None else None

    def replay(self, ctx: RunContext, run: Run, record: ExitRecord) -> ExitRecord:
        if not record.entry:
            return record
        ctx.log("adding the plan's early exits")
        static = run.compressed
        run.static, run.compressed = static, replay_exits(static, record.entry, ctx.data.train)
        return record


def _timer(ctx: RunContext) -> tuple[Callable[[list], list], dict[str, Any]]:
    """Times models as TFLite files on the search data (else the training data), one input after another;
    with what it times on ({"data", "samples"})."""
    from compressor.bench.keras_latency import tflite_latencies
    from compressor.pipeline.gating import LATENCY_SAMPLES

    data, name = (ctx.data.search, "search") if ctx.data.search is not None else (ctx.data.train, "training")
    x = data.x[:LATENCY_SAMPLES]

    def timer(models: list) -> list:
        ctx.log(f"timing {len(models) - 1} early-exit TFLite model(s) against the static one on {len(x)} {name} inputs")
        return tflite_latencies(models, x, threads=ctx.options.threads, seed=ctx.options.seed)

    return timer, {"data": name, "samples": len(x)}


def _settings(ctx: RunContext) -> ExitSettings:
    from compressor.search.early_exit import ExitSettings

    options, guard = ctx.options, ctx.data.guard
    return ExitSettings(seed=options.seed, confidence=options.confidence if guard is not None else None,
                        guard_samples=len(guard) if guard is not None else None, guard_chance=options.guard_chance)


def exit_entry(outcome: ExitOutcome) -> dict[str, Any]:
    """The plan's record of the exits: points, thresholds, and how the heads were trained."""
    settings = outcome.settings
    kept = [k for k, point in enumerate(outcome.points) if point.name in outcome.kept]
    return {
        "points": [outcome.points[k].name for k in kept],
        "thresholds": [float(outcome.thresholds[k]) for k in kept],
        "hidden": settings.hidden,
        "grid": settings.grid,
        "epochs": settings.epochs,
        "learning_rate": settings.learning_rate,
        "distillation": settings.distillation,
        "seed": settings.seed,
    }


def replay_exits(static: keras.Model, entry: dict[str, Any], train: Any) -> keras.Model:
    """The early-exit model a plan records: its heads trained again on `train` with the recorded settings.

    Raises:
        OptionError: No training data.
        CompressorError: A recorded exit point the model does not have.
    """
    from compressor.errors import CompressorError
    from compressor.search.early_exit import ExitSettings, build_exits, train_heads
    from compressor.techniques.early_exit import exit_points

    if train is None or train.y is None:
        raise OptionError("the plan's early exits are trained again on replay: pass {train_data} (labelled)")
    found = {point.name: point for point in exit_points(static)}
    missing = [name for name in entry["points"] if name not in found]
    if missing:
        raise CompressorError(f"the plan puts early exits after layers the model has no exit point at: {', '.join(missing)}")
    points = [found[name] for name in entry["points"]]
    defaults = ExitSettings()
    # Plans from before heads pooled to a grid record none: their heads pooled globally (grid 1).
    settings = ExitSettings(hidden=int(entry.get("hidden", defaults.hidden)), grid=int(entry.get("grid", 1)),
                            epochs=int(entry.get("epochs", defaults.epochs)),
                            learning_rate=float(entry.get("learning_rate", defaults.learning_rate)),
                            distillation=float(entry.get("distillation", defaults.distillation)),
                            seed=int(entry.get("seed", defaults.seed)))
    heads = train_heads(static, points, train, int(static.outputs[0].shape[-1]), settings)
    probabilities = _outputs_probabilities(static, train.x[:256])
    return build_exits(static, points, heads, entry["thresholds"], probabilities)


def _outputs_probabilities(model: keras.Model, x: np.ndarray) -> bool:
    from compressor.graph.outputs import outputs_probabilities

    return outputs_probabilities(model, lambda: np.asarray(model.predict(x, verbose=0)))


def measure_exits(ctx: RunContext, run: Run, artifacts: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """What the kept exits do on the held-out data (else the training data), and each artifact's parity per exit.

    Returns:
        None without exits, else {"measured_on", "samples", "exits": [{"point", "threshold",
        "rate", "accuracy", "flops"}], "final": {"rate", "accuracy", "flops"}, "static_flops",
        "flops_per_input": {"mean", "p10", "median", "p90", "max"}, "parity": [...]}.
    """
    record = run.record(ExitRecord)
    if run.static is None or record is None or not record.entry:
        return None
    from compressor.graph.cost import model_cost
    from compressor.layers.early_exit import exit_layers
    from compressor.search.early_exit import answer_costs, exit_choices
    from compressor.techniques.early_exit import exit_points

    data, name = (ctx.data.held_out, "held-out") if ctx.data.held_out is not None else (ctx.data.train, "train")
    if data is None:
        return None
    choice, probabilities = exit_choices(run.static, run.compressed, data.x)
    branches = exit_layers(run.compressed)
    points = {p.name: p for p in exit_points(run.static)}
    static_flops = model_cost(run.static).flops
    costs = np.asarray(answer_costs([points[b.point] for b in branches], [model_cost(b.head).flops for b in branches],
                                    static_flops), np.float64)
    per_input = costs[choice]
    outputs = np.asarray(run.compressed.predict(data.x, batch_size=256, verbose=0))
    labels = data.y

    def where(k: int) -> dict[str, Any]:
        here = choice == k
        accuracy = float((outputs[here].argmax(-1) == labels[here]).mean()) if labels is not None and here.any() else None
        return {"rate": float(here.mean()), "accuracy": accuracy, "flops": int(costs[k])}

    return {
        "measured_on": name,
        "samples": int(len(data)),
        "exits": [{"point": b.point, "threshold": float(np.asarray(b.threshold)), **where(k)} for k, b in enumerate(branches)],
        "final": where(len(branches)),
        "static_flops": int(static_flops),
        "flops_per_input": {"mean": float(per_input.mean()), "p10": float(np.percentile(per_input, 10)),
                            "median": float(np.median(per_input)), "p90": float(np.percentile(per_input, 90)),
                            "max": float(per_input.max())},
        "parity": _parity(ctx, artifacts, data.x[:PARITY_SAMPLES], outputs[:PARITY_SAMPLES], choice[:PARITY_SAMPLES],
                          len(branches)),
    }


def _parity(ctx: RunContext, artifacts: list[dict[str, Any]], x: np.ndarray, expected: np.ndarray, choice: np.ndarray,
            exits: int) -> list[dict[str, Any]]:
    """Each runtime artifact run on `x` one input at a time against the Keras model, per exit that answered.

    Per artifact and exit: the inputs that exit answered (in Keras), the largest
    absolute difference of their outputs, and the share whose top-1 class agrees.
    """
    from compressor.bench.runtime import open_artifact

    found = []
    for artifact in artifacts:
        if artifact["format"] not in ("tflite", "onnx"):
            continue
        runner = open_artifact(artifact["path"], threads=ctx.options.threads)
        got = np.asarray(runner.predict(x, batch_size=1), np.float32).reshape(expected.shape)
        per_exit = []
        for k in range(exits + 1):
            here = choice == k
            if not here.any():
                continue
            per_exit.append({"exit": "end" if k == exits else k, "inputs": int(here.sum()),
                             "max_abs_diff": float(np.abs(got[here] - expected[here]).max()),
                             "top1_agreement": float((got[here].argmax(-1) == expected[here].argmax(-1)).mean())})
        found.append({"format": artifact["format"], "quantize": artifact.get("quantize", "none"), "per_exit": per_exit})
    return found
