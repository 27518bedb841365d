"""Block removal under an accuracy budget: take out whole residual blocks while the accuracy holds.

Each identity residual block (`compressor.techniques.blocks`) is scored by what removing
it alone costs on the search data, per FLOP it saves; the cheapest go first. The search
then removes them in that order, several at a time: a step takes the next `size` blocks
out of the current model, fine-tunes it (distilled from the original) and checks it as
the channel search checks its steps (`compressor.search.confidence.step_holds`: the
guard can be expected to accept it with the settings' chance, on the file the guard
judges when `judge` is given). A step that holds is shown to `accept` (the run's guard);
its first rejection ends the search. The first step takes the blocks whose removal alone
costs nothing on the search data, or one block when none does; a step that holds is
followed by one with twice as many (fewer than the last step that missed), a step that
misses is retried with half as many; a single block that misses is passed over (the next
one may hold), and `MISSES` of those end the search.

Why grow from one rather than start at half the blocks: what several blocks cost together
after fine-tuning is not the sum of what each costs alone, and a step that misses costs a
whole fine-tuning run. Where only one or two blocks can go (a Fashion-MNIST ResNet-20 at
2 points: three blocks together missed on every seed, at about 2.5 minutes each), starting
at half spends the stage's time on steps too large to hold; growing from one reaches the
blocks that can go in as many steps as they take to double.

With a deadline, no step begins that is expected to end after it (a step is expected to
take as long as the longest so far). When channels follow, the stage gets half of the
time left (`compressor.pipeline.blocks`), so that blocks, which take a fine-tuning run
each, do not leave the channel search without time.

The blocks may spend `share` of the budget: when channels are removed after them, the
rest is left to the channel search (a block costs accuracy in one piece, channels in
small ones, so blocks take only what is cheap).

Why blocks at all when channels reach the same FLOPs: a block removed takes its
convolutions, normalizations and activations out of the artifact, and at small FLOPs
an edge runtime's time goes to running layers more than to multiplying, so the file
gets faster where a narrower one would not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from compressor.errors import OptionError
from compressor.io.data import Dataset
from compressor.search.budgets import Budget, BudgetError
from compressor.search.channel_search import GUARD_CHANCE
from compressor.search.confidence import step_holds

if TYPE_CHECKING:
    import keras

    from compressor.finetune import FinetuneConfig

Log = Callable[[str], None]
MISSES = 2  # single blocks passed over before the search stops


@dataclass(frozen=True)
class BlockSettings:
    """How blocks are removed.

    Attributes:
        finetune: Fine-tuning after each step (None: none, blocks are checked as cut).
        share: The part of the budget blocks may spend, in (0, 1].
        confidence, guard_samples, guard_chance: As `ChannelSettings`'s: when a step
            holds on the search data.
    """

    finetune: Optional[FinetuneConfig] = None
    share: float = 1.0
    confidence: Optional[float] = None
    guard_samples: Optional[int] = None
    guard_chance: float = GUARD_CHANCE


@dataclass(frozen=True)
class BlockCandidate:
    """One removable block: what removing it alone costs, on the search data, and saves."""

    block: str
    drop: float
    flops: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "drop_alone": self.drop, "flops": self.flops, "params": self.params}


@dataclass(frozen=True)
class BlockStep:
    """One step: the blocks it took out, the search-data accuracy after fine-tuning, the verdict."""

    blocks: tuple[str, ...]
    accuracy: float
    epochs: int
    accepted: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "accuracy": self.accuracy, "epochs": self.epochs,
                "accepted": self.accepted, "seconds": self.seconds}


@dataclass
class BlockResult:
    """What the block search did; `model` is the result (the original when nothing was removed)."""

    model: Any
    removed: tuple[str, ...]
    candidates: list[BlockCandidate]
    steps: list[BlockStep] = field(default_factory=list)
    baseline: tuple[int, int] = (0, 0)  # params, flops
    cost: tuple[int, int] = (0, 0)
    baseline_accuracy: Optional[float] = None
    accuracy: Optional[float] = None
    share: float = 1.0
    epochs: int = 0
    finetune_steps: int = 0
    seconds: float = 0.0
    stopped: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": list(self.removed),
            "candidates": [candidate.to_dict() for candidate in self.candidates],
            "steps": [step.to_dict() for step in self.steps],
            "params": self.cost[0], "flops": self.cost[1],
            "baseline_params": self.baseline[0], "baseline_flops": self.baseline[1],
            "baseline_accuracy": self.baseline_accuracy, "accuracy": self.accuracy,
            "budget_share": self.share, "finetune_epochs": self.epochs,
            "seconds": round(self.seconds, 3), "stopped": self.stopped,
        }


def search_blocks(
    model: keras.Model,
    budget: Budget,
    settings: BlockSettings,
    search_data: Dataset,
    train_data: Optional[Dataset] = None,
    log: Optional[Log] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    accept: Optional[Callable[[str, keras.Model], bool]] = None,
    deadline: Optional[float] = None,
    judge: Optional[Callable[[keras.Model, Dataset], np.ndarray]] = None,
    teacher_outputs: Optional[Callable[[], np.ndarray]] = None,
) -> BlockResult:
    """Remove residual blocks of `model` while its accuracy holds (module docstring).

    Args: as `compressor.search.channel_search.search_channels`'s; `budget` is an
    accuracy budget.

    Raises:
        BudgetError: Not an accuracy budget, or no labelled search data.
        OptionError: Fine-tuning without training data.
    """
    from compressor.graph.cost import model_cost
    from compressor.search.evaluate import correct_predictions
    from compressor.techniques.blocks import removable_blocks, remove_blocks

    if budget.kind != "accuracy_drop" or search_data is None or search_data.y is None:
        raise BudgetError("block removal needs an accuracy budget and labelled search data")
    tuning = settings.finetune is not None and settings.finetune.epochs > 0
    if tuning and train_data is None:
        raise OptionError("fine-tuning needs training data: pass {train_data}")
    log = log or (lambda message: None)
    started = time.perf_counter()
    cost = model_cost(model)
    baseline_correct = correct_predictions(model, search_data)
    baseline_accuracy = float(baseline_correct.mean())
    result = BlockResult(model, (), [], baseline=(cost.params, cost.flops), cost=(cost.params, cost.flops),
                         baseline_accuracy=baseline_accuracy, accuracy=baseline_accuracy, share=settings.share)
    candidates = []
    for block in removable_blocks(model):
        alone = remove_blocks(model, [block.add])
        saved = model_cost(alone)
        drop = baseline_accuracy - float(correct_predictions(alone, search_data).mean())
        candidates.append(BlockCandidate(block.add, drop, cost.flops - saved.flops, cost.params - saved.params))
    candidates.sort(key=lambda c: (max(c.drop, 0.0) / max(c.flops, 1), -c.flops))
    result.candidates = candidates
    if not candidates:
        log("blocks: the model has no identity residual block to remove")
        return _finished(result, started)
    limit = settings.share * budget.limit
    log(f"blocks: {len(candidates)} removable, cheapest first: "
        + ", ".join(f"{c.block} ({c.drop:+.4f} alone)" for c in candidates))
    teacher: list[np.ndarray] = []

    def checked(candidate: keras.Model) -> np.ndarray:
        return np.asarray(judge(candidate, search_data), dtype=bool) if judge is not None \
            else correct_predictions(candidate, search_data)

    def finetuned(candidate: keras.Model) -> int:
        from compressor.distillation import teacher_predictions
        from compressor.finetune import finetune

        if not tuning:
            return 0
        if not teacher:
            teacher.append(teacher_outputs() if teacher_outputs is not None else teacher_predictions(model, train_data.x))
        outcome = finetune(candidate, None, train_data, settings.finetune, val=search_data,
                           target_accuracy=baseline_accuracy - limit / 4, teacher_outputs=teacher[0],
                           on_step=lambda done, total: (progress or (lambda *a: None))("fine-tuning", done, total),
                           measure_last=False)  # checked right after
        result.epochs += outcome.epochs_run
        result.finetune_steps += outcome.steps
        return outcome.epochs_run

    pending = [c.block for c in candidates]
    free = sum(1 for c in candidates if c.drop <= 0)  # blocks that cost nothing alone go together
    size, misses, current = max(1, free), 0, model
    ceiling = len(pending)  # fewer blocks than the last step that missed
    while pending:
        longest = max((step.seconds for step in result.steps), default=0.0)
        if deadline is not None and deadline - time.perf_counter() <= longest:
            result.stopped = "time limit"
            log("blocks: the time limit leaves less than a step takes: keeping what was removed")
            break
        taking = tuple(pending[:size])
        step_started = time.perf_counter()
        candidate = remove_blocks(current, taking)
        epochs = finetuned(candidate)
        correct = checked(candidate)
        accuracy = float(correct.mean())
        holds = step_holds(baseline_correct, correct, limit, settings)
        accepted = holds and (accept is None or accept(f"blocks, {len(result.removed) + len(taking)} removed", candidate))
        seconds = round(time.perf_counter() - step_started, 3)
        result.steps.append(BlockStep(taking, accuracy, epochs, accepted, seconds))
        log(f"blocks: without {', '.join(taking)}: accuracy {accuracy:.4f}, {epochs} epochs, "
            f"{'kept' if accepted else 'rejected'}")
        if holds and not accepted:
            result.stopped = "guard"
            break
        if accepted:
            current, result.removed, result.accuracy = candidate, result.removed + taking, accuracy
            pending = pending[len(taking):]
            size = max(1, min(2 * size, ceiling, len(pending)))  # it held: twice as many, fewer than what missed
            continue
        if size > 1:
            ceiling, size = size - 1, size // 2
            continue
        pending, misses = pending[1:], misses + 1
        if misses == MISSES:
            break
    result.model = current
    after = model_cost(current)
    result.cost = (after.params, after.flops)
    return _finished(result, started)


def _finished(result: BlockResult, started: float) -> BlockResult:
    result.seconds = time.perf_counter() - started
    return result
