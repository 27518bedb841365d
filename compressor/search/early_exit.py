"""Train early exits on a (compressed) model and calibrate them to an accuracy budget.

Training (`train_heads`). The network is frozen: each head (`exit_head`) learns from
the pooled features of its exit point (a coarse grid of averages and a global max) on
the training data, computed once, with the cross-entropy against a mix of the labels
and the network's own output (distillation from the final output: `distillation` of
the target is the network's answer).

Calibration (`calibrate`). Each exit answers when its confidence (largest softmax
probability) reaches its threshold. On the search data, every combination of
thresholds from a grid (quantiles of each exit's confidence, and closed) is scored by
the FLOPs it runs per input on average, and kept only if it holds against the
original's correctness as a search step does (`compressor.search.confidence.step_holds`:
the run's guard can be expected to accept it). The cheapest combination that holds is
chosen; exits it closes are left out of the model.

FLOPs are not latency: an exit costs its head and one condition for every input that
reaches it, whether it answers or not, and on a small network that overhead is of the
order of what a late exit saves. So every subset of the exits is calibrated on its own,
and, given a timer, the candidates are built (`compressor.techniques.early_exit.insert_exits`)
and timed as TFLite files; the fastest is kept, for the run's guard to judge.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np

from compressor.errors import CompressorError
from compressor.io.data import Dataset
from compressor.layers.early_exit import CLOSED, exit_layers
from compressor.search.channel_search import GUARD_CHANCE
from compressor.search.confidence import step_holds
from compressor.techniques.early_exit import (
    EXIT_TARGETS,
    GRID,
    ExitPoint,
    choose_points,
    exit_head,
    exit_points,
    insert_exits,
    pooled_features,
    set_thresholds,
)

Log = Callable[[str], None]
Timer = Callable[[list], list]
"""Mean latency per input (ms) of each model of a list (`compressor.bench.keras_latency.tflite_latencies`)."""

QUANTILES = (0.0, 0.2, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
"""Where each exit's candidate thresholds sit among its confidences on the search data."""


@dataclass(frozen=True)
class ExitSettings:
    """How exits are placed, trained and calibrated.

    Attributes:
        targets: Exit points are the ones nearest these fractions of the FLOPs.
        hidden: Units of each head's hidden layer.
        grid: A head pools its feature map to at most this many cells a side (`pooled_features`; 1: global).
        epochs: Passes of head training over the training data.
        learning_rate: Adam's learning rate for the heads.
        batch_size: Samples per step.
        distillation: Weight of the network's own answer in each head's target (the labels get the rest).
        seed: Shuffling and initialization seed.
        confidence, guard_samples, guard_chance: The step rule (`step_holds`), as the searches use it.
    """

    targets: tuple[float, ...] = EXIT_TARGETS
    hidden: int = 128
    grid: int = GRID
    epochs: int = 15
    learning_rate: float = 3e-3
    batch_size: int = 256
    distillation: float = 0.5
    seed: int = 0
    confidence: Optional[float] = None
    guard_samples: Optional[int] = None
    guard_chance: float = GUARD_CHANCE


@dataclass
class ExitOutcome:
    """What `add_exits` made.

    Attributes:
        model: The early-exit model, or None (see `reason`).
        points: The exit points trained, in graph order.
        head_accuracy: Each trained head's accuracy on the search data (every input answered there).
        thresholds: Per trained point: the calibrated threshold, CLOSED for an exit left out.
        kept: The points of the exits in `model`, in graph order.
        costs: FLOPs per input answered at each kept exit, then at the end of the network.
        rates: Share of the search data answered at each kept exit, then at the end.
        mean_flops: FLOPs per input on the search data, on average.
        static_flops: FLOPs of the network without exits.
        accuracy: The early-exit model's accuracy on the search data.
        baseline_accuracy: The original's there.
        seconds: Wall time.
        reason: Why there is no model, for people.
        latency_check: The TFLite timing of the model without exits and of the chosen exits.
        candidates: Each calibrated exit set: its exits, thresholds, rates, FLOPs per input
            and accuracy on the search data, and its measured latency ("ms") when timed.
    """

    model: Optional[keras.Model]
    points: list[ExitPoint]
    settings: ExitSettings
    head_accuracy: list[float] = field(default_factory=list)
    thresholds: tuple[float, ...] = ()
    kept: tuple[str, ...] = ()
    costs: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    mean_flops: Optional[float] = None
    static_flops: int = 0
    accuracy: Optional[float] = None
    baseline_accuracy: Optional[float] = None
    seconds: float = 0.0
    reason: Optional[str] = None
    latency_check: Optional[dict] = None
    candidates: list[dict] = field(default_factory=list)


