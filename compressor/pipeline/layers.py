"""The per-layer stage: factorize or mask each layer under what the budget has left.

Runs the fixed_params or fixed_loss search over the per-layer techniques (those the
technique registry knows as per-layer, not the stages of their own) on the model
without its removed channels, with the budget channel removal left
(`policy.remaining_budget`).

Techniques that need statistics gathered on data ("hessian" its K-FAC eigenbases,
"sparsity" ranked by a criterion other than magnitude) are prepared by the registry
(`prepare_registry`) on the training data, else the search data; the plan's
"statistics" records how, and a replay prepares them again from that record for the
edits that need them (`registry_for_plan`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.context import Run, RunContext, Splits
from compressor.pipeline.records import BlockRecord, ChannelRecord, LayerRecord
from compressor.surgery.plan import LayerEdit, Plan

if TYPE_CHECKING:
    import keras

    from compressor.io.data import Dataset
    from compressor.search.budgets import Budget
    from compressor.search.result import LayerChoice, SearchResult
    from compressor.techniques.registry import Registry


def layer_techniques(techniques: Sequence[str]) -> tuple[str, ...]:
    """The per-layer techniques among those asked for."""
    from compressor.techniques.registry import stage_technique_names

    stages = stage_technique_names()
    return tuple(t for t in techniques if t not in stages)


def default_cache_dir() -> Path:
    """Where kernel-error curves and sensitivity tables are cached: $XDG_CACHE_HOME/compressor or ~/.cache/compressor."""
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "compressor"


class LayerStage:
    """Search: a per-layer search, then its plan applied. Replay: the recorded edits applied."""

    name = "layers"

    def check(self, ctx: RunContext, record: Optional[LayerRecord]) -> None:
        """Nothing to refuse early: whether statistics need data depends on the budget channels leave."""

    def search(self, ctx: RunContext, run: Run) -> Optional[LayerRecord]:
        from compressor.search.apply import apply_plan

        techniques = layer_techniques(ctx.options.techniques)
        if techniques and run.acceptance is not None and run.acceptance.closed:
            ctx.log("per-layer techniques skipped: the guard rejected a channel step, so nothing more can be accepted")
            return None
        budget = _remaining_budget(ctx, run) if techniques else None
        if budget is None:
            return None
        from compressor.techniques.registry import prepare_registry

        samples, source = statistics_data(ctx.data)
        options = ctx.options
        registry, statistics = prepare_registry(options.techniques, run.working, samples, source=source,
                                                criterion=options.criterion, seed=options.seed, log=ctx.log)
        result = _search(ctx, run.working, budget, techniques, registry)
        run.compressed = apply_plan(run.working, result.plan, registry=registry)
        edits = result.plan.edits
        costs = _edit_costs(run.working, edits, result.layers, registry)
        return LayerRecord(edits, result.plan.skipped, statistics, costs, result)

    def recorded(self, plan: Plan) -> LayerRecord:
        return LayerRecord(plan.edits, plan.skipped, plan.statistics)

    def replay(self, ctx: RunContext, run: Run, record: LayerRecord) -> LayerRecord:
        from compressor.search.apply import apply_plan

        channels, blocks = run.record(ChannelRecord), run.record(BlockRecord)
        plan = Plan(model=dict(run.identity or {}), edits=record.edits, channels=channels.removals if channels else (),
                    blocks=blocks.removed if blocks else ())
        from compressor.techniques.registry import registry_for_plan

        samples, source = statistics_data(ctx.data)
        seed = int((record.statistics or {}).get("seed", ctx.options.seed))  # as the statistics were gathered
        registry = registry_for_plan([edit.technique for edit in record.edits], record.statistics, run.working, samples,
                                     source=source, seed=seed, log=ctx.log)
        # Through the original model: apply_plan checks that the plan was made for it.
        run.compressed = apply_plan(ctx.model, plan, registry=registry)
        return dataclasses.replace(record, costs=_edit_costs(run.working, record.edits, (), registry))


def _remaining_budget(ctx: RunContext, run: Run) -> Optional[Budget]:
    channels = run.record(ChannelRecord)
    guard = (policy.Guard(len(ctx.data.guard), ctx.options.confidence, ctx.metric.binary)
             if run.acceptance is not None else None)
    if channels is None or channels.result is None:
        return ctx.budget if guard is None else policy.remaining_budget(ctx.budget, None, None, None, guard)
    from compressor.graph.cost import model_cost

    result = channels.result
    drop = result.baseline_accuracy - result.accuracy if policy.is_accuracy(ctx.budget) else None
    base, now = model_cost(ctx.model), model_cost(run.working)
    return policy.remaining_budget(ctx.budget, drop, policy.Cost(base.params, base.flops), policy.Cost(now.params, now.flops),
                                   guard)


def statistics_data(data: Splits) -> tuple[Optional[Dataset], str]:
    """The data statistics are gathered on: the training data, else the search data (and which it is)."""
    return (data.train, "train") if data.train is not None else (data.search, "search")


def _search(ctx: RunContext, model: keras.Model, budget: Budget, techniques: tuple[str, ...],
            registry: Registry) -> SearchResult:
    from compressor.search.candidates import layer_candidates
    from compressor.search.kernels import KernelCache

    options = ctx.options
    pattern = options.pattern() if any(registry[name].uses_pattern for name in techniques) else None
    kernels = KernelCache(registry=registry)  # effective kernels built for the candidates, reused by the search
    cache = options.cache_dir or default_cache_dir()  # kernel errors (any method) and sensitivity tables (fixed_loss)
    candidates, skipped = layer_candidates(model, techniques, pattern, kernels=kernels, registry=registry,
                                           cache_dir=cache)
    if not candidates:
        reasons = "; ".join(f"{skip.layer}: {skip.reason}" for skip in skipped[:3]) or "it has no layers with weights"
        raise OptionError("no layer can be compressed with {techniques} {names} ({reasons})",
                          names=",".join(techniques), reasons=reasons)
    if options.method == "fixed_params":
        from compressor.search.fixed_params import search_fixed_params

        return search_fixed_params(model, candidates, budget, progress=ctx.progress, skipped=skipped)
    from compressor.search.fixed_loss import search_fixed_loss

    return search_fixed_loss(
        model, candidates, ctx.data.search, budget, cache_dir=cache, progress=ctx.progress, skipped=skipped, kernels=kernels,
        metric=ctx.metric,
    )


def _edit_costs(model: keras.Model, edits: Sequence[LayerEdit], choices: Sequence[LayerChoice],
                registry: Registry) -> dict[str, tuple[int, int]]:
    """Layer -> (params, FLOPs) after its edit: as the search chose it, else as the edit costs."""
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.base import edit_cost

    layers = editable_layers(model)
    # The search summed FLOPs over every call of shared layers; a replayed plan costs each layer by its first call.
    chosen = {choice.name: choice for choice in choices}
    costs = {}
    for edit in edits:
        choice = chosen.get(edit.layer)
        costs[edit.layer] = (choice.params_after, choice.flops_after) if choice else edit_cost(layers[edit.layer], edit, registry=registry)
    return costs
