"""fixed_loss: the most compressed plan whose accuracy drop on the search data meets the budget.

AIMET-style greedy compression-ratio selection, in three steps:

1. Sensitivity: for every layer and every option, the model with only that layer
   edited is evaluated once on the search data (through the effective-kernel
   `Evaluator`): its accuracy and how far its outputs moved from the original's.
   The table is cached on disk, keyed by the model's fingerprint, the data, and the
   option list, so another budget on the same model and data reuses it. It is saved
   as it grows (after each layer), so a run interrupted in this long step resumes
   where it stopped.
2. Allocation on one level τ of a sensitivity score: every layer takes its most
   compressing option (by the objective, FLOPs or params) whose single-layer score
   is at most τ, or stays as it is. Raising τ only ever compresses more.
3. Confirmation: a binary search over the distinct allocations (in order of τ) for
   the largest τ whose combined model's accuracy drop meets the budget: about log2
   of the number of distinct levels evaluations (7–9 on a ResNet-20).

The score is, by default, the single-layer output change ("output": Σ‖f̂ − f‖²/Σ‖f‖²,
see `compressor.search.evaluate`) rather than AIMET's single-layer accuracy drop
("accuracy"). On a few hundred search samples most light options flip no sample, so
their accuracy drops tie at 0 (or below, by chance) although their effects add up
once combined; the output change orders them by how much they really disturb the
model. On the digits ResNet-20 at a 2-point budget it found plans with 2–3 times the
FLOPs reduction, and smaller drops on held-out data.

Accuracies are compared as counts of correctly classified samples, so a budget of 0
accepts only plans that lose no sample. Under a metric with per-sample values (mse, mae,
a hook; `compressor.metrics`) the "counts" are sums of per-sample scores in the budget's
unit, compared without rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import keras

from compressor.errors import CompressorError
from compressor.io.atomic import write_bytes_atomic
from compressor.io.data import Dataset
from compressor.io.fingerprint import data_fingerprint, model_fingerprint
from compressor.metrics import TOP1, Metric
from compressor.search.budgets import Budget, BudgetError, achieved_drop
from compressor.search.candidates import LayerCandidates, baseline_cost
from compressor.search.evaluate import DEFAULT_BATCH_SIZE, Evaluator, check_labels
from compressor.search.kernels import KernelCache
from compressor.search.result import (
    Progress,
    SearchResult,
    Trial,
    chosen_options,
    layer_choices,
    plan_for,
    predicted_cost,
)
from compressor.surgery.plan import SkippedLayer

CACHE_VERSION = 1
OBJECTIVES = ("flops", "params")
SCORES = ("output", "accuracy")
KEPT_REASON = "left as it is: every option of it lost more accuracy than the budget allowed"

Allocation = dict[str, int]  # layer name → index of its option


@dataclass(frozen=True)
class Sensitivity:
    """Single-layer sensitivity of a model on some data.

    Attributes:
        samples: Number of samples evaluated.
        baseline: Samples the original model classifies right (under a metric with
            per-sample values, the sum of its scores: `Measurement.correct`).
        correct: Layer name → samples classified right with only that layer edited,
            one count per option, in the candidates' option order (or score sums).
        output_error: Layer name → output change with only that layer edited, per option.
    """

    samples: int
    baseline: float
    correct: dict[str, list[float]]
    output_error: dict[str, list[float]]

    def scores(self, name: str, score: str) -> list[float]:
        """A layer's per-option score: lost samples ("accuracy") or output change ("output")."""
        if score == "accuracy":
            return [float(self.baseline - count) for count in self.correct[name]]
        return self.output_error[name]

    @property
    def evaluations(self) -> int:
        """The baseline evaluation and one per option."""
        return 1 + sum(len(counts) for counts in self.correct.values())


