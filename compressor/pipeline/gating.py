"""The gating stage: gates before the residual blocks of the statically compressed model.

The static stages spend the budget as they would alone; gating comes on top. Under an
accuracy budget the gated model must stay within it on the search data, with the same
margin for held-out noise as the static stages, measured against the original
(`policy.gating_floor`): gating spends what the static stages left, and training the
network with the gates (distilling the static model) wins some back.

Gates are kept only when the gated TFLite model is faster per input than the static
one, measured (`check_speed`), and, under an accuracy budget, when the run's guard
accepts the gated model (`compressor.pipeline.acceptance`). The plan records the gates (`gating_record`); a replay
rebuilds them (`replay_gates`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.records import GateMeasurement, GatingRecord
from compressor.surgery.plan import Plan

if TYPE_CHECKING:
    import keras

    from compressor.search.gating import GatingOutcome

LATENCY_SAMPLES = 200
"""Inputs the gated and the static TFLite models are timed on."""


class GatingStage:
    """Search: train gates, keep them if they meet the floor and are faster. Replay: rebuild the recorded gates."""

    name = "gating"
    dynamic = True  # sees the whole budget, as the early-exit stage does

    def check(self, ctx: RunContext, record: Optional[GatingRecord]) -> None:
        """Before minutes of static search, not after: the model must have a residual block to gate."""
        if record is None and "gating" in ctx.options.techniques:
            from compressor.techniques.gating import find_residual_blocks

            if not find_residual_blocks(ctx.model):
                raise OptionError(
                    "{techniques} gating: model '{name}' has no residual block (a branch added back to its own input) to gate",
                    name=ctx.model.name,
                )

    def search(self, ctx: RunContext, run: Run) -> Optional[GatingRecord]:
        from compressor.search.gating import gating_record

        if "gating" not in ctx.options.techniques:
            return None
        static = run.compressed
        outcome = _gate(ctx, static)
        if outcome.model is not None and not run.accepts("gated model", outcome.model):
            outcome.model = None
            outcome.reason = "the guard did not accept the gated model (drop not confirmed within the budget)"
            ctx.log(f"gating: not applied, {outcome.reason}")
        if outcome.model is None:
            return GatingRecord(None, outcome, outcome.flops)
        run.static, run.compressed = static, outcome.model
        return GatingRecord(gating_record(outcome), outcome, outcome.flops)

    def recorded(self, plan: Plan) -> Optional[GatingRecord]:
        return GatingRecord(plan.gating) if plan.gating is not None else None

    def replay(self, ctx: RunContext, run: Run, record: GatingRecord) -> GatingRecord:
        if not record.entry:
            return record
        from compressor.search.gating import block_flops, replay_gates
        from compressor.techniques.gating import find_residual_blocks

        ctx.log("adding the plan's gates")
        static = run.compressed
        run.static, run.compressed = static, replay_gates(static, record.entry, ctx.data.train)
        return dataclasses.replace(record, flops=block_flops(static, find_residual_blocks(static)))


def _gate(ctx: RunContext, static: keras.Model) -> GatingOutcome:
    """Gate the residual blocks of `static` and train the gates (module docstring)."""
    from compressor.finetune import accuracy
    from compressor.search.gating import GatingConfig, gate_model

    options = ctx.options
    floor = baseline = None
    search = ctx.data.labelled_search
    if policy.is_accuracy(ctx.budget) and search is not None:
        baseline = accuracy(ctx.model, search)
        floor = policy.gating_floor(baseline, ctx.budget)
    config = GatingConfig(target=options.gating_target, epochs=options.gating_epochs, network=options.gating_network,
                          seed=options.seed)
    outcome = gate_model(
        static, ctx.data.train, config, search=ctx.data.search, min_accuracy=floor, log=ctx.log,
        on_epoch=lambda epoch, epochs: ctx.progress("training gates", epoch, epochs),
    )
    if outcome.model is not None:
        check_speed(ctx, static, outcome)
    if outcome.model is None:
        ctx.log(f"gating: not applied, {outcome.reason}")
    outcome.baseline_accuracy = baseline
    return outcome


def check_speed(ctx: RunContext, static: keras.Model, outcome: GatingOutcome) -> None:
    """Keep the gates only if the gated TFLite file is faster per input than the static one, measured.

    Timed on the search data (else the training data; never the held-out data the
    report measures on), converted as `compress` exports them, interleaved; a gated
    model whose gates cost more than their skipping saves (small blocks, few skips) is
    dropped here: `outcome.model` becomes None, with the reason.
    """
    from compressor.bench.keras_latency import tflite_latency

    data, name = (ctx.data.search, "search") if ctx.data.search is not None else (ctx.data.train, "training")
    ctx.log("timing the gated TFLite model against the static one")
    x = data.x[:LATENCY_SAMPLES]
    static_ms, gated_ms = tflite_latency(static, outcome.model, x, threads=ctx.options.threads, seed=ctx.options.seed)
    outcome.latency_check = {"static_ms": static_ms, "gated_ms": gated_ms, "data": name, "samples": len(x)}
    if gated_ms >= static_ms:
        outcome.model = None
        outcome.reason = (
            f"the gated TFLite model took {gated_ms:.3f} ms per input on average against {static_ms:.3f} ms "
            f"without gates ({len(x)} {name} inputs): the gates cost more than they skip"
        )


def measure_gates(ctx: RunContext, run: Run) -> Optional[GateMeasurement]:
    """What the kept gates do on the held-out data (else the training data): skip rates, FLOPs per input."""
    gating = run.record(GatingRecord)
    if run.static is None or gating is None:
        return None
    from compressor.graph.cost import model_cost
    from compressor.search.gating import gating_statistics

    data, name = (ctx.data.held_out, "held-out") if ctx.data.held_out is not None else (ctx.data.train, "train")
    statistics = None
    if data is not None:
        statistics = gating_statistics(run.compressed, data.x, dict(gating.flops), model_cost(run.compressed).flops)
    return GateMeasurement(name, model_cost(run.static).flops, statistics)
