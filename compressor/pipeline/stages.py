"""The model stages and the two ways through them: a search, and the replay of a plan.

A model stage is a small protocol (`ModelStage`): `search` finds what to do, applies it
to the run's models and returns its record; `recorded` reads that record back from a
plan; `replay` applies a record again. The plan is made of the records' fields
(`Run.plan`), so a replay reads exactly what the search wrote, and both go through the
same stages in the same order:

    blocks → channels → per-layer techniques → fine-tuning → acceptance → gating → early exits

Under an accuracy budget the run's guard (`compressor.pipeline.acceptance`) accepts
each model a stage keeps, in that order. With early exits to follow, the static stages
(all but the dynamic ones) search with part of the budget and of the time
(`compressor.pipeline.early_exit.static_context`).

Adding a stage: a class with these four methods and a record with `plan_fields`, put
in STAGES at its place.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Protocol, TypeVar

from compressor.pipeline.acceptance import Acceptance, AcceptStage
from compressor.pipeline.blocks import BlockStage
from compressor.pipeline.channels import ChannelStage
from compressor.pipeline.context import Run, RunContext, StageRecord
from compressor.pipeline.early_exit import ExitStage, static_context
from compressor.pipeline.finetuning import FinetuneStage
from compressor.pipeline.gating import GatingStage
from compressor.pipeline.layers import LayerStage
from compressor.surgery.plan import Plan

R = TypeVar("R", bound=StageRecord)


class ModelStage(Protocol[R]):
    """One stage that changes the model, searching or replaying."""

    name: str

    def check(self, ctx: RunContext, record: Optional[R]) -> None:
        """Refuse, before any stage spends time, what would fail later.

        Args:
            ctx: The run.
            record: The plan's record of this stage when replaying; None before a search.

        Raises:
            CompressorError: What the user must change.
        """

    def search(self, ctx: RunContext, run: Run) -> Optional[R]:
        """Search, apply the result to `run`'s models, and return the record (None: the stage was not asked for)."""

    def recorded(self, plan: Plan) -> Optional[R]:
        """This stage's record in a plan (None: the plan has none)."""

    def replay(self, ctx: RunContext, run: Run, record: R) -> R:
        """Apply `record` to `run`'s models; return it, with what the replay measured."""


STAGES: tuple[ModelStage[Any], ...] = (
    BlockStage(), ChannelStage(), LayerStage(), FinetuneStage(), AcceptStage(), GatingStage(), ExitStage(),
)
"""The model stages, in the order they run."""


def search(ctx: RunContext) -> Run:
    """Run every stage's search on the original model, in order."""
    from compressor.search.result import model_identity

    for stage in STAGES:
        stage.check(ctx, None)
    run = Run(working=ctx.model, compressed=ctx.model, acceptance=Acceptance.for_run(ctx))
    static = static_context(ctx)
    for stage in STAGES:
        started = time.perf_counter()
        record = stage.search(ctx if getattr(stage, "dynamic", False) else static, run)
        run.seconds[stage.name] = time.perf_counter() - started
        if record is not None:
            run.records.append(record)
    run.identity = model_identity(ctx.model)
    return run


def replay(ctx: RunContext, plan: Plan) -> Run:
    """Replay every stage the plan records, in order, on the original model."""
    recorded = [(stage, stage.recorded(plan)) for stage in STAGES]
    for stage, record in recorded:
        if record is not None:
            stage.check(ctx, record)
    run = Run(working=ctx.model, compressed=ctx.model, identity=dict(plan.model))
    for stage, record in recorded:
        started = time.perf_counter()
        if record is not None:
            run.records.append(stage.replay(ctx, run, record))
        run.seconds[stage.name] = time.perf_counter() - started
    return run