def add_exits(static: keras.Model, train: Dataset, search: Dataset, baseline_correct: np.ndarray, limit: float,
              settings: ExitSettings, final_correct: Optional[np.ndarray] = None, timer: Optional[Timer] = None,
              log: Log = lambda message: None) -> ExitOutcome:
    """Place, train and calibrate exits on `static` (module docstring).

    Every subset of the trained exits is calibrated on its own (an exit costs its head
    and a condition for every input that reaches it, so fewer exits can be faster).
    With `timer`, the candidates are timed and the fastest is kept; without, the one
    that runs the fewest FLOPs per input on the search data.

    Args:
        static: The network (not changed).
        train: Labelled training data for the heads.
        search: Labelled search (selection) data for the thresholds.
        baseline_correct: Per search sample, whether the original gets it right.
        limit: The accuracy budget (a drop, against the original).
        settings: Placement, training and the step rule.
        final_correct: Per search sample, whether the network's answer is right as the
            run judges it (its quantized file); default: the Keras model's.
        timer: Gives the mean latency per input (ms) of each model of a list, `static` first.

    Raises:
        CompressorError: The model has no exit point, or data without labels.
    """
    from compressor.graph.cost import model_cost

    started = time.perf_counter()
    for data in (train, search):
        if data.y is None:
            raise CompressorError(f"early exits need labels: {data.source} has no 'y'")
    points = choose_points(exit_points(static), settings.targets)
    if not points:
        raise CompressorError(f"model '{static.name}' has no exit point (a feature map the whole network goes through)")
    classes = int(static.outputs[0].shape[-1])
    log(f"early exits: training heads after {', '.join(p.name for p in points)}")
    heads = train_heads(static, points, train, classes, settings)
    exit_probabilities, final = exit_answers(static, points, heads, search.x)
    final_correct = (final.argmax(-1) == search.y) if final_correct is None else np.asarray(final_correct, bool)
    outcome = ExitOutcome(None, points, settings, static_flops=model_cost(static).flops)
    outcome.head_accuracy = [float((p.argmax(-1) == search.y).mean()) for p in exit_probabilities]
    outcome.baseline_accuracy = float(np.mean(baseline_correct))
    head_flops = [model_cost(head).flops for head in heads]
    candidates: dict[tuple[int, ...], list[float]] = {}
    for size in range(len(points), 0, -1):
        for subset in itertools.combinations(range(len(points)), size):
            thresholds = calibrate(exit_probabilities, final_correct, search.y, baseline_correct, limit, points,
                                   head_flops, outcome.static_flops, settings, subset=subset)
            kept = tuple(k for k, t in enumerate(thresholds) if t < CLOSED)
            if kept:
                candidates.setdefault(kept, thresholds)
    if not candidates:
        outcome.thresholds = (CLOSED,) * len(points)
        outcome.reason = "no exit answers confidently enough for the accuracy to hold within the budget"
        outcome.seconds = time.perf_counter() - started
        return outcome
    probabilities = _probabilities(static, final)
    scored = []
    for kept, thresholds in candidates.items():
        choice, correct = _answered(exit_probabilities, final_correct, search.y, thresholds)
        costs = answer_costs([points[k] for k in kept], [head_flops[k] for k in kept], outcome.static_flops)
        index = _positions(choice, kept, len(points))
        scored.append({"exits": [points[k].name for k in kept], "thresholds": [thresholds[k] for k in kept],
                       "rates": [float(np.mean(index == i)) for i in range(len(kept) + 1)],
                       "flops": float(np.mean(np.asarray(costs, np.float64)[index])), "accuracy": float(correct.mean()),
                       "costs": costs, "kept": kept, "all_thresholds": thresholds})
    models = [build_exits(static, [points[k] for k in c["kept"]], [heads[k] for k in c["kept"]], c["thresholds"],
                          probabilities) for c in scored]
    if timer is not None:
        log(f"early exits: timing {len(models)} calibrated exit set(s) against the network without exits")
        static_ms, *times = timer([static, *models])
        for candidate, ms in zip(scored, times):
            candidate["ms"] = ms
        best = int(np.argmin(times))
        outcome.latency_check = {"static_ms": static_ms, "gated_ms": times[best]}
    else:
        best = int(np.argmin([c["flops"] for c in scored]))
    chosen = scored[best]
    outcome.candidates = [{key: c[key] for key in ("exits", "thresholds", "rates", "flops", "accuracy", "ms") if key in c}
                          for c in scored]
    outcome.thresholds = tuple(chosen["all_thresholds"])
    outcome.kept = tuple(chosen["exits"])
    outcome.costs, outcome.rates = chosen["costs"], chosen["rates"]
    outcome.mean_flops, outcome.accuracy = chosen["flops"], chosen["accuracy"]
    outcome.model = models[best]
    log(f"early exits: {', '.join(outcome.kept)} answer {1 - outcome.rates[-1]:.0%} of the search data; "
        f"{outcome.mean_flops / outcome.static_flops:.2f} of the FLOPs per input on average")
    outcome.seconds = time.perf_counter() - started
    return outcome


