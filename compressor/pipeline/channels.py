"""The channel stage: remove whole channels of dependency groups, before any per-layer edit.

Runs when the techniques include "channels" (`compressor.search.channel_search`
searches), on the model the block stage left (the original when no block was removed);
the per-layer techniques then edit the narrower model. Under a cost budget shared with
them, channels aim at its square root (`policy.channel_budget`). A replay removes the
recorded channels of that model again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from compressor.pipeline import policy
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.finetuning import finetune_config
from compressor.pipeline.layers import layer_techniques
from compressor.pipeline.records import ChannelRecord
from compressor.surgery.plan import Plan

if TYPE_CHECKING:
    import keras
    import numpy as np

    from compressor.io.data import Dataset


class ChannelStage:
    """Search: `search_channels` under the channel budget. Replay: `prune_planned_channels`."""

    name = "channels"

    def check(self, ctx: RunContext, record: Optional[ChannelRecord]) -> None:
        """Nothing to refuse early: the search checks its own inputs."""

    def search(self, ctx: RunContext, run: Run) -> Optional[ChannelRecord]:
        from compressor.search.channel_search import ChannelSettings, search_channels

        options = ctx.options
        if "channels" not in options.techniques:
            return None
        if run.acceptance is not None and run.acceptance.closed:
            ctx.log("channels: not searched, the guard rejected a block step and accepts nothing more")
            return None
        if layer_techniques(options.techniques) and not can_prune(run.working):
            ctx.log("channels: no channel group of the model can be pruned; the per-layer techniques go on")
            return None
        budget = policy.channel_budget(ctx.budget, bool(layer_techniques(options.techniques)))
        settings = ChannelSettings(
            criterion=options.criterion,
            max_fraction=options.max_channel_fraction,
            finetune=finetune_config(options),
            objective=policy.channel_objective(ctx.budget, options.budget_on),
            seed=options.seed,
            confidence=options.confidence if ctx.data.guard is not None else None,
            guard_samples=len(ctx.data.guard) if ctx.data.guard is not None else None,
            guard_chance=options.guard_chance,
            multiple=options.channel_multiple,
        )
        ctx.log(f"removing channels ({options.criterion})")
        data = ctx.data
        result = search_channels(run.working, budget, settings, data.search, data.train, ctx.log, ctx.progress,
                                 accept=run.accepts if run.acceptance is not None else None, deadline=ctx.deadline,
                                 judge=judged_top1(run), reference=ctx.model, teacher_outputs=ctx.teacher_outputs)
        run.working = run.compressed = result.model
        return ChannelRecord(result.removals, result)

    def recorded(self, plan: Plan) -> Optional[ChannelRecord]:
        return ChannelRecord(plan.channels) if plan.channels else None

    def replay(self, ctx: RunContext, run: Run, record: ChannelRecord) -> ChannelRecord:
        from compressor.search.apply import prune_planned_channels

        plan = Plan(model=dict(run.identity or {}), channels=record.removals)
        run.working = run.compressed = prune_planned_channels(run.working, plan)
        return record


def can_prune(model) -> bool:
    """Whether channel removal can narrow anything in `model` (a channel search alone refuses a model without)."""
    from compressor.graph.groups import analyze_channels

    return any(group.prunable for group in analyze_channels(model).groups)


def judged_top1(run: Run) -> Optional[Callable[[keras.Model, Dataset], np.ndarray]]:
    """Top-1 correctness of the quantized file the guard judges (`compressor.export.judged`), else None."""
    judge = run.acceptance.judge if run.acceptance is not None else None
    if judge is None:
        return None
    from compressor.metrics import TOP1

    return lambda model, data: judge.values(model, data, TOP1)
