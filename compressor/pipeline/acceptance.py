"""Accepting models under an accuracy budget: a confidence bound on a guard split, in a fixed sequence.

Why: the search chooses among many candidates by their accuracy on its data, stops
fine-tuning on it and accepts steps on it, so the accuracy it saw for the model it kept
is the best of many noisy numbers (DESIGN.md, "Measuring accuracy honestly"). The
acceptance therefore measures on data the search never sees, the guard split
(`guard_fraction` of the search data), and asks more than a point estimate: the drop,
measured paired on the guard, must be within the budget with the stated one-sided
confidence (`compressor.search.confidence`).

A run shows the guard several models: each channel step, the result of the per-layer
techniques and fine-tuning, the gated model. They are shown in the order the run makes
them, which the guard does not influence, and the first rejection ends the sequence:
the run keeps the last model accepted and shows the guard nothing more. This is the
fixed-sequence procedure of multiple testing: the kept model has a drop above the
budget only if the first such model in the sequence passed, which happens with
probability at most 1 − confidence, however many models came before it. So the
confidence needs no correction for the number of looks.

Under a metric with per-sample values (mse, mae, a hook; `compressor.metrics`) the drop
is a mean of paired per-sample differences of scores, bounded by a t bound
(`paired_difference`); how many guard samples the budget needs then depends on how
spread those differences are, so the "too few samples" warning comes from the looks.

A run that ships a quantized file (`--quantize`) is judged on it: the guard measures
each model's quantized artifact, not the Keras model (`compressor.export.judged`), so
the bound covers the quantization error as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from compressor.metrics import TOP1, Metric
from compressor.pipeline.context import Log, Run
from compressor.search.confidence import PairedDrop, can_confirm, paired_difference, paired_drop, samples_needed

if TYPE_CHECKING:
    import keras

    from compressor.export.judged import QuantizedJudge
    from compressor.io.data import Dataset
    from compressor.pipeline.context import RunContext


@dataclass(frozen=True)
class Look:
    """One model shown to the guard: what it was, what the guard measured, the verdict."""

    label: str
    measured: Optional[PairedDrop]  # None: not measured, the sequence had ended
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"model": self.label, "accepted": self.accepted}
        if self.measured is not None:
            entry.update(drop=self.measured.drop, ci=[self.measured.lower, self.measured.upper])
        return entry


@dataclass
class Acceptance:
    """The guard of one run (module docstring).

    Attributes:
        guard: The guard split.
        limit: The accuracy budget (a drop, as a fraction).
        confidence: One-sided confidence of the bound.
        original_correct: Per guard sample, whether the original gets it right (under
            a metric with per-sample values, the original's metric value).
        looks: Every model shown, in order.
        log: One line per look.
        metric: What the budget measures.
        judge: Under `--quantize`, the quantized artifact the guard measures instead of
            the Keras model (`compressor.export.judged`); None: the Keras model.
    """

    guard: Dataset
    limit: float
    confidence: float
    original_correct: np.ndarray
    looks: list[Look] = field(default_factory=list)
    log: Log = lambda message: None
    metric: Metric = TOP1
    judge: Optional[QuantizedJudge] = None

    @classmethod
    def for_run(cls, ctx: RunContext) -> Optional[Acceptance]:
        """The run's guard: under an accuracy budget with a guard split, else None. Warns when it is too small."""
        from compressor.search.evaluate import sample_values

        guard, budget = ctx.data.guard, ctx.budget
        if guard is None or budget is None or budget.kind != "accuracy_drop":
            return None
        acceptance = cls(guard, budget.limit, ctx.options.confidence, sample_values(ctx.model, guard, ctx.metric),
                         log=ctx.log, metric=ctx.metric, judge=_judge(ctx))
        if acceptance.judge is not None:
            ctx.log(f"guard: judges each model's {acceptance.judge.name} file")
        warning = acceptance.too_few_warning()
        if warning:
            ctx.log(f"warning: {warning}")
        return acceptance

    @property
    def closed(self) -> bool:
        """Whether the guard rejected a model: the sequence has ended."""
        return any(not look.accepted for look in self.looks)

    def look(self, label: str, model: keras.Model) -> bool:
        """Show the guard one more model; whether it is accepted (never, once the sequence has ended)."""
        if self.closed:
            self.looks.append(Look(label, None, False))
            self.log(f"guard: {label} not accepted: an earlier model was rejected, the sequence has ended")
            return False
        values = self.values(model)
        if self.metric.binary:
            measured = paired_drop(self.original_correct, values, self.confidence)
        else:
            reference = float(np.mean(self.original_correct))
            measured = paired_difference(self.metric.scores(self.original_correct, reference),
                                         self.metric.scores(values, reference), self.confidence)
        accepted = measured.within(self.limit)
        self.looks.append(Look(label, measured, accepted))
        if not self.metric.binary and len(self.looks) == 1 and self.too_few_warning():
            self.log(f"warning: {self.too_few_warning()}")
        self.log(f"guard: {label} drop {measured.drop:+.4f}, at most {measured.upper:.4f} with "
                 f"{self.confidence:.0%} confidence: {'accepted' if accepted else 'rejected'}")
        return accepted

    def values(self, model: keras.Model) -> np.ndarray:
        """Per guard sample, the metric's value for the model, or for its quantized artifact under `judge`."""
        from compressor.search.evaluate import sample_values

        if self.judge is not None:
            return self.judge.values(model, self.guard, self.metric)
        return sample_values(model, self.guard, self.metric)

    def too_few_warning(self) -> Optional[str]:
        """One line when the guard is too small to confirm the budget (`can_confirm`), else None."""
        n = len(self.guard)
        if not self.metric.binary:
            return self._too_spread_warning()
        if can_confirm(n, self.limit, self.confidence):
            return None
        if self.limit <= 0:
            return (f"a budget of 0 cannot be confirmed by data: only models that change no prediction of the "
                    f"{n} guard samples are accepted")
        return (f"{n} guard samples are too few to confirm a drop of {self.limit:g} with {self.confidence:.0%} "
                f"confidence: about {samples_needed(self.limit, self.confidence)} are needed (more search data, or a "
                f"larger guard fraction); only models that change almost no prediction will be accepted")

    def _too_spread_warning(self) -> Optional[str]:
        """Per-sample values: a warning when the last measured bound is wider than half the budget."""
        needed = self._samples_needed_measured()
        if needed is None or needed <= len(self.guard):
            return None
        return (f"{len(self.guard)} guard samples measure the {self.metric.name} drop too loosely to confirm "
                f"{self.limit:g} with {self.confidence:.0%} confidence: about {needed} are needed (more search data, "
                "or a larger guard fraction); only models that change the outputs very little will be accepted")

    def _samples_needed_measured(self) -> Optional[int]:
        """Per-sample values: the guard size at which the last look's bound would be half the budget wide."""
        measured = [look.measured for look in self.looks if look.measured is not None]
        if not measured or self.limit <= 0 or measured[-1].spread is None:
            return None
        width = measured[-1].upper - measured[-1].drop
        return int(np.ceil(len(self.guard) * (width / (self.limit / 2)) ** 2))

    def to_dict(self) -> dict[str, Any]:
        if not self.metric.binary:
            needed = self._samples_needed_measured()
        else:
            needed = samples_needed(self.limit, self.confidence) if self.limit > 0 else None
        return {
            "samples": len(self.guard),
            "confidence": self.confidence,
            "judged": self.judge.name if self.judge is not None else "keras model",
            "samples_needed": needed,
            "warning": self.too_few_warning(),
            "looks": [look.to_dict() for look in self.looks],
        }


def _judge(ctx: RunContext) -> Optional[QuantizedJudge]:
    """The quantized artifact the run ships, for the guard to judge: None without `--quantize`."""
    from compressor.export.judged import QuantizedJudge, judged_format
    from compressor.pipeline.export import calibration

    options = ctx.options
    fmt = judged_format(options.export)
    if options.quantize == "none" or fmt is None:
        return None
    return QuantizedJudge(fmt, options.quantize, calibration(ctx).samples, int8_io=options.int8_io and fmt == "tflite")


REJECTED_REASON = "left as it is: the guard rejected the per-layer edits (drop not confirmed within the budget)"


class AcceptStage:
    """Shows the guard the result of the per-layer techniques and fine-tuning; reverts them when it rejects.

    Channel steps are shown by the channel search itself, and gates by the gating
    stage; what is left to show is the model the per-layer stage and fine-tuning made.
    On a rejection the run goes back to the last accepted model (without removed
    channels, or the original) and the plan drops the per-layer edits. Nothing is
    recorded: a replay applies the plan as it is.
    """

    name = "acceptance"

    def check(self, ctx: RunContext, record: None) -> None:
        """Nothing to refuse early."""

    def search(self, ctx: RunContext, run: Run) -> None:
        if run.acceptance is None or run.compressed is run.working:
            return None
        if run.accepts("per-layer edits" + (", fine-tuned" if _tuned(run) else ""), run.compressed):
            return None
        _revert_layers(ctx, run)
        return None

    def recorded(self, plan: Any) -> None:
        return None

    def replay(self, ctx: RunContext, run: Run, record: Any) -> Any:
        return record


def _tuned(run: Run) -> bool:
    from compressor.pipeline.records import FinetuneRecord

    tuning = run.record(FinetuneRecord)
    return tuning is not None and tuning.result is not None


def _revert_layers(ctx: RunContext, run: Run) -> None:
    """Back to the model before the per-layer edits; the plan keeps blocks and channels (and their epochs) only."""
    import dataclasses

    from compressor.pipeline.finetuning import plan_entry
    from compressor.pipeline.records import FinetuneRecord, LayerRecord, step_tuning
    from compressor.surgery.plan import SkippedLayer

    run.compressed = run.working
    for index, record in enumerate(run.records):
        if isinstance(record, LayerRecord):
            skipped = record.skipped + tuple(SkippedLayer(edit.layer, REJECTED_REASON) for edit in record.edits)
            run.records[index] = dataclasses.replace(record, edits=(), skipped=skipped, statistics=None, costs={})
        elif isinstance(record, FinetuneRecord):
            epochs, steps = step_tuning(run.records)
            run.records[index] = FinetuneRecord(plan_entry(ctx.options, epochs, steps), None)
    ctx.log("guard: the per-layer edits are dropped; the run keeps the model accepted before them")