def search_fixed_loss(
    model: keras.Model,
    candidates: Sequence[LayerCandidates],
    data: Dataset,
    budget: Budget,
    cache_dir: Optional[Path | str] = None,
    progress: Optional[Progress] = None,
    objective: str = "flops",
    skipped: Sequence[SkippedLayer] = (),
    kernels: Optional[KernelCache] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    score: str = "output",
    metric: Metric = TOP1,
) -> SearchResult:
    """The most compressed plan (by `objective`) whose search-data accuracy drop meets the budget.

    Args:
        model: The original model.
        candidates: From `layer_candidates(model, ...)`.
        data: Labelled search data (not the data the final accuracy is reported on).
        budget: An "accuracy_drop" budget.
        cache_dir: Folder for the sensitivity table (created if missing); None: no cache.
        progress: Called as progress("sensitivity", done, total) for each single-layer
            evaluation (first once with done = the evaluations read from the cache,
            when it holds any: done == total when it holds the whole table) and
            progress("search", done, total) for each confirmation evaluation
            (`total` is the binary search's upper bound).
        objective: "flops" or "params": what "most compressing" means.
        skipped: Layers `layer_candidates` skipped, carried into the plan.
        kernels: The cache `layer_candidates` filled, so effective kernels are not rebuilt.
        batch_size: Samples per forward pass.
        score: The sensitivity score the level τ is on: "output" (single-layer output
            change) or "accuracy" (single-layer accuracy drop, as AIMET); see the
            module docstring.
        metric: What the budget measures (`compressor.metrics`; default top-1).

    Returns:
        The result; `met` is always true (the empty plan loses nothing).

    Raises:
        BudgetError: Not an accuracy budget, an unknown objective or score.
        DataError: The data has no labels, or labels beyond the model's outputs.
    """
    if budget.kind != "accuracy_drop":
        raise BudgetError(f"fixed_loss meets an accuracy_drop budget; for a {budget.kind} budget use fixed_params")
    if objective not in OBJECTIVES:
        raise BudgetError(f"Invalid objective. Expected one of {OBJECTIVES}. Received: objective={objective!r}")
    if score not in SCORES:
        raise BudgetError(f"Invalid sensitivity score. Expected one of {SCORES}. Received: score={score!r}")
    check_labels(data)
    started = time.perf_counter()
    evaluator = Evaluator(model, data, kernels, batch_size, metric)
    table, cached = sensitivity_table(model, candidates, data, evaluator, cache_dir, progress)
    levels = allocations(candidates, table, objective, score)
    at, correct, tried = _confirm(candidates, levels, table, budget, evaluator, progress, metric)
    chosen_at = levels[at] if at >= 0 else {}
    chosen = chosen_options(candidates, chosen_at)
    baseline = baseline_cost(model, candidates)
    params, flops = predicted_cost(baseline, candidates, chosen)
    base_accuracy, accuracy = table.baseline / table.samples, correct / table.samples
    single = {name: table.correct[name][i] / table.samples for name, i in chosen_at.items()}
    moved = {name: table.output_error[name][i] for name, i in chosen_at.items()}
    drop = achieved_drop(base_accuracy, accuracy)
    return SearchResult(
        method="fixed_loss",
        plan=plan_for(model, chosen, candidates, skipped, KEPT_REASON),
        budget=budget,
        achieved=drop,
        met=table.baseline - correct <= _allowed_loss(budget, table.samples, metric),
        baseline_params=baseline[0],
        baseline_flops=baseline[1],
        params=params,
        flops=flops,
        seconds=time.perf_counter() - started,
        evaluations=table.evaluations + len(tried),
        cached_evaluations=cached,
        sensitivity_evaluations=table.evaluations,
        confirmation_evaluations=len(tried),
        baseline_accuracy=base_accuracy,
        accuracy=accuracy,
        layers=layer_choices(candidates, chosen, single, moved),
        trials=_trials(candidates, levels, tried, at, baseline, table, budget, metric),
    )


# --- 1. sensitivity ------------------------------------------------------------------------


def sensitivity_table(
    model: keras.Model,
    candidates: Sequence[LayerCandidates],
    data: Dataset,
    evaluator: Evaluator,
    cache_dir: Optional[Path | str] = None,
    progress: Optional[Progress] = None,
) -> tuple[Sensitivity, int]:
    """The sensitivity table: what the cache holds of it, the rest evaluated.

    The cache file is rewritten after each layer's options (and when an evaluation
    is interrupted, e.g. by Ctrl-C), so an interrupted run loses at most the layer
    it was in, and the next run evaluates only what is missing.

    Returns:
        (table, how many of its evaluations were read from the cache).
    """
    total = 1 + sum(len(c.options) for c in candidates)
    store = None
    measured = _Measured(evaluator.samples)
    if cache_dir is not None:
        key = sensitivity_key(model, data, candidates, evaluator.metric)
        store = _TableFile(Path(cache_dir).expanduser() / f"sensitivity-{key[:24]}.json", key, candidates,
                           evaluator.metric.binary)
        measured = store.load(evaluator.samples) or measured
    cached = measured.count
    if progress is not None and cached:
        progress("sensitivity", cached, total)
    _evaluate_missing(candidates, evaluator, measured, store, progress, total)
    return measured.table(), cached


