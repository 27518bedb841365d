"""What a search returns: the plan, whether it meets the budget, and what it predicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import keras

from compressor.errors import CompressorError
from compressor.io.fingerprint import model_fingerprint
from compressor.search.budgets import Budget
from compressor.search.candidates import LayerCandidates, Option
from compressor.surgery.plan import Plan, SkippedLayer

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while a search runs, e.g. ("sensitivity", 12, 140)."""

STAGES = ("channels", "layers")


@dataclass(frozen=True)
class Trial:
    """One whole-model candidate a search evaluated: what it costs, how it scored, whether it won.

    The trials of a search are its trace: plotted against the fraction of the cost
    kept, they show how accuracy fell as the search compressed further.

    Attributes:
        stage: "channels" (channel pruning) or "layers" (per-layer edits).
        params, flops: Whole-model totals of the candidate, counted as
            `SearchResult.params` and `SearchResult.flops` are.
        accuracy: Its top-1 accuracy on the search data; None when the search
            evaluated no accuracy (fixed_params, or a channel search without labels).
        met: Whether it met the budget of the search that tried it.
        chosen: Whether it is what the search returned.

    Raises:
        CompressorError: An unknown stage.
    """

    stage: str
    params: int
    flops: int
    accuracy: Optional[float]
    met: bool
    chosen: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise CompressorError(f"Invalid trial stage. Expected one of {STAGES}. Received: stage={self.stage!r}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def with_chosen(trials: Sequence[Trial], index: int) -> tuple[Trial, ...]:
    """The trials with only `trials[index]` marked chosen."""
    return tuple(dataclasses.replace(trial, chosen=i == index) for i, trial in enumerate(trials))


@dataclass(frozen=True)
class LayerChoice:
    """What the search chose for one edited layer.

    Attributes:
        name: Qualified layer name.
        technique: The edit's technique.
        params_before, params_after: Its params as it was and as edited.
        flops_before, flops_after: Its FLOPs (summed over its calls) before and after.
        error: Relative Frobenius error of its effective kernel.
        accuracy: Search-data accuracy with only this layer edited (fixed_loss); None otherwise.
        output_error: Output change with only this layer edited (fixed_loss); None otherwise.
    """

    name: str
    technique: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    error: float
    accuracy: Optional[float] = None
    output_error: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SearchResult:
    """A plan and what the search knows about it.

    Attributes:
        method: "fixed_loss" or "fixed_params".
        plan: The plan (edits, skipped layers, model identity).
        budget: The budget searched for.
        achieved: For an accuracy budget, the drop on the search data; for a cost
            budget, the fraction of the baseline params/FLOPs kept (predicted).
        met: Whether `achieved` meets the budget.
        evaluations: Whole-model evaluations the search used: for fixed_loss the
            baseline and per-option sensitivity evaluations plus the confirmation
            evaluations, including those read from the cache; 0 for fixed_params.
        cached_evaluations: How many of `evaluations` were read from the cache.
        sensitivity_evaluations: The baseline and single-layer evaluations.
        confirmation_evaluations: Evaluations of combined plans.
        baseline_params, baseline_flops: The original model's totals.
        params, flops: Predicted totals of the compressed model.
        baseline_accuracy, accuracy: Top-1 accuracy on the search data of the
            original and of the planned model (fixed_loss); None for fixed_params.
        seconds: Wall time of the search.
        layers: One entry per edit, in plan order.
        trials: The whole-model candidates the search evaluated, in the order it
            evaluated them; exactly one is chosen (see `Trial`).
    """

    method: str
    plan: Plan
    budget: Budget
    achieved: float
    met: bool
    baseline_params: int
    baseline_flops: int
    params: int
    flops: int
    seconds: float
    evaluations: int = 0
    cached_evaluations: int = 0
    sensitivity_evaluations: int = 0
    confirmation_evaluations: int = 0
    baseline_accuracy: Optional[float] = None
    accuracy: Optional[float] = None
    layers: tuple[LayerChoice, ...] = ()
    trials: tuple[Trial, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the plan as `Plan.to_dict`)."""
        return {
            "method": self.method,
            "budget": {**self.budget.to_dict(), "achieved": self.achieved, "met": self.met},
            "baseline": {
                "params": self.baseline_params,
                "flops": self.baseline_flops,
                "accuracy": self.baseline_accuracy,
            },
            "predicted": {"params": self.params, "flops": self.flops, "accuracy": self.accuracy},
            "evaluations": {
                "total": self.evaluations,
                "cached": self.cached_evaluations,
                "sensitivity": self.sensitivity_evaluations,
                "confirmation": self.confirmation_evaluations,
            },
            "seconds": self.seconds,
            "layers": [layer.to_dict() for layer in self.layers],
            "trials": [trial.to_dict() for trial in self.trials],
            "plan": self.plan.to_dict(),
        }


def plan_for(
    model: keras.Model,
    chosen: Mapping[str, Option],
    candidates: Sequence[LayerCandidates],
    skipped: Sequence[SkippedLayer],
    kept_reason: str,
) -> Plan:
    """The plan of the chosen options, in candidate order, with its model's identity.

    Candidate layers without a chosen option join `skipped` with `kept_reason`.
    """
    edits = tuple(chosen[c.name].edit for c in candidates if c.name in chosen)
    kept = tuple(SkippedLayer(c.name, kept_reason) for c in candidates if c.name not in chosen)
    return Plan(model=model_identity(model), edits=edits, skipped=tuple(skipped) + kept)


def model_identity(model: keras.Model) -> dict[str, Any]:
    """What a plan records of the model it was made for: name, params, fingerprint."""
    return {"name": model.name, "params": int(model.count_params()), "fingerprint": model_fingerprint(model)}


def chosen_options(candidates: Sequence[LayerCandidates], allocation: Mapping[str, int]) -> dict[str, Option]:
    """Layer name → option for an allocation of option indices."""
    return {c.name: c.options[i] for c in candidates if (i := allocation.get(c.name)) is not None}


def predicted_cost(
    baseline: tuple[int, int], candidates: Sequence[LayerCandidates], chosen: Mapping[str, Option]
) -> tuple[int, int]:
    """(params, FLOPs) of the model with the chosen options: baseline − originals + options."""
    params, flops = baseline
    for candidate in candidates:
        option = chosen.get(candidate.name)
        if option is not None:
            params += option.params - candidate.params
            flops += option.flops - candidate.flops
    return params, flops


def layer_choices(
    candidates: Sequence[LayerCandidates],
    chosen: Mapping[str, Option],
    accuracies: Optional[Mapping[str, float]] = None,
    output_errors: Optional[Mapping[str, float]] = None,
) -> tuple[LayerChoice, ...]:
    """A LayerChoice per chosen option, in candidate order."""
    found = []
    for c in candidates:
        option = chosen.get(c.name)
        if option is None:
            continue
        found.append(
            LayerChoice(
                c.name,
                option.edit.technique,
                c.params,
                option.params,
                c.flops,
                option.flops,
                option.error,
                None if accuracies is None else accuracies.get(c.name),
                None if output_errors is None else output_errors.get(c.name),
            )
        )
    return tuple(found)
