"""The fine-tuning stage: train the rewritten model with the original as teacher.

Runs after the per-layer edits when `finetune_epochs` asks for it (the channel search
fine-tunes between its own steps). Under an accuracy budget it stops early once the
search data is within a quarter of the budget (`policy.finetune_target`). Kernels the
plan masks by magnitude are pruned gradually instead (tfmot's PolynomialDecay
schedule, from dense to the planned density over the first 60% of the steps), which
recovers more than fine-tuning a one-shot mask; other zeros (masks by another
criterion, sparse residual branches) stay fixed.

The plan records every epoch and every optimizer step of the run (channel steps
included), the cap on steps per run (`finetune_steps`) and the seed; a replay
fine-tunes that many epochs at once, cut off at that many steps, with the recorded
seed. Plans written before steps were recorded replay their epochs whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional

from compressor.errors import OptionError
from compressor.pipeline import policy
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.records import FinetuneRecord, LayerRecord, step_tuning
from compressor.surgery.plan import LayerEdit, Plan

CHECKS_PER_RUN = 4
"""With `finetune_steps` N, a search's fine-tuning checks the search data every ceil(N / 4) steps as well
(not after its last step: the search measures each step itself right after)."""

if TYPE_CHECKING:
    from compressor.config import CompressOptions
    from compressor.finetune import FinetuneConfig, FinetuneResult


def finetune_config(options: CompressOptions) -> Optional[FinetuneConfig]:
    """How each fine-tuning run of a search trains (None: `finetune_epochs` is 0)."""
    if not options.finetune_epochs:
        return None
    from compressor.finetune import FinetuneConfig

    steps = options.finetune_steps
    return FinetuneConfig(epochs=options.finetune_epochs, seed=options.seed, max_steps=steps, distribute=options.distribute,
                          learning_rate=options.finetune_lr,
                          check_every=None if steps is None else math.ceil(steps / CHECKS_PER_RUN))


class FinetuneStage:
    """Search: fine-tune after the per-layer edits. Replay: fine-tune the recorded epochs."""

    name = "finetune"

    def check(self, ctx: RunContext, record: Optional[FinetuneRecord]) -> None:
        """A fine-tuned plan cannot be replayed without training data."""
        if record is not None and record.entry and ctx.data.train is None:
            raise OptionError("{path} was fine-tuned ({epochs} epochs): pass {train_data} to replay it",
                              path=ctx.options.plan, epochs=record.entry.get("epochs"))

    def search(self, ctx: RunContext, run: Run) -> FinetuneRecord:
        layers = run.record(LayerRecord)
        result = None
        if ctx.options.finetune_epochs and layers is not None and layers.edits:
            result = _finetune(ctx, run, layers.edits)
        epochs, steps = step_tuning(run.records)
        epochs += result.epochs_run if result is not None else 0
        steps += result.steps if result is not None else 0
        return FinetuneRecord(plan_entry(ctx.options, epochs, steps), result)

    def recorded(self, plan: Plan) -> Optional[FinetuneRecord]:
        return FinetuneRecord(plan.finetune) if plan.finetune is not None else None

    def replay(self, ctx: RunContext, run: Run, record: FinetuneRecord) -> FinetuneRecord:
        if not record.entry:
            return record
        from compressor.finetune import FinetuneConfig, finetune, fixed_masks

        entry = record.entry
        steps = int(entry["steps"]) if entry.get("steps") is not None else None
        config = FinetuneConfig(epochs=int(entry["epochs"]), seed=int(entry.get("seed", ctx.options.seed)),
                                max_steps=steps, distribute=ctx.options.distribute,
                                learning_rate=float(entry.get("learning_rate", FinetuneConfig.learning_rate)))
        ctx.log(f"fine-tuning {config.epochs} epoch(s)" + (f", {steps} step(s)" if steps else "") + ", as the plan records")
        result = finetune(run.compressed, ctx.model, ctx.data.train, config, masks=fixed_masks(run.compressed),
                          on_step=lambda done, total: ctx.progress("fine-tuning", done, total))
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
    cap = f", {options.finetune_steps} step(s)" if options.finetune_steps else ""
    ctx.log(f"fine-tuning up to {options.finetune_epochs} epoch(s){cap}")
    return finetune(
        run.compressed, ctx.model, ctx.data.train, finetune_config(options),
        teacher_outputs=ctx.teacher_outputs() if ctx.data.train is not None else None,
        val=search,
        target_accuracy=target,
        masks={name: mask for name, mask in fixed_masks(run.compressed).items() if name not in gradual},
        sparsity=GradualSparsity(targets=gradual) if gradual else None,
        on_step=lambda done, total: ctx.progress("fine-tuning", done, total),
    )


def plan_entry(options: CompressOptions, epochs: int, steps: int) -> Optional[dict[str, Any]]:
    """The plan's "finetune" for a run that fine-tuned `epochs` epochs and `steps` optimizer steps in all (None: none)."""
    if not epochs:
        return None
    return {"epochs": epochs, "epochs_per_run": options.finetune_epochs, "steps": steps,
            "steps_per_run": options.finetune_steps, "learning_rate": options.finetune_lr, "teacher": "original",
            "seed": options.seed}
