"""What the user asks the search for: an accuracy drop to stay within, or a cost to reach.

    Budget("accuracy_drop", 0.02)   lose at most 2 points of top-1 accuracy
    Budget("params", 0.5)           keep at most half of the parameters
    Budget("flops", 0.25)           keep at most a quarter of the FLOPs

For "params" and "flops" the limit is the fraction of the baseline that is KEPT, so
the achieved value is compressed / baseline and the budget is met when it is at most
the limit. For "accuracy_drop" the achieved value is baseline − compressed accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from compressor.errors import CompressorError

BUDGET_KINDS = ("accuracy_drop", "params", "flops")
COST_KINDS = ("params", "flops")
# Achieved values are ratios of integers; this absorbs float rounding at the limit.
_TOLERANCE = 1e-9

MARGIN = 0.75
"""Fraction of an accuracy budget a search may spend on its search data; the rest is kept for held-out noise.

A search that picks among many candidates by their accuracy on one split reports the best
of many noisy numbers: after a dozen looks the chosen candidate's search-data drop is
optimistic by about a point (measured: 1.7-2.4 points held-out drop for runs that had
accepted within 0.75 of a 1-2 point budget). The quarter kept back absorbs that."""


class BudgetError(CompressorError):
    """A budget that cannot mean anything (a fraction outside its range, an unknown kind)."""


@dataclass(frozen=True)
class Budget:
    """A compression budget.

    Attributes:
        kind: "accuracy_drop", "params" or "flops".
        limit: For "accuracy_drop", the largest drop of top-1 accuracy allowed, as a
            fraction in [0, 1) (0.02 = 2 points). For "params"/"flops", the fraction
            of the baseline kept, 0 < limit < 1 (0.5 = at most half).

        bounded: An "accuracy_drop" limit must be below 1 (a share of samples); False
            for a metric whose drop is in another unit (`metric_drop`: relative error
            increase, a hook's unit), where any finite limit >= 0 goes.

    Raises:
        BudgetError: An unknown kind, or a limit outside its range.
    """

    kind: str
    limit: float
    bounded: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"Invalid budget kind. Expected one of {BUDGET_KINDS}. Received: kind={self.kind!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)):
            raise BudgetError(f"Invalid budget limit. Expected a number. Received: limit={self.limit!r}")
        limit = float(self.limit)
        if self.kind == "accuracy_drop" and not self.bounded:
            if not (math.isfinite(limit) and limit >= 0.0):
                raise BudgetError(f"Invalid max metric loss. Expected a number >= 0. Received: max_metric_loss={self.limit}")
        elif self.kind == "accuracy_drop":
            if not (math.isfinite(limit) and 0.0 <= limit < 1.0):
                hint = f" (a fraction: use {limit / 100:g} for {limit:g} points)" if 1.0 <= limit < 100.0 else ""
                raise BudgetError(
                    f"Invalid max accuracy loss. Expected 0 <= L < 1{hint}. Received: max_acc_loss={self.limit}"
                )
        elif not (math.isfinite(limit) and 0.0 < limit < 1.0):
            raise BudgetError(
                f"Invalid compression factor. Expected 0 < F < 1. Received: compression_factor={self.limit}"
            )
        object.__setattr__(self, "limit", limit)

    @classmethod
    def accuracy_drop(cls, max_acc_loss: float) -> "Budget":
        """Lose at most `max_acc_loss` (a fraction) of top-1 accuracy."""
        return cls("accuracy_drop", max_acc_loss)

    @classmethod
    def metric_drop(cls, max_metric_loss: float) -> "Budget":
        """Lose at most `max_metric_loss` of a metric's score, in its unit (`compressor.metrics`)."""
        return cls("accuracy_drop", max_metric_loss, bounded=False)

    @classmethod
    def params(cls, compression_factor: float) -> "Budget":
        """Keep at most `compression_factor` of the parameters."""
        return cls("params", compression_factor)

    @classmethod
    def flops(cls, compression_factor: float) -> "Budget":
        """Keep at most `compression_factor` of the FLOPs."""
        return cls("flops", compression_factor)

    @property
    def is_cost(self) -> bool:
        """Whether the budget is on params or FLOPs (data-free) rather than on accuracy."""
        return self.kind in COST_KINDS

    def target(self, baseline: int) -> int:
        """The largest params/FLOPs count that meets a cost budget, for a baseline count.

        Raises:
            BudgetError: Called on an accuracy budget.
        """
        if not self.is_cost:
            raise BudgetError(f"an {self.kind} budget has no cost target")
        return int(math.floor(self.limit * baseline + _TOLERANCE))

    def met(self, achieved: float) -> bool:
        """Whether an achieved value (see `achieved_fraction`, `achieved_drop`) meets the budget."""
        return achieved <= self.limit + _TOLERANCE

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "limit": self.limit}


def achieved_fraction(value: int, baseline: int) -> float:
    """The fraction of a baseline cost kept (the achieved value of a params/flops budget)."""
    return value / baseline if baseline else 0.0


def achieved_drop(baseline_accuracy: float, accuracy: float) -> float:
    """The accuracy lost (the achieved value of an accuracy_drop budget); negative when it rose."""
    return baseline_accuracy - accuracy
