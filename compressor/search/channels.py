"""Channel pruning under a budget: rank the channels of dependency groups, remove the least important, fine-tune.

Removing channels is where real speed comes from: every runtime runs a narrower
layer faster, while zeros in a kernel only shrink the file. The search works on the
dependency groups of `compressor.graph.groups` (channels that must go together):

1. Score. Each producer's filter scores (`compressor.techniques.scores.filter_scores`
   with the chosen criterion) are divided by their mean, so layers of different scale
   compare; a group channel's score is the mean over the group's producers.
2. Order. All channels of prunable groups, least important first; a group loses at
   most `max_fraction` of its channels and always keeps one.
3. Prune to a cost. Bisection on how many channels of that order go, until the pruned
   model's params or FLOPs fall to the target (`compressor.surgery.channels.pruned_cost`).

Budgets:

- A cost budget (fixed_params): prune to the target. With fine-tuning, in steps of
  `step` (each keeps that fraction of the FLOPs), re-scoring and fine-tuning the
  model after each step (gradual pruning recovers more than one big cut).
- An accuracy budget (fixed_loss): the same steps, each fine-tuned (early stop once
  the search data is within a quarter of the budget) and checked on the search data;
  a step that loses more than MARGIN × budget is retried with a smaller step (the
  square root of the kept fraction, up to RETRIES times), and the search stops at the
  first step that still misses. Without fine-tuning, pruning once
  from the original is monotone enough for a bisection on the kept fraction.

Removals are tracked as each producer's original output indices, so the result is a
list of `ChannelRemoval`s of the ORIGINAL model's groups that `prune_channels`
replays, whatever steps it took.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np

from compressor.errors import CompressorError
from compressor.io.data import Dataset
from compressor.search.budgets import Budget, BudgetError, achieved_drop, achieved_fraction
from compressor.search.result import Trial, with_chosen
from compressor.surgery.plan import ChannelRemoval

Log = Callable[[str], None]

MIN_KEEP = 0.03  # never aim below this fraction of the baseline cost
MARGIN = 0.75  # fraction of an accuracy budget a step may spend on the search data
RETRIES = 2  # smaller steps tried after a step that misses, before the search stops


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
    """

    criterion: str = "magnitude"
    max_fraction: float = 0.9
    step: float = 0.5
    finetune: Any = None  # compressor.finetune.FinetuneConfig
    objective: str = "flops"
    seed: int = 0

    def __post_init__(self) -> None:
        from compressor.techniques.scores import CRITERIA

        if self.criterion not in CRITERIA:
            raise CompressorError(f"Invalid criterion. Expected one of {CRITERIA}. Received: criterion={self.criterion!r}")
        for name in ("max_fraction", "step"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise CompressorError(f"Invalid {name}. Expected 0 < {name} < 1. Received: {name}={value}")
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ChannelResult:
    """The pruned (and fine-tuned) model and how it was reached.

    Attributes:
        model: The pruned model (fine-tuned when fine-tuning was asked for).
        removals: Channel removals of the original model's groups.
        blocked: (group, reason) of the groups left whole.
        params, flops: Cost of `model`.
        baseline_params, baseline_flops: Cost of the original.
        baseline_accuracy, accuracy: On the search data (None without labelled data).
        steps: The progressive steps, in order.
        epochs: Fine-tuning epochs spent, over all steps.
        evaluations: Whole-model accuracy evaluations on the search data.
        seconds: Wall time.
        trials: Each pruned model the search measured (after its fine-tuning), in
            order; the one returned is chosen. When no step was kept, the original
            model comes first, chosen.
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
    evaluations: int = 0
    seconds: float = 0.0
    trials: tuple[Trial, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups_pruned": sum(1 for removal in self.removals if removal.remove),
            "channels_removed": sum(len(removal.remove) for removal in self.removals),
            "groups_blocked": [{"group": name, "reason": reason} for name, reason in self.blocked],
            "params": self.params,
            "flops": self.flops,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy": self.accuracy,
            "finetune_epochs": self.epochs,
            "evaluations": self.evaluations,
            "steps": [step.to_dict() for step in self.steps],
            "trials": [trial.to_dict() for trial in self.trials],
            "seconds": round(self.seconds, 3),
        }


# --- scores and order ------------------------------------------------------------------------


def group_scores(
    model: keras.Model, groups: Sequence[Any], criterion: str, data: Optional[Dataset], seed: int = 0
) -> dict[str, np.ndarray]:
    """Importance of each channel of each prunable group (higher: keep), about 1 on average.

    Raises:
        CompressorError: The criterion needs data and none was given.
    """
    from compressor.techniques.scores import filter_scores

    prunable = [group for group in groups if group.prunable]
    producers = sorted({name for group in prunable for name in group.producers})
    if not producers:
        return {}
    scores = filter_scores(model, criterion, data, layers=producers, seed=seed)
    out = {}
    for group in prunable:
        total, counted = np.zeros(group.size), np.zeros(group.size)
        for name in group.producers:
            score = np.asarray(scores[name], dtype=np.float64)
            index = np.asarray(group.indices[name])
            present = index >= 0
            mean = float(score.mean()) if score.size else 0.0
            total[present] += score[index[present]] / (mean if mean > 0 else 1.0)
            counted[present] += 1
        out[group.name] = total / np.maximum(counted, 1)
    return out


def removal_order(
    groups: Sequence[Any],
    scores: Mapping[str, np.ndarray],
    max_fraction: float,
    original_sizes: Optional[Mapping[str, int]] = None,
) -> list[tuple[str, int]]:
    """(group, channel) pairs, least important first, within each group's cap.

    A group may lose at most `max_fraction` of its original size (`original_sizes`,
    default: its size now) counting what earlier steps removed, and keeps one channel.
    Ties go to the group earlier in graph order, then the lower channel index, so the
    order is deterministic.
    """
    position = {group.name: i for i, group in enumerate(groups)}
    entries = [
        (float(score), position[name], channel, name)
        for name, values in scores.items()
        for channel, score in enumerate(values)
    ]
    entries.sort()
    original = dict(original_sizes or {})
    caps = {}
    for group in groups:
        size = original.get(group.name, group.size)
        caps[group.name] = min(int(math.floor(max_fraction * size)) - (size - group.size), group.size - 1)
    taken: dict[str, int] = {}
    order = []
    for _, _, channel, name in entries:
        if taken.get(name, 0) < caps.get(name, 0):
            taken[name] = taken.get(name, 0) + 1
            order.append((name, channel))
    return order


def removals_of(order: Sequence[tuple[str, int]], count: int) -> dict[str, list[int]]:
    """The first `count` entries of an order, as group → sorted channel indices."""
    out: dict[str, list[int]] = {}
    for name, channel in order[:count]:
        out.setdefault(name, []).append(channel)
    return {name: sorted(channels) for name, channels in out.items()}


def prune_to(
    model: keras.Model, groups: Sequence[Any], order: Sequence[tuple[str, int]], kind: str, target: float
) -> tuple[dict[str, list[int]], tuple[int, int]]:
    """The fewest channels of `order` whose removal brings the `kind` cost to at most `target`.

    Returns:
        (removals, (params, flops) after them). When even the whole order does not reach
        the target, all of it.
    """
    from compressor.surgery.channels import pruned_cost

    def cost(count: int) -> tuple[int, int]:
        return pruned_cost(model, removals_of(order, count), groups)

    def value(c: tuple[int, int]) -> int:
        return c[0] if kind == "params" else c[1]

    low, high = 0, len(order)
    high_cost = cost(high)
    if value(high_cost) > target:
        return removals_of(order, high), high_cost
    found = high_cost
    while high - low > 1:
        middle = (low + high) // 2
        middle_cost = cost(middle)
        if value(middle_cost) <= target:
            high, found = middle, middle_cost
        else:
            low = middle
    return removals_of(order, high), found


# --- the search ------------------------------------------------------------------------------


class _Tracker:
    """Each producer's original output indices still present, across progressive steps."""

    def __init__(self, groups: Sequence[Any]) -> None:
        self.groups = list(groups)
        self.kept: dict[str, np.ndarray] = {}
        for group in groups:
            for name in group.producers:
                width = int(np.max(group.indices[name])) + 1 if len(group.indices[name]) else 0
                self.kept.setdefault(name, np.arange(width))

    def remove(self, groups: Sequence[Any], removals: Mapping[str, Sequence[int]]) -> None:
        """Record removals given as channel indices of the CURRENT model's groups."""
        by_name = {group.name: group for group in groups}
        for name, channels in removals.items():
            group = by_name[name]
            for producer in group.producers:
                index = np.asarray(group.indices[producer])[list(channels)]
                index = index[index >= 0]
                self.kept[producer] = np.delete(self.kept[producer], index)

    def original_removals(self, criterion: str) -> tuple[ChannelRemoval, ...]:
        """The removals, as channels of the original groups."""
        out = []
        for group in self.groups:
            if not group.prunable:
                continue
            first = group.name if group.name in group.producers else group.producers[0]
            index, kept = np.asarray(group.indices[first]), set(self.kept[first].tolist())
            gone = [k for k in range(group.size) if index[k] >= 0 and index[k] not in kept]
            if gone:
                out.append(ChannelRemoval(group.name, group.size, tuple(gone), criterion))
        return tuple(out)


def search_channels(
    model: keras.Model,
    budget: Budget,
    settings: ChannelSettings,
    search_data: Optional[Dataset] = None,
    train_data: Optional[Dataset] = None,
    log: Optional[Log] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> ChannelResult:
    """Remove channels of `model` to meet `budget`.

    Args:
        model: The original model; left unchanged.
        budget: "params"/"flops" (fraction kept) or "accuracy_drop".
        settings: Criterion, caps, steps and fine-tuning.
        search_data: Labelled data the accuracy budget is checked on (and fine-tuning
            stops early on); required for an accuracy budget.
        train_data: What fine-tuning trains on (and data-driven criteria score on);
            required with fine-tuning.
        log: Called with one line per step.
        progress: Called as progress("fine-tuning", epoch, epochs) after each
            fine-tuning epoch of a step.

    Returns:
        The pruned model and its record.

    Raises:
        BudgetError: An accuracy budget without labelled search data.
        CompressorError: Fine-tuning without training data, or no prunable group.
    """
    from compressor.graph.groups import channel_groups

    log = log or (lambda message: None)
    started = time.perf_counter()
    if budget.kind == "accuracy_drop" and (search_data is None or search_data.y is None):
        raise BudgetError("an accuracy budget needs labelled search data")
    tuning = settings.finetune is not None and settings.finetune.epochs > 0
    if tuning and train_data is None:
        raise CompressorError("fine-tuning needs training data: pass --train-data")
    groups = channel_groups(model)
    blocked = [(group.name, group.reason or "cannot be pruned") for group in groups if not group.prunable]
    if not any(group.prunable for group in groups):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in blocked[:3]) or "it has no channel groups"
        raise CompressorError(f"no channel group of '{model.name}' can be pruned ({reasons})")
    run = _Run(model, groups, budget, settings, search_data, train_data, log, progress)
    if budget.kind != "accuracy_drop":
        run.to_cost(budget.limit)
    elif tuning:
        run.progressive()
    else:
        run.bisect_accuracy()
    params, flops = run.cost
    return ChannelResult(
        model=run.current,
        removals=run.tracker.original_removals(settings.criterion),
        blocked=blocked,
        params=params,
        flops=flops,
        baseline_params=run.baseline[0],
        baseline_flops=run.baseline[1],
        baseline_accuracy=run.baseline_accuracy,
        accuracy=run.accuracy,
        steps=run.steps,
        epochs=run.epochs,
        evaluations=run.evaluations,
        seconds=time.perf_counter() - started,
        trials=run.final_trials(),
    )


class _Run:
    """The state of one channel search: the current model, its cost, the steps taken."""

    def __init__(self, model, groups, budget, settings, search_data, train_data, log, progress=None) -> None:
        from compressor.graph.cost import model_cost

        self.original, self.budget, self.settings, self.log = model, budget, settings, log
        self.progress = progress or (lambda stage, done, total: None)
        self.search_data, self.train_data = search_data, train_data
        self.tracker = _Tracker(groups)
        self.sizes = {group.name: group.size for group in groups}  # the original's, for the caps
        self.current, self.groups = model, groups
        cost = model_cost(model)
        self.baseline = (cost.params, cost.flops)
        self.cost = self.baseline
        self.steps: list[ChannelStep] = []
        self.trials: list[Trial] = []
        self.kept_trial: Optional[int] = None  # index in trials of the model kept last
        self.epochs = self.evaluations = 0
        self.baseline_accuracy = self._accuracy(model) if _labelled(search_data) else None
        self.accuracy = self.baseline_accuracy
        self.teacher_outputs = None
        self.kind = budget.kind if budget.kind in ("params", "flops") else settings.objective

    # Budgets.
    def to_cost(self, fraction: float) -> None:
        """Reach `fraction` of the baseline cost: in one cut, or in fine-tuned steps."""
        target = fraction * self._base()
        tuning = self._tuning()
        while self._value(self.cost) > target:
            aim = max(target, self._value(self.cost) * self.settings.step) if tuning else target
            candidate, removals, groups, cost = self._cut(self.current, self.groups, aim)
            if not removals:
                self.log("channels: every prunable group is at its cap")
                break
            epochs = self._finetune(candidate, target_accuracy=None) if tuning else 0
            accuracy = self._accuracy(candidate) if _labelled(self.search_data) else None
            self._accept(candidate, groups, removals, cost, accuracy, aim, epochs)

    def progressive(self) -> None:
        """Fine-tuned steps down in cost while the search-data accuracy holds."""
        allowed = MARGIN * self.budget.limit
        step = self.settings.step
        retries = 0
        while self._value(self.cost) > MIN_KEEP * self._base():
            aim = self._value(self.cost) * step
            candidate, removals, groups, cost = self._cut(self.current, self.groups, aim)
            if not removals:
                self.log("channels: every prunable group is at its cap")
                return
            started = time.perf_counter()
            epochs = self._finetune(candidate, target_accuracy=self.baseline_accuracy - allowed / 4)
            accuracy = self._accuracy(candidate)
            if self.baseline_accuracy - accuracy <= allowed:
                self._accept(candidate, groups, removals, cost, accuracy, aim, epochs, started)
                continue
            self._record(cost, accuracy, aim, epochs, False, started)
            if retries == RETRIES:
                return
            retries, step = retries + 1, math.sqrt(step)

    def bisect_accuracy(self) -> None:
        """Without fine-tuning: the smallest kept fraction, pruned once, whose accuracy holds."""
        allowed = MARGIN * self.budget.limit
        low, high = MIN_KEEP, 1.0  # fractions: high is known to hold
        best = None
        for _ in range(8):
            middle = math.sqrt(low * high)
            started = time.perf_counter()
            candidate, removals, groups, cost = self._cut(self.original, self.groups, middle * self._base())
            accuracy = self._accuracy(candidate)
            holds = bool(removals) and self.baseline_accuracy - accuracy <= allowed
            self.steps.append(ChannelStep(middle, cost[0], cost[1], accuracy, 0, holds, round(time.perf_counter() - started, 3)))
            self._trial(cost, accuracy, holds)
            if holds:
                high, best = middle, (candidate, groups, removals, cost, accuracy)
            else:
                low = middle
            if high / low < 1.1:
                break
        if best is not None:
            candidate, groups, removals, cost, accuracy = best
            self.tracker.remove(groups, removals)
            self.current, self.cost, self.accuracy = candidate, cost, accuracy
            self.groups = self._groups(candidate)

    # Steps.
    def _cut(self, model, groups, aim: float):
        from compressor.surgery.channels import prune_channels

        scores = group_scores(model, groups, self.settings.criterion, self._score_data(), self.settings.seed)
        order = removal_order(groups, scores, self.settings.max_fraction, self.sizes)
        removals, cost = prune_to(model, groups, order, self.kind, aim)
        if not removals:
            return model, {}, groups, self.cost
        return prune_channels(model, removals, groups), removals, groups, cost

    def _accept(self, candidate, groups, removals, cost, accuracy, aim, epochs, started=None) -> None:
        self.tracker.remove(groups, removals)
        self.current, self.cost, self.accuracy = candidate, cost, accuracy
        self.groups = self._groups(candidate)
        self._record(cost, accuracy, aim, epochs, True, started)

    def _record(self, cost, accuracy, aim, epochs, accepted, started) -> None:
        seconds = 0.0 if started is None else time.perf_counter() - started
        step = ChannelStep(round(aim / self._base(), 4), cost[0], cost[1], accuracy, epochs, accepted, round(seconds, 3))
        self.steps.append(step)
        self._trial(cost, accuracy, accepted)
        kept = self._value(cost) / self._base()
        accuracy_text = "" if accuracy is None else f", accuracy {accuracy:.4f}"
        self.log(f"channels: {self.kind} {kept:.3f} of the original{accuracy_text}, {epochs} epochs, {'kept' if accepted else 'rejected'}")

    def _trial(self, cost, accuracy, accepted: bool) -> None:
        if accepted:
            self.kept_trial = len(self.trials)
        self.trials.append(Trial("channels", cost[0], cost[1], accuracy, self._meets(cost, accuracy)))

    def _meets(self, cost, accuracy: Optional[float]) -> bool:
        """Whether a model of this cost and search-data accuracy meets the budget (not the step margin)."""
        if self.budget.kind == "accuracy_drop":
            return accuracy is not None and self.budget.met(achieved_drop(self.baseline_accuracy, accuracy))
        return self.budget.met(achieved_fraction(self._value(cost), self._base()))

    def final_trials(self) -> tuple[Trial, ...]:
        """The trials with the returned model chosen: the last kept, else the original (put first)."""
        if self.kept_trial is not None:
            return with_chosen(self.trials, self.kept_trial)
        original = Trial("channels", *self.baseline, self.baseline_accuracy, self._meets(self.baseline, self.baseline_accuracy))
        return with_chosen([original, *self.trials], 0)

    def _finetune(self, candidate, target_accuracy: Optional[float]) -> int:
        from compressor.distillation import teacher_predictions
        from compressor.finetune import finetune

        if self.teacher_outputs is None:
            self.teacher_outputs = teacher_predictions(self.original, self.train_data.x)
        result = finetune(
            candidate, None, self.train_data, self.settings.finetune,
            val=self.search_data if _labelled(self.search_data) else None,
            target_accuracy=target_accuracy, teacher_outputs=self.teacher_outputs,
            on_epoch=lambda epoch, epochs, _entry: self.progress("fine-tuning", epoch, epochs),
        )
        self.epochs += result.epochs_run
        return result.epochs_run

    # Helpers.
    def _groups(self, model):
        from compressor.graph.groups import channel_groups

        return channel_groups(model)

    def _accuracy(self, model) -> float:
        from compressor.finetune import accuracy

        self.evaluations += 1
        return accuracy(model, self.search_data)

    def _score_data(self) -> Optional[Dataset]:
        return self.train_data if self.train_data is not None else self.search_data

    def _tuning(self) -> bool:
        return self.settings.finetune is not None and self.settings.finetune.epochs > 0

    def _base(self) -> int:
        return self._value(self.baseline)

    def _value(self, cost: tuple[int, int]) -> int:
        return cost[0] if self.kind == "params" else cost[1]


def _labelled(data: Optional[Dataset]) -> bool:
    return data is not None and data.y is not None
