"""Channel pruning under a budget: remove the least important channels, in steps, fine-tuning after each.

Each step scores the channels of the current model's dependency groups, orders them and
cuts to a cost (`compressor.search.channels`: score, order, prune to a cost).

Budgets:

- A cost budget (fixed_params): prune to the target. With fine-tuning, in steps of
  `step` (each keeps that fraction of the FLOPs), re-scoring and fine-tuning the
  model after each step (gradual pruning recovers more than one big cut).
- An accuracy budget (fixed_loss): the same steps, each fine-tuned (early stop once
  the search data is within a quarter of the budget) and checked on the search data;
  a step holds when the guard can be expected to accept it with a chance of at least
  `ChannelSettings.guard_chance` (GUARD_CHANCE by default; `compressor.search.confidence.guard_chance`:
  the bound a guard of its size would give for the losses and wins measured here, with
  a margin for the noise of both splits; `confidence`, `guard_samples`). A step whose expected
  bound merely touches the budget would pass the guard half the time, and the guard's
  first rejection ends the search: the margin turns that coin flip into one more
  fine-tuning run or a smaller step. Without a guard, a step holds when the search
  data's own bound is within the budget; without a confidence, when it loses at most
  MARGIN × budget (`compressor.search.budgets.MARGIN`). A step that does not hold although
  its drop on the search data is within the budget (its bound missed, not its drop), or
  that holds with a chance below SURE_CHANCE (time allowing), is fine-tuned again in
  another order of the data and checked again, up to STEP_RUNS runs in all, while each run
  gains (one that does not is undone): the guard's first rejection ends the search, and a
  chance of 0.8 is one rejection in five such steps. A step that still misses is retried
  smaller (the square root of the kept fraction), and the step never grows back:
  RETRIES + 1 misses in all end the steps (with the count reset at each kept step, ever
  smaller steps would go on for as long as they held). A smaller step that cuts the same
  channels as one that missed is skipped. Then the smallest of those misses that lost at
  most the budget here gets up to RECOVERY_RUNS recovery runs, each begun only while the
  time left exceeds that step's first pass, until it holds (shown to the guard and, kept,
  the steps go on from it) or a run gains nothing: time that the misses would leave unused
  (a third of the limit at 1 point on Fashion-MNIST; benchmarks/fashion.md). Without fine-tuning,
  pruning once from the original is monotone enough for a bisection on the kept fraction.
  A step that holds on the search data is then shown to `accept` when given (the run's
  guard, `compressor.pipeline.acceptance`): the first step it rejects ends the search.
  When the guard judges the quantized file (`--quantize`), `judge` measures that file on
  the search data too, so that a step the quantization would push over the budget is
  fine-tuned again or made smaller here, rather than ending the search at the guard.

With a deadline (`CompressOptions.time_limit`), no fine-tuning run begins that is
expected to end after it: a step is expected to take as long as the longest step so far
took up to its first check (its cut, one fine-tuning run, the check; the guard's look
included), and a step's later fine-tuning runs as long as its first pass took. A step
that has no time for a run it needs to hold counts as missed. The search keeps the last model
accepted, and its record says it stopped at the time limit. The first step always runs
when the deadline has not passed (nothing predicts its time yet).

Removals are tracked as each producer's original output indices, so the result is a
list of `ChannelRemoval`s of the ORIGINAL model's groups that `prune_channels`
replays, whatever steps it took.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

import keras
import numpy as np

from compressor.errors import CompressorError, OptionError
from compressor.io.data import Dataset
from compressor.search.budgets import MARGIN, Budget, BudgetError, achieved_drop, achieved_fraction
from compressor.search.channel_result import GUARD_CHANCE, ChannelResult, ChannelSettings, ChannelStep  # noqa: F401 (re-exported)
from compressor.search.channels import RemovalTracker, group_scores, prune_to, removal_order
from compressor.search.result import Trial, with_chosen

if TYPE_CHECKING:
    from compressor.finetune import FinetuneConfig

Log = Callable[[str], None]

MIN_KEEP = 0.03  # never aim below this fraction of the baseline cost
RETRIES = 2  # smaller steps tried after a step that misses, before the search stops (misses in all)
SURE_CHANCE = 0.95  # a step that holds with a lower chance is fine-tuned again, time allowing, before the guard sees it
STEP_RUNS = 3  # fine-tuning runs a step may get before it is checked for the last time
RECOVERY_RUNS = 4  # at most this many more fine-tuning runs of the smallest near miss after the last miss


def search_channels(
    model: keras.Model,
    budget: Budget,
    settings: ChannelSettings,
    search_data: Optional[Dataset] = None,
    train_data: Optional[Dataset] = None,
    log: Optional[Log] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    accept: Optional[Callable[[str, keras.Model], bool]] = None,
    deadline: Optional[float] = None,
    judge: Optional[Callable[[keras.Model, Dataset], np.ndarray]] = None,
    reference: Optional[keras.Model] = None,
    teacher_outputs: Optional[Callable[[], np.ndarray]] = None,
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
        progress: Called as progress("fine-tuning", steps done, steps planned)
            during each fine-tuning run of a step.
        accept: Under an accuracy budget, called as accept(label, model) with each
            model that holds on the search data, in order; a False ends the search
            with the last model accepted. None: the search data decides alone.
        deadline: A `time.perf_counter()` value: with fine-tuning, no step begins that
            is expected to end after it. None: no limit.
        judge: Under an accuracy budget, judge(model, search_data) gives per sample
            whether the artifact `accept` judges (the quantized file) gets it right;
            steps are checked on it, against the original model in Keras. None: the
            model in Keras.
        reference: The model accuracy is measured against and distilled from, when
            `model` is already a compressed copy of it (blocks removed before the
            channels); the guard's labels give costs as fractions of it too. Default:
            `model`.
        teacher_outputs: Called once, before the first fine-tuning run, for the
            reference's outputs on `train_data` (a run computes them once for all its
            stages, `RunContext.teacher_outputs`). None: predicted here.

    Returns:
        The pruned model and its record.

    Raises:
        BudgetError: An accuracy budget without labelled search data.
        CompressorError: Fine-tuning without training data, or no prunable group.
    """
    from compressor.graph.groups import analyze_channels

    log = log or (lambda message: None)
    started = time.perf_counter()
    if budget.kind == "accuracy_drop" and (search_data is None or search_data.y is None):
        raise BudgetError("an accuracy budget needs labelled search data")
    tuning = settings.finetune is not None and settings.finetune.epochs > 0
    if tuning and train_data is None:
        raise OptionError("fine-tuning needs training data: pass {train_data}")
    analysis = analyze_channels(model)
    groups = list(analysis.groups)
    blocked = [(group.name, group.reason or "cannot be pruned") for group in groups if not group.prunable]
    if not any(group.prunable for group in groups):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in blocked[:3]) or "it has no channel groups"
        raise CompressorError(f"no channel group of '{model.name}' can be pruned ({reasons})")
    run = _Run(model, groups, budget, settings, search_data, train_data, log, progress, accept, deadline, judge, reference,
               teacher_outputs)
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
        finetune_steps=run.finetune_steps,
        evaluations=run.evaluations,
        seconds=time.perf_counter() - started,
        trials=run.final_trials(),
        blocked_layers=list(analysis.blocked_layers.items()),
        stopped=run.stopped,
    )


