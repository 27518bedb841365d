"""Recovery fine-tuning: distil the original model into its compressed copy.

Compression (fewer channels, low-rank factors, masked kernels) costs accuracy;
training the compressed model (the student) for a few epochs with the original (the
teacher) as a guide recovers most of it. The loss is knowledge distillation
(Hinton et al.):

    distillation · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − distillation) · CE(y, s)

with t, s the teacher's and student's logits and T the temperature
(`compressor.distillation`, shared with gate training). Without a teacher the loss is
the labels' cross-entropy alone; without labels, the teacher term alone.

Masked kernels stay sparse, and gradual sparsity prunes layers during the run
(`compressor.kernel_masks`). The train step is a `tf.function` (XLA where `model.fit`
would use it: a GPU is present and every layer supports it); tf.data streams its
batches, and `distribute="mirrored"` runs it on every local device
(`compressor.finetune_step`).

A run makes `epochs` passes over the data, each in a new order drawn from the seed,
and stops after `max_steps` optimizer steps in all when that is set (the last epoch
is then cut short). The accuracy on the validation data is checked at the end of
each epoch and, with `check_every`, every that many steps as well; the run stops
early at a check that reaches the target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf

from compressor.distillation import DEFAULT_TEMPERATURE, teacher_logits
from compressor.errors import CompressorError, DataError
from compressor.config import DISTRIBUTE
from compressor.finetune_step import TEACHER_PASSES, batch_sizes, batches, distribute_strategy, in_scope, train_step
from compressor.graph.walk import nested_layers
from compressor.io.data import Dataset
from compressor.kernel_masks import KernelMasks, kernel_layers
from compressor.surgery.plan import SparsitySpec
from compressor.techniques.base import kernel_index

EpochCallback = Callable[[int, int, dict], None]
StepCallback = Callable[[int, int], None]

PROGRESS_UPDATES = 200
"""About how many times a run reports its progress (`on_step`)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune.

    Attributes:
        epochs: Passes over the training data, >= 1.
        batch_size: Samples per optimizer step, >= 1.
        learning_rate: Adam's initial learning rate, > 0; it decays along a cosine to
            0 over the planned steps.
        temperature: Distillation temperature T, > 0; higher softens both
            distributions so the teacher's ranking of wrong classes counts more.
        distillation: Weight of the teacher term in [0, 1]; the labels' cross-entropy
            gets 1 − distillation.
        seed: Seeds shuffling, dropout and every other random choice of the run.
        max_steps: At most this many optimizer steps in the run (None: `epochs`
            whole passes); the cosine decay and gradual sparsity span the steps
            the run plans, min(epochs · batches per epoch, max_steps).
        teacher_pass: "once" (the teacher's outputs computed before the run and
            streamed with the inputs) or "per_batch" (computed inside each step).
        distribute: "none" or "mirrored" (every local device, `MirroredStrategy`).
        check_every: Also check the validation accuracy (and the early stop) every
            this many steps, not only at each epoch's end (None: only there).
    """

    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    temperature: float = DEFAULT_TEMPERATURE
    distillation: float = 0.7
    seed: int = 0
    max_steps: Optional[int] = None
    teacher_pass: str = "once"
    distribute: str = "none"
    check_every: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "check_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), "an integer >= 1 or None", 1)
        for name, choices in (("teacher_pass", TEACHER_PASSES), ("distribute", DISTRIBUTE)):
            if getattr(self, name) not in choices:
                raise CompressorError(
                    f"Invalid {name}. Expected one of {choices}. Received: {name}={getattr(self, name)!r}"
                )
        _check_int("epochs", self.epochs, "an integer >= 1", 1)
        _check_int("batch_size", self.batch_size, "an integer >= 1", 1)
        _check_number("learning_rate", self.learning_rate, "a number > 0", lambda v: v > 0)
        _check_number("temperature", self.temperature, "a number > 0", lambda v: v > 0)
        _check_number("distillation", self.distillation, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        _check_int("seed", self.seed, "an integer >= 0", 0)


@dataclass(frozen=True)
class GradualSparsity:
    """Prune layers during fine-tuning, gradually, to a final mask pattern.

    At every `frequency`-th step between `begin_fraction` and `end_fraction` of the
    planned steps, each target layer's kernel is masked again, in its target's
    pattern, at the density tfmot's `PolynomialDecay(0, 1 − density, begin, end,
    power, frequency)` gives for that step; the last update uses the target itself,
    so the final mask keeps exactly `kept_count(kernel, target)` weights. An "n:m"
    target has one density (n/m): it is applied whole from `begin_fraction` on. A
    layer that also has a fixed mask (`finetune(masks=...)`) keeps that mask's zeros
    and ranks them last, so it ends with the target count or, if its mask keeps fewer
    weights than that, with its mask's.

    Attributes:
        targets: Layer name (qualified `outer/inner` in nested models) -> final pattern.
        begin_fraction: Fraction of the planned steps at which pruning starts, in [0, 1).
        end_fraction: Fraction at which the target density is reached, in
            (begin_fraction, 1].
        frequency: Steps between mask updates, >= 1.
        power: Exponent of the schedule, >= 1: the higher, the faster the density
            falls early on.
    """

    targets: Mapping[str, SparsitySpec]
    begin_fraction: float = 0.0
    end_fraction: float = 0.6
    frequency: int = 20
    power: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.targets, Mapping) or not self.targets:
            raise CompressorError(
                "Invalid targets. Expected a non-empty mapping of layer name to SparsitySpec. "
                f"Received: targets={self.targets!r}"
            )
        for name, spec in self.targets.items():
            if not isinstance(spec, SparsitySpec):
                raise CompressorError(
                    f"Invalid target for layer {name!r}. Expected a SparsitySpec. Received: {spec!r}"
                )
            if spec.structure != "n:m" and spec.density <= 0:
                raise CompressorError(
                    f"Invalid target density for layer {name!r}. Expected a density > 0 "
                    f"(a layer with no weights left cannot be trained). Received: density={spec.density}"
                )
        _check_number("begin_fraction", self.begin_fraction, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _check_number(
            "end_fraction", self.end_fraction, f"a number in ({self.begin_fraction}, 1]",
            lambda v: self.begin_fraction < v <= 1,
        )
        _check_int("frequency", self.frequency, "an integer >= 1", 1)
        _check_int("power", self.power, "an integer >= 1", 1)


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        epochs_run: Epochs begun (the last one may have been cut short by
            `max_steps` or an early stop within it).
        steps: Optimizer steps taken.
        history: Per check (each epoch's end, and every `check_every` steps):
            {"epoch" (from 1), "step" (steps taken so far), "loss" (mean over the
            samples since the previous check), "val_accuracy" (None without
            validation data)}, and with gradual sparsity "density": {layer: fraction
            of its kernel kept}.
        stopped_early: Whether `target_accuracy` was reached before the planned
            steps ran out.
        seconds: Wall-clock time of the run.
        replicas: Devices the steps ran on (1 unless `distribute` is "mirrored").
    """

    epochs_run: int
    steps: int
    history: tuple[dict, ...]
    stopped_early: bool
    seconds: float
    replicas: int = 1


def finetune(
    student: keras.Model,
    teacher: Optional[keras.Model],
    train: Dataset,
    config: FinetuneConfig,
    *,
    val: Optional[Dataset] = None,
    target_accuracy: Optional[float] = None,
    masks: Optional[Mapping[str, np.ndarray]] = None,
    sparsity: Optional[GradualSparsity] = None,
    teacher_outputs: Optional[np.ndarray] = None,
    on_epoch: Optional[EpochCallback] = None,
    on_step: Optional[StepCallback] = None,
    measure_last: bool = True,
) -> FinetuneResult:
    """Train `student` in place, distilling `teacher` into it (module docstring).

    Args:
        student: The compressed model; a single-output classifier. Its weights change.
        teacher: The original model, or None (labels only, or `teacher_outputs`).
        train: Training data; its labels may be None when a teacher is given.
        config: Epochs, batch size, learning rate, temperature, weights, seed.
        val: Labelled data whose accuracy is measured after each epoch.
        target_accuracy: Stop at a check (module docstring) where the accuracy on
            `val` reaches it (needs `val`). With gradual sparsity, not before the
            target density is reached.
        masks: Layer name -> boolean array shaped like that layer's kernel: the
            weights where it is False are set to 0 and held there (`fixed_masks`).
        sparsity: Layers to prune gradually during the run.
        teacher_outputs: The teacher's predictions for `train.x`
            (`teacher_predictions`), to reuse across runs; used instead of `teacher`.
        on_epoch: Called after each epoch with (epoch, epochs, history entry).
        on_step: Called as on_step(steps done, steps planned) about
            PROGRESS_UPDATES times in the run, and after its last step.
        measure_last: Whether the check after the last planned step measures `val`.
            False for a caller that measures the result itself (a search checks each
            step on its own terms): that check can stop nothing, and measuring
            6,000 images costs a fifteenth of a 500-step run. Its history entry
            then has no val_accuracy.

    Returns:
        What the run did; the trained weights are in `student`.

    Raises:
        CompressorError: Neither a teacher nor labels; `target_accuracy` without
            labelled `val`; a mask or target that names no kernel layer or does not
            fit its kernel (PlanError); data that does not fit the models; a
            student with no trainable weights.
    """
    start = time.perf_counter()
    classes = _check_student(student)
    _check_run(train, val, target_accuracy, classes)
    keras.utils.set_random_seed(config.seed)
    per_batch = config.teacher_pass == "per_batch" and teacher is not None and teacher_outputs is None
    soft = None if per_batch else teacher_logits(teacher, train, classes, teacher_outputs)
    weights = _loss_weights(train.y is not None, per_batch or soft is not None, config.distillation)
    strategy = distribute_strategy(config.distribute)
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    if len(train) < replicas:
        raise DataError(f"the training data from {train.source} has {len(train)} sample(s), fewer than the {replicas} devices")
    sizes = batch_sizes(len(train), config.batch_size, replicas)
    planned = config.epochs * len(sizes)
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    model = student if strategy is None else in_scope(student, strategy)
    masker = KernelMasks(model, masks or {}, sparsity, planned)
    # Missing labels or teacher outputs are zeros the loss gives no weight: one step signature.
    arrays = (
        train.x,
        np.zeros(len(train), np.int64) if train.y is None else train.y.astype(np.int64),
        np.zeros((len(train), 1), np.float32) if soft is None else soft,
    )
    step_teacher = None if not per_batch else teacher if strategy is None else in_scope(teacher, strategy)
    jit = strategy is None and _use_xla(model)
    step_fn = train_step(model, step_teacher, arrays, planned, config, weights, masker, strategy, jit)
    progress = _Progress(on_step, planned)
    rng = np.random.default_rng(config.seed)
    history: list[dict] = []
    step, stopped_early, epoch = 0, False, 0
    while epoch < config.epochs and step < planned and not stopped_early:
        epoch += 1
        epoch_sizes = sizes[: planned - step]
        order = rng.permutation(len(train))[: sum(epoch_sizes)]
        losses, seen, counted = [], 0, 0
        for size, (x, y, t) in zip(epoch_sizes, batches(arrays, order, epoch_sizes, strategy)):
            masker.update(step)
            # Kept as tensors until a check: reading each loss would wait for its step.
            losses.append(step_fn(x, y, t) * size)
            step, seen, counted = step + 1, seen + size, counted + size
            progress(step)
            at_end = seen == len(order)
            if at_end or (config.check_every and step % config.check_every == 0):
                measured = val if measure_last or step < planned else None
                entry = _check(model, measured, sparsity, masker, epoch, step, float(np.sum(losses)) / counted)
                history.append(entry)
                losses, counted = [], 0
                if at_end and on_epoch is not None:
                    on_epoch(epoch, config.epochs, dict(entry))
                reached = measured is not None and target_accuracy is not None and entry["val_accuracy"] >= target_accuracy
                if reached and step < planned and masker.pruning_done(step):
                    stopped_early = True
                    break
    masker.finish()
    if sparsity is not None:
        history[-1]["density"] = masker.densities()
    if model is not student:
        student.set_weights(model.get_weights())
    return FinetuneResult(epoch, step, tuple(history), stopped_early, time.perf_counter() - start, replicas)


def fixed_masks(model: keras.Model, min_zeros: float = 0.3) -> dict[str, np.ndarray]:
    """Masks (kernel != 0) of the layers whose main kernel is at least `min_zeros` zeros.

    Those are the layers a sparsity edit masked; passing these masks to `finetune`
    keeps them sparse. A dense layer's few exact zeros stay below the threshold.

    Args:
        model: A Functional or Sequential model.
        min_zeros: Fraction of exact zeros, in (0, 1], that marks a layer as masked.

    Returns:
        Layer name (qualified `outer/inner` in nested models) -> boolean mask shaped
        like its kernel, True where the weight is kept.

    Raises:
        CompressorError: `min_zeros` out of range, or the model has no layer graph.
    """
    _check_number("min_zeros", min_zeros, "a number in (0, 1]", lambda v: 0 < v <= 1)
    masks = {}
    for name, layer in kernel_layers(model).items():
        kernel = keras.ops.convert_to_numpy(layer.weights[kernel_index(layer)])
        if kernel.size and np.mean(kernel == 0) >= min_zeros:
            masks[name] = kernel != 0
    return masks


def accuracy(model: keras.Model, data: Dataset, batch_size: int = 256) -> float:
    """Fraction of `data` whose label is the model's top output, in inference mode."""
    predicted = np.argmax(model.predict(data.x, batch_size=batch_size, verbose=0), axis=-1)
    return float(np.mean(predicted == data.y))


# --- checks ----------------------------------------------------------------------------


def _check_int(name: str, value: Any, expected: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CompressorError(f"Invalid {name}. Expected {expected}. Received: {name}={value!r}")


def _check_number(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> None:
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise CompressorError(f"Invalid {name}. Expected {expected}. Received: {name}={value!r}")


def _check_student(student: keras.Model) -> int:
    """The student's number of classes; it must have one (batch, classes) output."""
    outputs = getattr(student, "outputs", None) or []
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[-1] is None:
        shapes = [tuple(o.shape) for o in outputs]
        raise CompressorError(
            f"fine-tuning needs a classifier with one (batch, classes) output; "
            f"model {student.name!r} has outputs {shapes}"
        )
    return int(outputs[0].shape[-1])


def _check_run(train: Dataset, val: Optional[Dataset], target_accuracy: Optional[float], classes: int) -> None:
    if len(train) == 0:
        raise DataError(f"the training data from {train.source} is empty")
    for data in (train, val):
        if data is not None and data.y is not None and data.y.size and data.y.max() >= classes:
            raise DataError(
                f"{data.source} has label {int(data.y.max())}, but the model has {classes} classes (0..{classes - 1})"
            )
    if val is not None and val.y is None:
        raise DataError(f"validation data from {val.source} has no labels: accuracy needs them")
    if target_accuracy is not None:
        _check_number("target_accuracy", target_accuracy, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        if val is None:
            raise CompressorError("target_accuracy needs validation data (val) to measure accuracy on")


def _loss_weights(has_labels: bool, has_teacher: bool, distillation: float) -> tuple[float, float]:
    """(teacher weight, labels weight); a term without its data gets 0, the other 1."""
    if has_labels and has_teacher:
        return distillation, 1.0 - distillation
    if has_teacher:
        return 1.0, 0.0
    if has_labels:
        return 0.0, 1.0
    raise CompressorError(
        "fine-tuning needs labels or a teacher: the training data has no labels (y) "
        "and neither teacher nor teacher_outputs was given"
    )


# --- training --------------------------------------------------------------------------


def _check(model, val, sparsity, masker, epoch: int, step: int, loss: float) -> dict:
    """A history entry: `loss` (the mean since the previous check), the accuracy on `val` now."""
    entry = {"epoch": epoch, "step": step, "loss": loss, "val_accuracy": None if val is None else accuracy(model, val)}
    if sparsity is not None:
        entry["density"] = masker.densities()
    return entry


class _Progress:
    """Calls on_step(done, planned) every planned / PROGRESS_UPDATES steps and at the last."""

    def __init__(self, on_step: Optional[StepCallback], planned: int) -> None:
        self.on_step, self.planned = on_step, planned
        self.every = max(1, planned // PROGRESS_UPDATES)

    def __call__(self, step: int) -> None:
        if self.on_step is not None and (step % self.every == 0 or step == self.planned):
            self.on_step(step, self.planned)


def _use_xla(model: keras.Model) -> bool:
    """XLA when `model.fit` would choose it: a GPU is present and every layer supports it."""
    if not tf.config.list_physical_devices("GPU"):
        return False  # Keras leaves XLA off on CPU-only machines too: slower to compile than it saves
    from tensorflow.python.framework.config import is_op_determinism_enabled

    if is_op_determinism_enabled():
        return False  # not every XLA op has a deterministic kernel
    return all(getattr(layer, "supports_jit", True) for layer in nested_layers(model))
