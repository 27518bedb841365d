"""The per-layer stage: factorize or mask each layer under what the budget has left.

Runs the fixed_params or fixed_loss search over the per-layer techniques (every
technique but the stages of their own, STAGE_TECHNIQUES) on the model without its
removed channels, with the budget channel removal left (`policy.remaining_budget`).

Two techniques need statistics gathered on data: "hessian" needs K-FAC eigenbases of
each layer, and "sparsity" with a criterion other than magnitude ranks weights by that
criterion's scores. Both come from the training data (else the search data); the plan's
"statistics" records how, and a replay gathers them again the same way for the edits
that need them.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.context import Log, Run, RunContext, Splits
from compressor.pipeline.records import ChannelRecord, LayerRecord
from compressor.surgery.plan import LayerEdit, Plan

if TYPE_CHECKING:
    import keras

    from compressor.config import CompressOptions
    from compressor.io.data import Dataset
    from compressor.search.budgets import Budget
    from compressor.search.result import LayerChoice, SearchResult
    from compressor.techniques.hessian import Hessian

STAGE_TECHNIQUES = ("channels", "gating")
"""Techniques that are stages of their own, not per-layer edits."""

KFAC_SAMPLES = 512


def layer_techniques(techniques: Sequence[str]) -> tuple[str, ...]:
    """The per-layer techniques among those asked for."""
    return tuple(t for t in techniques if t not in STAGE_TECHNIQUES)


def default_cache_dir() -> Path:
    """Where sensitivity tables are cached: $XDG_CACHE_HOME/compressor or ~/.cache/compressor."""
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
        budget = _remaining_budget(ctx, run) if techniques else None
        if budget is None:
            return None
        with layer_statistics(Statistics.for_search(ctx.options), run.working, ctx.data, ctx.log) as statistics:
            result = _search(ctx, run.working, budget, techniques)
            run.compressed = apply_plan(run.working, result.plan)
        edits = result.plan.edits
        return LayerRecord(edits, result.plan.skipped, statistics, _edit_costs(run.working, edits, result.layers), result)

    def recorded(self, plan: Plan) -> LayerRecord:
        return LayerRecord(plan.edits, plan.skipped, plan.statistics)

    def replay(self, ctx: RunContext, run: Run, record: LayerRecord) -> LayerRecord:
        from compressor.search.apply import apply_plan

        channels = run.record(ChannelRecord)
        plan = Plan(model=dict(run.identity or {}), edits=record.edits, channels=channels.removals if channels else ())
        with layer_statistics(Statistics.for_replay(record, ctx.options.seed), run.working, ctx.data, ctx.log):
            # Through the original model: apply_plan checks that the plan was made for it.
            run.compressed = apply_plan(ctx.model, plan)
        return dataclasses.replace(record, costs=_edit_costs(run.working, record.edits, ()))


def _remaining_budget(ctx: RunContext, run: Run) -> Optional[Budget]:
    channels = run.record(ChannelRecord)
    if channels is None or channels.result is None:
        return ctx.budget
    from compressor.graph.cost import model_cost

    result = channels.result
    drop = result.baseline_accuracy - result.accuracy if policy.is_accuracy(ctx.budget) else None
    base, now = model_cost(ctx.model), model_cost(run.working)
    return policy.remaining_budget(ctx.budget, drop, policy.Cost(base.params, base.flops), policy.Cost(now.params, now.flops))


def _search(ctx: RunContext, model: keras.Model, budget: Budget, techniques: tuple[str, ...]) -> SearchResult:
    from compressor.search.candidates import layer_candidates
    from compressor.search.kernels import KernelCache

    options = ctx.options
    pattern = options.pattern() if "sparsity" in techniques else None
    kernels = KernelCache()  # effective kernels built for the candidates, reused by the search
    candidates, skipped = layer_candidates(model, techniques, pattern, kernels=kernels)
    if not candidates:
        reasons = "; ".join(f"{skip.layer}: {skip.reason}" for skip in skipped[:3]) or "it has no layers with weights"
        raise OptionError("no layer can be compressed with {techniques} {names} ({reasons})",
                          names=",".join(techniques), reasons=reasons)
    if options.method == "fixed_params":
        from compressor.search.fixed_params import search_fixed_params

        return search_fixed_params(model, candidates, budget, progress=ctx.progress, skipped=skipped)
    from compressor.search.fixed_loss import search_fixed_loss

    cache = options.cache_dir or default_cache_dir()
    return search_fixed_loss(
        model, candidates, ctx.data.search, budget, cache_dir=cache, progress=ctx.progress, skipped=skipped, kernels=kernels
    )


def _edit_costs(model: keras.Model, edits: Sequence[LayerEdit], choices: Sequence[LayerChoice]) -> dict[str, tuple[int, int]]:
    """Layer -> (params, FLOPs) after its edit: as the search chose it, else as the edit costs."""
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.base import edit_cost

    layers = editable_layers(model)
    # The search summed FLOPs over every call of shared layers; a replayed plan costs each layer by its first call.
    chosen = {choice.name: choice for choice in choices}
    costs = {}
    for edit in edits:
        choice = chosen.get(edit.layer)
        costs[edit.layer] = (choice.params_after, choice.flops_after) if choice else edit_cost(layers[edit.layer], edit)
    return costs


@dataclass(frozen=True)
class Statistics:
    """Which data-driven statistics the per-layer edits need.

    Attributes:
        kfac: K-FAC eigenbases of each layer ("hessian").
        criterion: The criterion whose scores rank the weights of "sparsity" masks
            (None: masks by magnitude, which need no data).
        seed: Seed of the sampling.
        asked_by: Which techniques ask for them, for messages (None: a replayed plan's edits).
    """

    kfac: bool
    criterion: Optional[str]
    seed: int
    asked_by: Optional[tuple[str, ...]] = None

    @classmethod
    def for_search(cls, options: CompressOptions) -> "Statistics":
        """What the techniques the options ask for need."""
        scored = "sparsity" in options.techniques and options.criterion != "magnitude"
        criterion = options.criterion if scored else None
        return cls("hessian" in options.techniques, criterion, options.seed, tuple(options.techniques))

    @classmethod
    def for_replay(cls, record: LayerRecord, seed: int) -> "Statistics":
        """What a plan's edits need, gathered as its statistics record says (`seed` when it says none)."""
        recorded = record.statistics or {}
        techniques = {edit.technique for edit in record.edits}
        criterion = recorded.get("criterion", "magnitude")
        scored = "sparsity" in techniques and criterion != "magnitude"
        return cls("hessian" in techniques, criterion if scored else None, int(recorded.get("seed", seed)))

    def missing_data(self) -> OptionError:
        """The error for statistics without data to gather them on."""
        what = "K-FAC statistics" if self.kfac else f"{self.criterion} scores"
        if self.asked_by is None:
            return OptionError("the plan's edits need {what} gathered on data: pass {train_data} or {data}", what=what)
        return OptionError("{techniques} {names} gathers {what} on data: pass {train_data} or {data}",
                           names=",".join(self.asked_by), what=what)


@contextmanager
def layer_statistics(needs: Statistics, model: keras.Model, data: Splits, log: Log) -> Iterator[Optional[dict[str, Any]]]:
    """Register the data-driven per-layer techniques for a block of work; yield how their data was gathered.

    Raises:
        OptionError: Statistics are needed and there is neither training nor search data.
    """
    from compressor.techniques.registry import use_technique

    samples, source = (data.train, "train") if data.train is not None else (data.search, "search")
    if not (needs.kfac or needs.criterion is not None):
        yield None
        return
    if samples is None:
        raise needs.missing_data()
    record: dict[str, Any] = {"data": source, "seed": needs.seed}
    with ExitStack() as stack:
        if needs.kfac:
            stack.enter_context(use_technique(_hessian_technique(model, samples, needs.seed, log)))
            record.update(kfac_samples=min(KFAC_SAMPLES, len(samples)), labels="sampled")
        if needs.criterion is not None:
            from compressor.techniques.scores import weight_scores
            from compressor.techniques.sparsity import Sparsity

            log(f"scoring weights ({needs.criterion})")
            scores = weight_scores(model, needs.criterion, samples, seed=needs.seed)
            stack.enter_context(use_technique(Sparsity(scores)))
            record["criterion"] = needs.criterion
        yield record


def _hessian_technique(model: keras.Model, data: Dataset, seed: int, log: Log) -> Hessian:
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.hessian import Hessian, eigen_decompose, kfac_factors

    log("gathering K-FAC statistics")
    factors = kfac_factors(model, data, seed=seed, samples=KFAC_SAMPLES)
    layers = editable_layers(model)
    return Hessian({name: eigen_decompose(layers[name], factor) for name, factor in factors.items() if name in layers})