class _Run:
    """The state of one channel search: the current model, its cost, the steps taken."""

    def __init__(self, model, groups, budget, settings, search_data, train_data, log, progress=None, accept=None,
                 deadline=None, judge=None, reference=None, teacher=None) -> None:
        from compressor.graph.cost import model_cost

        self.accept, self.deadline, self.judge = accept, deadline, judge  # see `search_channels`
        self.stopped: Optional[str] = None
        self.original, self.budget, self.settings, self.log = model, budget, settings, log
        self.progress = progress or (lambda stage, done, total: None)
        self.search_data, self.train_data = search_data, train_data
        self.tracker = RemovalTracker(groups)
        self.sizes = {group.name: group.size for group in groups}  # the original's, for the caps
        self.current, self.groups = model, groups
        cost = model_cost(model)
        self.baseline = (cost.params, cost.flops)
        self.cost = self.baseline
        self.steps: list[ChannelStep] = []
        self.passes: list[float] = []  # per step, its seconds without a second fine-tuning run (`_out_of_time`)
        self.trials: list[Trial] = []
        self.kept_trial: Optional[int] = None  # index in trials of the model kept last
        self.epochs = self.evaluations = self.finetune_steps = 0
        self.reference = model if reference is None else reference
        reference_cost = cost if reference is None else model_cost(reference)
        self.reference_cost = (reference_cost.params, reference_cost.flops)
        self.baseline_correct = self._correct(self.reference) if _labelled(search_data) else None
        self.baseline_accuracy = None if self.baseline_correct is None else float(self.baseline_correct.mean())
        self.accuracy = self.baseline_accuracy
        self.teacher_outputs, self.teacher = None, teacher
        self.kind = budget.kind if budget.kind in ("params", "flops") else settings.objective

    # Budgets.
    def to_cost(self, fraction: float) -> None:
        """Reach `fraction` of the baseline cost: in one cut, or in fine-tuned steps."""
        target = fraction * self._base()
        tuning = self._tuning()
        while self._value(self.cost) > target:
            if tuning and self._out_of_time():
                return
            aim = max(target, self._value(self.cost) * self.settings.step) if tuning else target
            started = time.perf_counter()
            candidate, removals, groups, cost = self._cut(self.current, self.groups, aim)
            if not removals:
                self.log("channels: every prunable group is at its cap")
                break
            epochs = self._finetune(candidate, target_accuracy=None) if tuning else 0
            accuracy = float(self._correct(candidate).mean()) if _labelled(self.search_data) else None
            self._accept(candidate, groups, removals, cost, accuracy, aim, epochs, started)

    def progressive(self) -> None:
        """Fine-tuned steps down in cost while the search-data accuracy holds."""
        allowed = MARGIN * self.budget.limit
        step = self.settings.step
        retries, missed, near = 0, set(), None  # the costs of the cuts from the current model that missed; `_recover`'s
        while self._value(self.cost) > MIN_KEEP * self._base():
            if retries > RETRIES:  # RETRIES + 1 misses
                if not self._recover(near):
                    return
                retries, missed, near = 0, set(), None
            if self._out_of_time():
                return
            aim = self._value(self.cost) * step
            started = time.perf_counter()
            candidate, removals, groups, cost = self._cut(self.current, self.groups, aim)
            if not removals:
                self.log("channels: every prunable group is at its cap")
                return
            if cost in missed:  # a smaller step that cuts the same channels: no use fine-tuning it again
                retries, step = retries + 1, math.sqrt(step)
                continue
            target = self.baseline_accuracy - allowed / 4
            epochs = self._finetune(candidate, target_accuracy=target)
            correct = self._judged(candidate)
            first, chance = time.perf_counter() - started, self._chance(correct)  # chance: None without a guard
            for run in range(1, STEP_RUNS):
                holds, now = self._holds(correct), self._chance(correct)
                unsure = holds and now is not None and now < SURE_CHANCE and self._left() > first
                if not (unsure or not holds and self._near(correct)):
                    break
                if not holds and self._out_of_time(first, "another fine-tuning run"):
                    self._record(cost, float(correct.mean()), aim, epochs, False, started, chance=chance)
                    return
                why = f"held, but the guard would accept it with a chance of {now:.2f}" if unsure else "missed by a little"
                self.log(f"channels: {self._value(cost) / self._base():.3f} of the original {why}: fine-tuned once more")
                weights, before = candidate.get_weights(), correct
                epochs += self._finetune(candidate, target_accuracy=target, run=run)
                correct = self._judged(candidate)
                if correct.mean() <= before.mean():  # no gain: the step as it was
                    candidate.set_weights(weights)
                    correct = before
                    break
            again = time.perf_counter() - started - first  # seconds of its later fine-tuning runs and their checks
            accuracy = float(correct.mean())
            if self._holds(correct):
                if not self._keep(candidate, groups, removals, cost, accuracy, aim, epochs, started, again, chance):
                    return
                missed, near = set(), None  # a new model: its cuts are new (the step stays as small as the misses made it)
                continue
            missed.add(cost)
            self._record(cost, accuracy, aim, epochs, False, started, again, chance)
            if self._near(correct) and (near is None or self._value(cost) < self._value(near.cost)):
                near = _Miss(candidate, groups, removals, cost, aim, correct, first)
            retries, step = retries + 1, math.sqrt(step)

    def _recover(self, miss: Optional[_Miss]) -> bool:
        """After the last miss, fine-tune `miss` again while each run gains and time is left; whether it was kept."""
        started, runs, epochs, best = time.perf_counter(), 0, 0, miss and miss.correct
        while miss is not None and runs < RECOVERY_RUNS and self._left() > miss.seconds:
            runs += 1
            self.log(f"channels: {self._value(miss.cost) / self._base():.3f} of the original, recovery run {runs}")
            epochs += self._finetune(miss.candidate, target_accuracy=None, run=STEP_RUNS - 1 + runs)
            correct = self._judged(miss.candidate)
            if correct.mean() <= best.mean():  # no gain: the runs before it were as far as this step gets
                break
            best = correct
            if self._holds(best):
                return self._keep(miss.candidate, miss.groups, miss.removals, miss.cost, float(best.mean()), miss.aim,
                                  epochs, started, chance=self._chance(best), recovery=runs)
        if runs:
            self._record(miss.cost, float(best.mean()), miss.aim, epochs, False, started, chance=self._chance(best),
                         recovery=runs)
        return False

    def bisect_accuracy(self) -> None:
        """Without fine-tuning: the smallest kept fraction, pruned once, whose accuracy holds."""
        low, high = MIN_KEEP, 1.0  # fractions: high is known to hold
        best = None
        for _ in range(8):
            middle = math.sqrt(low * high)
            started = time.perf_counter()
            candidate, removals, groups, cost = self._cut(self.original, self.groups, middle * self._base())
            correct = self._judged(candidate)
            accuracy = float(correct.mean())
            holds = bool(removals) and self._holds(correct)
            guarded = holds and self._guard(candidate, cost)
            self.steps.append(ChannelStep(middle, cost[0], cost[1], accuracy, 0, guarded, round(time.perf_counter() - started, 3)))
            self._trial(cost, accuracy, guarded)
            if holds and not guarded:
                self.stopped = "guard"
                break  # the guard's sequence has ended: nothing more can be accepted
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

    def _out_of_time(self, expected: Optional[float] = None, what: str = "a step") -> bool:
        """Whether the deadline leaves less than `expected` seconds (default: the longest step's first pass) for
        `what` (then logged, and the search stops at the time limit)."""
        expected = max(self.passes, default=0.0) if expected is None else expected
        left = self._left()
        if left > expected:
            return False
        self.stopped = "time limit"
        kept = self._value(self.cost) / self._base()
        self.log(f"channels: the time limit leaves {max(left, 0) / 60:.1f} min, less than {what} takes "
                 f"({expected / 60:.1f} min): keeping {kept:.3f} of the original's {self.kind}")
        return True

    def _left(self) -> float:
        """Seconds until the deadline (inf without one)."""
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def _guard(self, candidate, cost) -> bool:
        """Whether the run's guard accepts a step that held on the search data (True without a guard)."""
        if self.accept is None:
            return True
        kept = self._value(cost) / self._value(self.reference_cost)
        return self.accept(f"channels, {self.kind} {kept:.3f} of the original", candidate)

    # Steps.
    def _cut(self, model, groups, aim: float):
        from compressor.surgery.channels import prune_channels

        scores = group_scores(model, groups, self.settings.criterion, self._score_data(), self.settings.seed)
        order = removal_order(groups, scores, self.settings.max_fraction, self.sizes)
        removals, cost = prune_to(model, groups, order, self.kind, aim, self.settings.multiple)
        if not removals:
            return model, {}, groups, self.cost
        return prune_channels(model, removals, groups), removals, groups, cost

    def _keep(self, candidate, groups, removals, cost, accuracy, aim, epochs, started, again=0.0, chance=None,
              recovery=0) -> bool:
        """Show a step that held to the guard: kept when it accepts, else recorded and the search stops there."""
        if self._guard(candidate, cost):
            self._accept(candidate, groups, removals, cost, accuracy, aim, epochs, started, again, chance, recovery)
            return True
        self._record(cost, accuracy, aim, epochs, False, started, again, chance, recovery)
        self.stopped = "guard"
        return False

    def _accept(self, candidate, groups, removals, cost, accuracy, aim, epochs, started=None, again=0.0, chance=None,
                recovery=0) -> None:
        self.tracker.remove(groups, removals)
        self.current, self.cost, self.accuracy = candidate, cost, accuracy
        self.groups = self._groups(candidate)
        self._record(cost, accuracy, aim, epochs, True, started, again, chance, recovery)

    def _record(self, cost, accuracy, aim, epochs, accepted, started, again=0.0, chance=None, recovery=0) -> None:
        """Record a step that began at `started`; `again`: its second fine-tuning run's seconds; `chance`: `_chance`;
        `recovery`: its recovery runs (`_recover`)."""
        seconds = 0.0 if started is None else time.perf_counter() - started
        step = ChannelStep(round(aim / self._base(), 4), cost[0], cost[1], accuracy, epochs, accepted, round(seconds, 3),
                           None if chance is None else round(chance, 4), recovery)
        self.steps.append(step)
        self.passes.append(seconds - again)
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

    def _finetune(self, candidate, target_accuracy: Optional[float], run: int = 0) -> int:
        """Fine-tune `candidate` in place; `run` > 0 continues it in another order of the data. Returns the epochs begun."""
        from compressor.distillation import teacher_predictions
        from compressor.finetune import finetune

        if self.teacher_outputs is None:
            self.teacher_outputs = self.teacher() if self.teacher is not None \
                else teacher_predictions(self.reference, self.train_data.x)
        config = self.settings.finetune
        if run:
            config = replace(config, seed=config.seed + run)
        result = finetune(
            candidate, None, self.train_data, config,
            val=self.search_data if _labelled(self.search_data) else None,
            target_accuracy=target_accuracy, teacher_outputs=self.teacher_outputs,
            on_step=lambda done, total: self.progress("fine-tuning", done, total),
            measure_last=False,  # the step is checked right after, as the guard will judge it
        )
        self.epochs += result.epochs_run
        self.finetune_steps += result.steps
        return result.epochs_run

    # Helpers.
    def _groups(self, model):
        from compressor.graph.groups import channel_groups

        return channel_groups(model)

    def _correct(self, model) -> np.ndarray:
        from compressor.search.evaluate import correct_predictions

        self.evaluations += 1
        return correct_predictions(model, self.search_data)

    def _judged(self, model) -> np.ndarray:
        """Per search sample, whether the step gets it right: as the file the guard judges (`judge`), else in Keras."""
        if self.judge is None:
            return self._correct(model)
        self.evaluations += 1
        return np.asarray(self.judge(model, self.search_data), dtype=bool)

    def _holds(self, correct: np.ndarray) -> bool:
        """Whether a step's accuracy holds on the search data (`compressor.search.confidence.step_holds`)."""
        from compressor.search.confidence import step_holds

        return step_holds(self.baseline_correct, correct, self.budget.limit, self.settings)

    def _chance(self, correct: np.ndarray) -> Optional[float]:
        """The chance the guard accepts a step measured `correct` here (`confidence.step_chance`); None without a guard."""
        from compressor.search.confidence import step_chance

        return None if self.accept is None else step_chance(self.baseline_correct, correct, self.budget.limit, self.settings)

    def _near(self, correct: np.ndarray) -> bool:
        """Whether a step that does not hold lost at most the budget here (its bound missed): worth one more run."""
        return self.budget.met(achieved_drop(self.baseline_accuracy, float(correct.mean())))

    def _score_data(self) -> Optional[Dataset]:
        return self.train_data if self.train_data is not None else self.search_data

    def _tuning(self) -> bool:
        return self.settings.finetune is not None and self.settings.finetune.epochs > 0

    def _base(self) -> int:
        return self._value(self.baseline)

    def _value(self, cost: tuple[int, int]) -> int:
        return cost[0] if self.kind == "params" else cost[1]


@dataclass(frozen=True)
class _Miss:
    """A step that missed: its model, its cut, what it got right, its seconds to its first check."""

    candidate: keras.Model
    groups: list
    removals: dict
    cost: tuple[int, int]
    aim: float
    correct: np.ndarray
    seconds: float


def _labelled(data: Optional[Dataset]) -> bool:
    return data is not None and data.y is not None