def _positions(choice: np.ndarray, kept: Sequence[int], exits: int) -> np.ndarray:
    """Per sample, the position among the `kept` exits of the one that answered, len(kept) for the end."""
    index = np.searchsorted(np.asarray(kept), choice)
    index[choice == exits] = len(kept)
    return index


def build_exits(static: keras.Model, points: Sequence[ExitPoint], heads: Sequence[keras.Model],
                thresholds: Sequence[float], probabilities: bool) -> keras.Model:
    """The early-exit model of `static` with these exits and thresholds (`probabilities`: as `ExitBranch`)."""
    model = insert_exits(static, points, heads, probabilities)
    set_thresholds(model, thresholds)
    return model


def answer_costs(points: Sequence[ExitPoint], head_flops: Sequence[int], static_flops: int) -> list[int]:
    """FLOPs per input answered at each exit (the network up to it, and every head so far), then at the end."""
    costs = [p.flops + sum(head_flops[: k + 1]) for k, p in enumerate(points)]
    return costs + [static_flops + sum(head_flops)]


def _features_model(static: keras.Model, points: Sequence[ExitPoint], grid: int) -> keras.Model:
    """`static`'s inputs → [pooled features at each point..., the network's output]."""
    from compressor.graph.walk import require_graph

    nodes = require_graph(static, "early exits").nodes
    tensors = [pooled_features(nodes[p.index].outputs[0], f"{p.name}_features", grid) for p in points]
    return keras.Model(static.inputs, [*tensors, static.outputs[0]])