def sensitivity_key(model: keras.Model, data: Dataset, candidates: Sequence[LayerCandidates],
                    metric: Metric = TOP1) -> str:
    """Hex sha256 of what a sensitivity table depends on: model, data, the option list, the metric.

    The option list holds the techniques and the sparsity pattern the user chose; the
    metric enters the key only when it is not top-1 (top-1 keys stay as they were).
    """
    content: dict[str, Any] = {} if metric.name == "top1" else {"metric": metric.name}
    content |= {
        "version": CACHE_VERSION,
        "model": model_fingerprint(model),
        "data": data_fingerprint(data.x, data.y),
        "options": {c.name: [option.edit.to_dict() for option in c.options] for c in candidates},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass
class _Measured:
    """The part of a sensitivity table measured so far: per layer, a prefix of its options."""

    samples: int
    baseline: Optional[float] = None
    correct: dict[str, list[float]] = field(default_factory=dict)
    output_error: dict[str, list[float]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Evaluations it holds: the baseline's and one per measured option."""
        return (self.baseline is not None) + sum(len(counts) for counts in self.correct.values())

    def table(self) -> Sensitivity:
        assert self.baseline is not None, "the baseline is measured first"
        return Sensitivity(self.samples, self.baseline, self.correct, self.output_error)


def _evaluate_missing(
    candidates: Sequence[LayerCandidates],
    evaluator: Evaluator,
    measured: _Measured,
    store: Optional["_TableFile"],
    progress: Optional[Progress],
    total: int,
) -> None:
    """Evaluate the baseline and the options `measured` lacks, saving after each layer."""
    done = measured.count

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("sensitivity", done, total)

    if measured.baseline is None:
        measured.baseline = evaluator.measure().correct
        step()
    for candidate in candidates:
        counts = measured.correct.setdefault(candidate.name, [])
        errors = measured.output_error.setdefault(candidate.name, [])
        if len(counts) == len(candidate.options):
            continue
        try:
            for option in candidate.options[len(counts):]:
                result = evaluator.measure([option.edit])
                counts.append(result.correct)
                errors.append(result.output_error)
                step()
        finally:
            # Also on an interruption: what was measured stays measured.
            if store is not None:
                store.save(measured)


class _TableFile:
    """The cache file of one sensitivity table, complete or in progress.

    Its layers hold a prefix of their options' results (all of them once evaluated);
    layers not reached yet are absent.
    """

    def __init__(self, path: Path, key: str, candidates: Sequence[LayerCandidates], counts: bool = True) -> None:
        self.path, self.key, self.counts = path, key, counts  # counts: whole sample counts, else score sums
        self.options = {c.name: [option.edit.to_dict() for option in c.options] for c in candidates}

    def save(self, measured: _Measured) -> None:
        content = {
            "version": CACHE_VERSION,
            "key": self.key,
            "samples": measured.samples,
            "baseline_correct": measured.baseline,
            "layers": {
                name: {"options": self.options[name], "correct": counts, "output_error": measured.output_error[name]}
                for name, counts in measured.correct.items()
                if counts
            },
        }
        try:
            write_bytes_atomic(self.path, (json.dumps(content, indent=1) + "\n").encode())
        except (CompressorError, OSError):
            pass  # an unwritable cache only costs the next run its sensitivity evaluations

    def load(self, samples: int) -> Optional[_Measured]:
        """What the file holds, if it is intact and made for this key and number of samples; None otherwise."""
        try:
            content = json.loads(self.path.read_text())
            if content["version"] != CACHE_VERSION or content["key"] != self.key or content["samples"] != samples:
                return None
            baseline = content["baseline_correct"]
            measured = _Measured(samples, None if baseline is None else _count(baseline, samples, self.counts))
            for name, entry in content["layers"].items():
                counts, errors = entry["correct"], entry["output_error"]
                if entry["options"] != self.options[name]:
                    return None
                if len(counts) != len(errors) or len(counts) > len(self.options[name]):
                    return None
                measured.correct[name] = [_count(value, samples, self.counts) for value in counts]
                measured.output_error[name] = [_error(value) for value in errors]
            if measured.baseline is None and measured.correct:
                return None  # options without the baseline they are compared with
            return measured
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing or corrupt: evaluated again and rewritten


def _count(value: Any, most: float, whole: bool = True) -> float:
    if not whole:  # a sum of scores: any finite number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"not a score sum: {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(f"not a sample count: {value!r}")
    return value


def _error(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"not an output error: {value!r}")
    return float(value)


# --- 2. and 3. allocation and confirmation ---------------------------------------------------


def allocations(
    candidates: Sequence[LayerCandidates], table: Sensitivity, objective: str, score: str = "output"
) -> list[Allocation]:
    """The distinct allocations for increasing levels τ of the score.

    At level τ each layer takes its most compressing option (least `objective` cost,
    then least score) among those scoring at most τ alone, or stays as it is. The
    levels are the scores in the table, so consecutive allocations differ by at
    least one layer's option.
    """
    scores = {c.name: table.scores(c.name, score) for c in candidates}
    levels = sorted({value for per_layer in scores.values() for value in per_layer})
    found: list[Allocation] = []
    for tau in levels:
        allocation: Allocation = {}
        for c in candidates:
            allowed = [i for i, value in enumerate(scores[c.name]) if value <= tau]
            if allowed:
                allocation[c.name] = min(allowed, key=lambda i: (c.options[i].cost(objective), scores[c.name][i]))
        if allocation and (not found or allocation != found[-1]):
            found.append(allocation)
    return found


def _confirm(
    candidates: Sequence[LayerCandidates],
    levels: list[Allocation],
    table: Sensitivity,
    budget: Budget,
    evaluator: Evaluator,
    progress: Optional[Progress],
    metric: Metric = TOP1,
) -> tuple[int, float, list[tuple[int, float]]]:
    """Binary search for the last allocation whose combined drop meets the budget.

    Returns:
        (index in `levels` of the accepted allocation, -1 for none; its correct
        count; (index, correct count) of each evaluated allocation, in order). Of
        the evaluated allocations that meet the budget, the last in `levels` order
        (the most compressed) is accepted; the empty allocation (the original
        model) always meets it.
    """
    allowed = _allowed_loss(budget, table.samples, metric)
    by_name = {c.name: c for c in candidates}
    accepted, accepted_correct = -1, table.baseline
    tried: list[tuple[int, float]] = []
    low, high = -1, len(levels)  # low: meets the budget (-1 = no edits); high: does not (or beyond)
    total = math.ceil(math.log2(len(levels) + 1))
    while high - low > 1:
        middle = (low + high) // 2
        correct = evaluator.correct(by_name[name].options[i].edit for name, i in levels[middle].items())
        tried.append((middle, correct))
        if progress is not None:
            progress("search", len(tried), max(total, len(tried)))
        if table.baseline - correct <= allowed:
            low, accepted, accepted_correct = middle, middle, correct
        else:
            high = middle
    return accepted, accepted_correct, tried


def _trials(
    candidates: Sequence[LayerCandidates],
    levels: list[Allocation],
    tried: list[tuple[int, float]],
    accepted: int,
    baseline: tuple[int, int],
    table: Sensitivity,
    budget: Budget,
    metric: Metric = TOP1,
) -> tuple[Trial, ...]:
    """A trial per evaluated allocation, at its predicted cost; first the original when it was kept."""
    allowed = _allowed_loss(budget, table.samples, metric)
    found = []
    if accepted < 0:  # measured as the sensitivity baseline
        found.append(Trial("layers", baseline[0], baseline[1], table.baseline / table.samples, True, True))
    for index, correct in tried:
        params, flops = predicted_cost(baseline, candidates, chosen_options(candidates, levels[index]))
        met = table.baseline - correct <= allowed
        found.append(Trial("layers", params, flops, correct / table.samples, met, index == accepted))
    return tuple(found)


def _allowed_loss(budget: Budget, samples: int, metric: Metric = TOP1) -> float:
    """The most samples the budget allows to lose (a score sum, not rounded, under a metric with per-sample values)."""
    if not metric.binary:
        return budget.limit * samples + 1e-9 * samples
    return int(math.floor(budget.limit * samples + 1e-9))
