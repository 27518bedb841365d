"""What a channel search is given and returns: its settings, its steps and its result (`compressor.search.channel_search`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import keras

from compressor.errors import CompressorError
from compressor.search.result import Trial
from compressor.surgery.plan import ChannelRemoval

if TYPE_CHECKING:
    from compressor.finetune import FinetuneConfig

GUARD_CHANCE = 0.8  # default: with a guard, a step holds when the guard can be expected to accept it with this chance


@dataclass(frozen=True)
class ChannelSettings:
    """How channels are chosen and recovered.

    Attributes:
        criterion: Importance score (`compressor.techniques.scores.CRITERIA`).
        max_fraction: Most of a group's channels that may go, in (0, 1).
        step: Each progressive step keeps this fraction of the current FLOPs, in (0, 1).
        finetune: Fine-tuning after each step (None: none).
        objective: "flops" or "params": what an accuracy-budget search lowers.
        seed: Seed of scores that sample data.
        confidence: Under an accuracy budget, a step holds when its paired drop on the
            search data is within the budget with this one-sided confidence
            (`compressor.search.confidence`); None: when its measured drop is within
            MARGIN of the budget.
        guard_samples: With `confidence`, the size of the guard that will be shown each
            step: a step holds when a guard of this many samples would accept it with a
            chance of at least `guard_chance` (`compressor.search.confidence.guard_chance`).
            None: when the search data's own bound is within the budget.
        guard_chance: With `guard_samples`, the chance of acceptance a step needs, in
            (0, 1): higher shows the guard only safer steps (its first rejection ends the
            search) at the cost of more fine-tuning runs and smaller steps.
        multiple: Each group left wider than this keeps a multiple of it, the tile the
            target runtime computes channels in (`compressor.search.channels.aligned_removals`);
            1: any count.
    """

    criterion: str = "magnitude"
    max_fraction: float = 0.9
    step: float = 0.5
    finetune: Optional[FinetuneConfig] = None
    objective: str = "flops"
    seed: int = 0
    confidence: Optional[float] = None
    guard_samples: Optional[int] = None
    guard_chance: float = GUARD_CHANCE
    multiple: int = 1

    def __post_init__(self) -> None:
        from compressor.techniques.scores import CRITERIA

        if self.criterion not in CRITERIA:
            raise CompressorError(f"Invalid criterion. Expected one of {CRITERIA}. Received: criterion={self.criterion!r}")
        for name in ("max_fraction", "step", "guard_chance"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise CompressorError(f"Invalid {name}. Expected 0 < {name} < 1. Received: {name}={value}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise CompressorError(f"Invalid multiple. Expected an integer >= 1. Received: multiple={self.multiple!r}")
        if self.objective not in ("flops", "params"):
            raise CompressorError(f"Invalid objective. Expected one of ('flops', 'params'). Received: objective={self.objective!r}")


@dataclass(frozen=True)
class ChannelStep:
    """One progressive step: what it aimed at, what it reached, whether it was kept."""

    target: float  # fraction of the baseline objective cost aimed at
    params: int
    flops: int
    accuracy: Optional[float]
    epochs: int
    accepted: bool
    seconds: float
    guard_chance: Optional[float] = None  # with a guard, the chance it would accept the step at its first check
    recovery: int = 0  # recovery runs after the last miss (`compressor.search.channel_search`)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ChannelResult:
    """The pruned (and fine-tuned) model and how it was reached.

    Attributes:
        model: The pruned model (fine-tuned when fine-tuning was asked for).
        removals: Channel removals of the original model's groups.
        blocked: (group, reason) of the groups left whole.
        blocked_layers: (layer, reason) of the layers with weights none of whose
            channels could go (`ChannelAnalysis.blocked_layers`), in graph order.
        params, flops: Cost of `model`.
        baseline_params, baseline_flops: Cost of the original.
        baseline_accuracy, accuracy: On the search data (None without labelled data).
        steps: The progressive steps, in order.
        epochs: Fine-tuning epochs spent, over all steps.
        finetune_steps: Fine-tuning optimizer steps taken, over all steps.
        evaluations: Whole-model accuracy evaluations on the search data.
        seconds: Wall time.
        trials: Each pruned model the search measured (after its fine-tuning), in
            order; the one returned is chosen. When no step was kept, the original
            model comes first, chosen.
        stopped: Why the search ended before its own end: "time limit" (the deadline
            left no room for another step), "guard" (the run's guard rejected a step that
            held on the search data; nothing after it could be accepted), else None.
    """

    model: keras.Model
    removals: tuple[ChannelRemoval, ...]
    blocked: list[tuple[str, str]]
    params: int
    flops: int
    baseline_params: int
    baseline_flops: int
    baseline_accuracy: Optional[float] = None
    accuracy: Optional[float] = None
    steps: list[ChannelStep] = field(default_factory=list)
    epochs: int = 0
    finetune_steps: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    trials: tuple[Trial, ...] = ()
    blocked_layers: list[tuple[str, str]] = field(default_factory=list)
    stopped: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups_pruned": sum(1 for removal in self.removals if removal.remove),
            "channels_removed": sum(len(removal.remove) for removal in self.removals),
            "groups_blocked": [{"group": name, "reason": reason} for name, reason in self.blocked],
            "layers_blocked": [{"layer": name, "reason": reason} for name, reason in self.blocked_layers],
            "params": self.params,
            "flops": self.flops,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy": self.accuracy,
            "finetune_epochs": self.epochs,
            "evaluations": self.evaluations,
            "steps": [step.to_dict() for step in self.steps],
            "trials": [trial.to_dict() for trial in self.trials],
            "seconds": round(self.seconds, 3),
            "stopped": self.stopped,
        }
