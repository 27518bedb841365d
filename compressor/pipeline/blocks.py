"""The block stage: remove whole residual blocks, first (`--techniques blocks`).

Runs when the techniques include "blocks", under an accuracy budget
(`compressor.search.block_search` searches). When channels follow, blocks may spend
half the budget and half of the time left under `--time-limit` (`BLOCK_SHARE`), and the
channel search narrows the model without them, its accuracy still measured against the
original. A replay removes the recorded
blocks of the original model again.
"""

from __future__ import annotations

import time
from typing import Optional

from compressor.pipeline.channels import judged_top1
from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.finetuning import finetune_config
from compressor.pipeline.records import BlockRecord
from compressor.surgery.plan import Plan

BLOCK_SHARE = 0.5
"""The part of an accuracy budget (and of the time left) blocks may spend when channels are removed after them."""


class BlockStage:
    """Search: `search_blocks`. Replay: `remove_blocks` with the recorded names."""

    name = "blocks"

    def check(self, ctx: RunContext, record: Optional[BlockRecord]) -> None:
        """Nothing to refuse here: the options refuse blocks without fixed_loss (`CompressOptions`)."""

    def search(self, ctx: RunContext, run: Run) -> Optional[BlockRecord]:
        from compressor.search.block_search import BlockSettings, search_blocks

        options = ctx.options
        if "blocks" not in options.techniques:
            return None
        guard = ctx.data.guard
        settings = BlockSettings(
            finetune=finetune_config(options),
            share=BLOCK_SHARE if "channels" in options.techniques else 1.0,
            confidence=options.confidence if guard is not None else None,
            guard_samples=len(guard) if guard is not None else None,
            guard_chance=options.guard_chance,
        )
        ctx.log("removing residual blocks")
        deadline = ctx.deadline
        if deadline is not None and "channels" in options.techniques:
            now = time.perf_counter()
            deadline = now + max(deadline - now, 0.0) * BLOCK_SHARE
        result = search_blocks(ctx.model, ctx.budget, settings, ctx.data.search, ctx.data.train, ctx.log, ctx.progress,
                               accept=run.accepts if run.acceptance is not None else None, deadline=deadline,
                               judge=judged_top1(run), teacher_outputs=ctx.teacher_outputs)
        run.working = run.compressed = result.model
        return BlockRecord(result.removed, result)

    def recorded(self, plan: Plan) -> Optional[BlockRecord]:
        return BlockRecord(plan.blocks) if plan.blocks else None

    def replay(self, ctx: RunContext, run: Run, record: BlockRecord) -> BlockRecord:
        from compressor.techniques.blocks import remove_blocks

        run.working = run.compressed = remove_blocks(ctx.model, record.removed)
        return record
