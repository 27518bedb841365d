"""The default techniques (`--techniques auto`): low rank, with channel removal first where low rank cannot reach.

Low rank (`tucker`, which brings `svd`) edits the layers that hold most models' weights:
k×k and 1×1 convolutions, Dense, the pointwise part of separable convolutions,
recurrent kernels. Some models hold their params or FLOPs where it cannot go: grouped
convolutions (a ResNeXt block), attention (MultiHeadAttention's projections), layers it
leaves whole. Before any search, `resolve_techniques` prices every layer at its most
compressing low-rank option (`compressor.search.candidates.lowest_cost`: no
factorization, so it is quick) and adds the channel stage in front when that floor
is above the goal:

- a params or FLOPs budget (fixed_params): its limit — low rank alone cannot meet it;
- an accuracy budget: ACCURACY_GOAL of the FLOPs — whatever accuracy allows, low rank
  alone could not even halve the model's work.

Channels are added only when channel removal can narrow something and the metric is one
it measures (top-1 or agreement). The run's options, and so report.json's `options`,
carry the techniques chosen; a log line says why.
"""

from __future__ import annotations

import dataclasses

from compressor.pipeline import policy
from compressor.pipeline.channels import can_prune
from compressor.pipeline.context import RunContext
from compressor.techniques.registry import AUTO, AUTO_BASE

ACCURACY_GOAL = 0.5
"""Under an accuracy budget, channels join when low rank alone cannot keep less than this fraction of the FLOPs."""
CHANNEL_METRICS = ("top1", "agreement")
"""The metrics channel removal can be measured by (its search counts top-1 hits)."""


def resolve_techniques(ctx: RunContext) -> RunContext:
    """`ctx` with `--techniques auto` replaced by the techniques chosen for its model and budget (else unchanged)."""
    if tuple(ctx.options.techniques) != (AUTO,):
        return ctx
    chosen = choose_techniques(ctx)
    return dataclasses.replace(ctx, options=dataclasses.replace(ctx.options, techniques=chosen))


def choose_techniques(ctx: RunContext) -> tuple[str, ...]:
    """AUTO_BASE, or "channels" and AUTO_BASE when low rank alone cannot reach the goal (module docstring)."""
    if ctx.options.plan is not None or ctx.budget is None:  # a replay does what its plan says
        return AUTO_BASE
    from compressor.search.candidates import lowest_cost

    accuracy = policy.is_accuracy(ctx.budget)
    kind = "flops" if accuracy else ctx.budget.kind
    goal = ACCURACY_GOAL if accuracy else ctx.budget.limit
    lowest, baseline = lowest_cost(ctx.model, AUTO_BASE, kind)
    floor = lowest / baseline if baseline else 0.0
    if floor <= goal:
        return AUTO_BASE
    why = f"low rank alone keeps at least {floor:.3f} of the {kind}, above {goal:g}"
    if ctx.metric.name not in CHANNEL_METRICS:
        ctx.log(f"techniques: {','.join(AUTO_BASE)} ({why}; channel removal does not measure {ctx.metric.name})")
        return AUTO_BASE
    if not can_prune(ctx.model):
        ctx.log(f"techniques: {','.join(AUTO_BASE)} ({why}; no channel group of the model can be pruned)")
        return AUTO_BASE
    ctx.log(f"techniques: channels,{','.join(AUTO_BASE)} ({why}: channel removal goes first)")
    return ("channels", *AUTO_BASE)
