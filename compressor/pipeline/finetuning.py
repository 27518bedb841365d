"""The fine-tuning stage: train the rewritten model with the original as teacher.

Runs after the per-layer edits when `finetune_epochs` asks for it (the channel search
fine-tunes between its own steps). Under an accuracy budget it stops early once the
search data is within a quarter of the budget (`policy.finetune_target`). Kernels the
plan masks by magnitude are pruned gradually instead (tfmot's PolynomialDecay
schedule, from dense to the planned density over the first 60% of the steps), which
recovers more than fine-tuning a one-shot mask; other zeros (masks by another
criterion, sparse residual branches) stay fixed.

The plan records every epoch of the run (channel steps included) and the seed; a
replay fine-tunes that many epochs at once, with the recorded seed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.records import ChannelRecord, FinetuneRecord, LayerRecord
from compressor.surgery.plan import LayerEdit, Plan

if TYPE_CHECKING:
    from compressor.config import CompressOptions
    from compressor.finetune import FinetuneConfig, FinetuneResult


def finetune_config(options: CompressOptions) -> Optional[FinetuneConfig]:
    """How each fine-tuning run of a search trains (None: `finetune_epochs` is 0)."""
    if not options.finetune_epochs:
        return None
    from compressor.finetune import FinetuneConfig

    return FinetuneConfig(epochs=options.finetune_epochs, seed=options.seed)


class FinetuneStage:
    """Search: fine-tune after the per-layer edits. Replay: fine-tune the recorded epochs."""

    name = "finetune"

    def check(self, ctx: RunContext, record: Optional[FinetuneRecord]) -> None:
        """A fine-tuned plan cannot be replayed without training data."""
        if record is not None and record.entry and ctx.data.train is None:
            raise OptionError("{path} was fine-tuned ({epochs} epochs): pass {train_data} to replay it",
                              path=ctx.options.plan, epochs=record.entry.get("epochs"))

    def search(self, ctx: RunContext, run: Run) -> FinetuneRecord:
        layers, channels = run.record(LayerRecord), run.record(ChannelRecord)
        result = None
        if ctx.options.finetune_epochs and layers is not None and layers.edits:
            result = _finetune(ctx, run, layers.edits)
        epochs = (channels.epochs if channels is not None else 0) + (result.epochs_run if result is not None else 0)
        return FinetuneRecord(plan_entry(ctx.options, epochs), result)

    def recorded(self, plan: Plan) -> Optional[FinetuneRecord]:
        return FinetuneRecord(plan.finetune) if plan.finetune is not None else None

    def replay(self, ctx: RunContext, run: Run, record: FinetuneRecord) -> FinetuneRecord:
        if not record.entry:
            return record
        from compressor.finetune import FinetuneConfig, finetune, fixed_masks

        config = FinetuneConfig(epochs=int(record.entry["epochs"]), seed=int(record.entry.get("seed", ctx.options.seed)))
        ctx.log(f"fine-tuning {config.epochs} epoch(s), as the plan records")
        result = finetune(run.compressed, ctx.model, ctx.data.train, config, masks=fixed_masks(run.compressed))
        return dataclasses.replace(record, result=result)


def _finetune(ctx: RunContext, run: Run, edits: tuple[LayerEdit, ...]) -> FinetuneResult:
    """Fine-tune `run.compressed` in place, distilling the original (module docstring)."""
    from compressor.finetune import GradualSparsity, accuracy, finetune, fixed_masks
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.registry import DEFAULT_REGISTRY

    options = ctx.options
    targets = {edit.layer: DEFAULT_REGISTRY[edit.technique].gradual_target(edit, options.criterion) for edit in edits}
    gradual = {layer: target for layer, target in targets.items() if target is not None}
    if gradual:  # pruned step by step, from the dense weights
        dense, sparse = editable_layers(run.working), editable_layers(run.compressed)
        for name in gradual:
            sparse[name].set_weights(dense[name].get_weights())
    search = ctx.data.labelled_search
    target = None
    if policy.is_accuracy(ctx.budget) and search is not None:
        target = policy.finetune_target(accuracy(ctx.model, search), ctx.budget)
    ctx.log(f"fine-tuning up to {options.finetune_epochs} epoch(s)")
    return finetune(
        run.compressed, ctx.model, ctx.data.train, finetune_config(options),
        val=search,
        target_accuracy=target,
        masks={name: mask for name, mask in fixed_masks(run.compressed).items() if name not in gradual},
        sparsity=GradualSparsity(targets=gradual) if gradual else None,
        on_epoch=lambda epoch, epochs, _entry: ctx.progress("fine-tuning", epoch, epochs),
    )


def plan_entry(options: CompressOptions, epochs: int) -> Optional[dict[str, Any]]:
    """The plan's "finetune" for a run that fine-tuned `epochs` epochs in all (None: none)."""
    if not epochs:
        return None
    return {"epochs": epochs, "epochs_per_run": options.finetune_epochs, "teacher": "original", "seed": options.seed}