def train_heads(static: keras.Model, points: Sequence[ExitPoint], train: Dataset, classes: int,
                settings: ExitSettings) -> list[keras.Model]:
    """One trained head per point (module docstring), in order."""
    keras.utils.set_random_seed(settings.seed)
    *features, final = _predict(_features_model(static, points, settings.grid), train.x)
    teacher = final if _probabilities(static, final) else _softmax(final)
    target = (1 - settings.distillation) * np.eye(classes, dtype=np.float32)[train.y.astype(int)]
    target += settings.distillation * teacher
    heads = []
    for point, pooled in zip(points, features):
        head = exit_head(point, classes, settings.hidden, f"{point.name}_exit_head", settings.grid)
        dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
        inputs = keras.Input(shape=pooled.shape[1:])
        mlp = keras.Model(inputs, dense[1](dense[0](inputs)))  # the head's own dense layers: trained in place
        steps = settings.epochs * int(np.ceil(len(pooled) / settings.batch_size))
        schedule = keras.optimizers.schedules.CosineDecay(settings.learning_rate, steps)
        mlp.compile(optimizer=keras.optimizers.Adam(schedule), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        scale = pooled.std(axis=0) + 1e-3  # features on one scale: the first dense layer absorbs it afterwards
        mlp.fit(pooled / scale, target, epochs=settings.epochs, batch_size=settings.batch_size, shuffle=True, verbose=0)
        kernel, bias = dense[0].get_weights()
        dense[0].set_weights([kernel / scale[:, None], bias])
        heads.append(head)
    return heads


def exit_answers(static: keras.Model, points: Sequence[ExitPoint], heads: Sequence[keras.Model],
                 x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each exit's softmax probabilities on `x` ([(n, classes)] per point) and the network's output."""
    from compressor.graph.walk import require_graph

    nodes = require_graph(static, "early exits").nodes
    answers = [keras.ops.softmax(head(nodes[p.index].outputs[0]), axis=-1) for p, head in zip(points, heads)]
    *probabilities, final = _predict(keras.Model(static.inputs, [*answers, static.outputs[0]]), x)
    return probabilities, final


def exit_choices(static: keras.Model, model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which exit answers each input of `x` in the early-exit `model` built from `static` (len(exits): the end).

    Returns:
        (exit index per input, each exit's probabilities).
    """
    branches = exit_layers(model)
    points = {p.name: p for p in exit_points(static)}
    missing = [b.point for b in branches if b.point not in points]
    if missing:
        raise CompressorError(f"the network has no exit point {', '.join(missing)}")
    probabilities, _ = exit_answers(static, [points[b.point] for b in branches], [b.head for b in branches], x)
    thresholds = [float(keras.ops.convert_to_numpy(b.threshold)) for b in branches]
    return _first_confident(probabilities, thresholds), probabilities


def calibrate(exit_probabilities: Sequence[np.ndarray], final_correct: np.ndarray, y: np.ndarray,
              baseline_correct: np.ndarray, limit: float, points: Sequence[ExitPoint], head_flops: Sequence[int],
              static_flops: int, settings: Any, subset: Optional[Sequence[int]] = None) -> list[float]:
    """The thresholds (CLOSED: exit left out) that run the fewest FLOPs per input on average and hold (module docstring).

    Args:
        subset: The exits that may open (default: all); the others stay CLOSED.
    """
    grids = []
    for k, probabilities in enumerate(exit_probabilities):
        if subset is not None and k not in subset:
            grids.append([CLOSED])
            continue
        confidence = probabilities.max(axis=-1)
        grids.append(sorted({float(np.quantile(confidence, q)) for q in QUANTILES}) + [CLOSED])
    best, best_cost = [CLOSED] * len(points), float("inf")
    for thresholds in itertools.product(*grids):
        kept = [k for k, t in enumerate(thresholds) if t < CLOSED]
        if not kept:
            continue
        choice, correct = _answered(exit_probabilities, final_correct, y, thresholds)
        costs = answer_costs([points[k] for k in kept], [head_flops[k] for k in kept], static_flops)
        index = _positions(choice, kept, len(points))
        cost = float(np.mean(np.asarray(costs, np.float64)[index]))
        if cost < best_cost and cost < costs[-1] and step_holds(baseline_correct, correct, limit, settings):
            best, best_cost = list(thresholds), cost
    return best


def _answered(exit_probabilities: Sequence[np.ndarray], final_correct: np.ndarray, y: np.ndarray,
              thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(which exit answers each sample, len(points) for the end; whether the answer is right)."""
    choice = _first_confident(exit_probabilities, thresholds)
    correct = final_correct.copy()
    for k, probabilities in enumerate(exit_probabilities):
        here = choice == k
        correct[here] = probabilities[here].argmax(-1) == y[here]
    return choice, correct


def _first_confident(exit_probabilities: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """Per sample, the first exit whose confidence reaches its threshold, else len(exits)."""
    n = len(exit_probabilities[0]) if exit_probabilities else 0
    choice = np.full(n, len(exit_probabilities), dtype=np.int64)
    for k in range(len(exit_probabilities) - 1, -1, -1):
        choice[exit_probabilities[k].max(axis=-1) >= thresholds[k]] = k
    return choice


def _predict(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    outputs = model.predict(x, batch_size=256, verbose=0)
    return [np.asarray(o, np.float32) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _probabilities(static: keras.Model, outputs: np.ndarray) -> bool:
    """Whether the network outputs probabilities (its graph, else its `outputs`)."""
    from compressor.graph.outputs import outputs_probabilities

    return outputs_probabilities(static, lambda: outputs[:256])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
