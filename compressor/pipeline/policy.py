"""How one budget is shared between the stages of a run: pure functions of numbers (no TensorFlow).

- Cost budgets (params, FLOPs). Channel removal and the per-layer techniques multiply:
  keeping a fraction c of the cost by channels and then l of what is left keeps c·l.
  When both run, channels aim at the square root of the budget (`channel_budget`), and
  the per-layer search gets what is left after the channels actually removed
  (`remaining_budget`: limit · baseline / pruned cost), or nothing when channels already
  met it.
- Accuracy budgets. The stages search on the selection split; what they keep is then
  accepted or refused on the guard split with a confidence bound
  (`compressor.pipeline.acceptance`), which is what makes the budget hold on new data.
  On the selection split, channel steps hold when their bound is within the budget;
  the per-layer search, which compares counts, spends MARGIN of the budget
  (`compressor.search.budgets.MARGIN`) less what channel removal lost
  (`remaining_budget`), so that what it chooses has a fair chance at the guard.
- Fine-tuning stops early once the search data is within a quarter of the budget of
  the original (`finetune_target`): more epochs would cost time for little.
- Gating comes on top of the static stages, which spend the budget as they would alone:
  the gated model must stay within MARGIN of the budget of the ORIGINAL on the search
  data (`gating_floor`), so gating spends what the static stages left, and training the
  network with the gates wins some back.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from compressor.search.budgets import MARGIN, Budget

CONTINUOUS_SHARE = 0.5
"""Share of the budget the per-layer search may spend on the selection split under a metric with
per-sample values (mse, mae, a hook): the rest is for the guard's bound, whose width is measured."""
FINETUNE_STOP_SHARE = 0.25
"""Fine-tuning stops once the search-data drop is within this share of an accuracy budget."""


class Cost(NamedTuple):
    """A model's params and FLOPs."""

    params: int
    flops: int

    def of(self, kind: str) -> int:
        """The count a cost budget of `kind` ("params" or "flops") is on."""
        return self.params if kind == "params" else self.flops


def is_accuracy(budget: Optional[Budget]) -> bool:
    """Whether the budget is on accuracy (measured on data) rather than on cost."""
    return budget is not None and budget.kind == "accuracy_drop"


def channel_budget(budget: Budget, layer_stage: bool) -> Budget:
    """The budget the channel search aims at: the square root of a cost budget when per-layer techniques follow.

    Args:
        budget: The run's budget.
        layer_stage: Whether per-layer techniques run after channel removal.
    """
    if budget.kind != "accuracy_drop" and layer_stage:
        return Budget(budget.kind, budget.limit ** 0.5)
    return budget


def channel_objective(budget: Budget, budget_on: str) -> str:
    """What the channel search lowers: the cost a cost budget is on; FLOPs (speed) under an accuracy budget."""
    return budget_on if budget.kind != "accuracy_drop" else "flops"


def remaining_budget(budget: Budget, channel_drop: Optional[float], baseline: Cost, pruned: Cost,
                     guard: Optional[Guard] = None) -> Optional[Budget]:
    """The budget left for the per-layer search after channel removal; None when nothing is left.

    Args:
        budget: The run's budget.
        channel_drop: Accuracy the channel removal lost on the search data (an accuracy
            budget; negative when it rose). None when no channel was removed.
        baseline: Cost of the original model.
        pruned: Cost of the model without its removed channels.
        guard: The run's guard (an accuracy budget accepted on a guard split): the
            search then aims at what the guard can confirm (`layer_allowance`).
    """
    if budget.kind == "accuracy_drop":
        allowance = layer_allowance(budget, guard) if guard is not None else MARGIN * budget.limit
        left = allowance - max(channel_drop or 0.0, 0.0)
        return dataclasses.replace(budget, limit=left) if left > 0 else None
    fraction = budget.limit * baseline.of(budget.kind) / max(pruned.of(budget.kind), 1)
    return Budget(budget.kind, fraction) if fraction < 1.0 else None


class Guard(NamedTuple):
    """The guard split's size and the confidence it accepts at."""

    samples: int
    confidence: float
    binary: bool = True  # the metric's per-sample scores are right or wrong (`compressor.metrics`)


def layer_allowance(budget: Budget, guard: Guard) -> float:
    """The drop the per-layer search may spend on the selection split: the largest the guard can confirm.

    The per-layer search compares counts, not bounds; aiming at the drop a guard of this
    size confirms for a candidate that only loses (`confirmable_drop`) keeps it from
    choosing plans that the guard then rejects whole.
    """
    from compressor.search.confidence import confirmable_drop

    if not guard.binary:
        # Per-sample values: the guard's bound is as wide as the candidate's differences
        # are spread, which no count predicts before it measures; half the budget is left for it.
        return CONTINUOUS_SHARE * budget.limit
    return confirmable_drop(budget.limit, guard.samples, guard.confidence)


def finetune_target(baseline_accuracy: float, budget: Budget) -> float:
    """The search-data accuracy at which fine-tuning under an accuracy budget may stop early."""
    return baseline_accuracy - budget.limit * FINETUNE_STOP_SHARE


def gating_floor(baseline_accuracy: float, budget: Budget) -> float:
    """The lowest search-data accuracy a gated model may have under an accuracy budget."""
    return baseline_accuracy - MARGIN * budget.limit
