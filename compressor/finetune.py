"""Recovery fine-tuning: distil the original model into its compressed copy.

Compression (fewer channels, low-rank factors, masked kernels) costs accuracy;
training the compressed model (the student) for a few epochs with the original (the
teacher) as a guide recovers most of it. The loss is knowledge distillation
(Hinton et al.):

    distillation · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − distillation) · CE(y, s)

with t, s the teacher's and student's logits and T the temperature; T² keeps the
soft term's gradients on the scale of the label term's. Models that end in a
softmax have their log-probabilities (clipped) used as logits. Without a teacher
the loss is the labels' cross-entropy alone; without labels, the teacher term alone.

Masked kernels stay sparse: a mask multiplies the kernel's gradient (so Adam's
moments of a masked weight never build up) and the kernel itself after every
optimizer step (so nothing, a moment left from before the weight was masked
included, can revive it). Gradual sparsity prunes a layer during the run to a
target pattern, its density following tfmot's `PolynomialDecay` schedule.

The teacher's outputs are computed once, before training, in inference mode: they
do not change during the run, and one pass costs less than one teacher forward pass
per step. The train step is a `tf.function` (XLA where `model.fit` would use it: a
GPU is present and every layer supports it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError, DataError
from compressor.graph.calls import layer_calls
from compressor.io.data import Dataset
from compressor.surgery.plan import SparsitySpec
from compressor.techniques.base import kernel_index, kernel_name, pattern_kernel, restore_kernel
from compressor.techniques.sparsity import Sparsity, check_pattern
from compressor.techniques.sparsity import mask as sparsity_mask

EPSILON = 1e-7  # probabilities are clipped here before their log: log(0) would be -inf
EpochCallback = Callable[[int, int, dict], None]


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
    """

    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    temperature: float = 4.0
    distillation: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
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
        epochs_run: Epochs completed.
        steps: Optimizer steps taken.
        history: Per epoch: {"epoch" (from 1), "loss" (mean over the epoch's
            samples), "val_accuracy" (None without validation data)}, and with
            gradual sparsity "density": {layer: fraction of its kernel kept}.
        stopped_early: Whether `target_accuracy` was reached before the last epoch.
        seconds: Wall-clock time of the run.
    """

    epochs_run: int
    steps: int
    history: tuple[dict, ...]
    stopped_early: bool
    seconds: float


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
) -> FinetuneResult:
    """Train `student` in place, distilling `teacher` into it (module docstring).

    Args:
        student: The compressed model; a single-output classifier. Its weights change.
        teacher: The original model, or None (labels only, or `teacher_outputs`).
        train: Training data; its labels may be None when a teacher is given.
        config: Epochs, batch size, learning rate, temperature, weights, seed.
        val: Labelled data whose accuracy is measured after each epoch.
        target_accuracy: Stop once the accuracy on `val` reaches it (needs `val`).
            With gradual sparsity, not before the target density is reached.
        masks: Layer name -> boolean array shaped like that layer's kernel: the
            weights where it is False are set to 0 and held there (`fixed_masks`).
        sparsity: Layers to prune gradually during the run.
        teacher_outputs: The teacher's predictions for `train.x`
            (`teacher_predictions`), to reuse across runs; used instead of `teacher`.
        on_epoch: Called after each epoch with (epoch, epochs, history entry).

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
    soft = _teacher_logits(teacher, teacher_outputs, train, classes)
    weights = _loss_weights(train.y is not None, soft is not None, config.distillation)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    masker = _Masker(student, masks or {}, sparsity, config.epochs * steps_per_epoch)
    step_fn = _train_step(student, train.x, config, steps_per_epoch, weights, masker)
    # Missing labels or teacher outputs are zeros the loss gives no weight: one step signature.
    arrays = (
        train.x,
        np.zeros(len(train), np.int64) if train.y is None else train.y.astype(np.int64),
        np.zeros((len(train), 1), np.float32) if soft is None else soft,
    )
    rng = np.random.default_rng(config.seed)
    history: list[dict] = []
    step, stopped_early = 0, False
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(train))
        loss, step = _run_epoch(step_fn, masker, arrays, order, config.batch_size, step)
        entry = {"epoch": epoch, "loss": loss, "val_accuracy": None if val is None else accuracy(student, val)}
        if sparsity is not None:
            entry["density"] = masker.densities()
        history.append(entry)
        if on_epoch is not None:
            on_epoch(epoch, config.epochs, dict(entry))
        reached = target_accuracy is not None and entry["val_accuracy"] >= target_accuracy
        if reached and epoch < config.epochs and masker.pruning_done(step):
            stopped_early = True
            break
    masker.finish()
    if sparsity is not None:
        history[-1]["density"] = masker.densities()
    return FinetuneResult(len(history), step, tuple(history), stopped_early, time.perf_counter() - start)


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
    for name, layer in _kernel_layers(model).items():
        kernel = keras.ops.convert_to_numpy(layer.weights[kernel_index(layer)])
        if kernel.size and np.mean(kernel == 0) >= min_zeros:
            masks[name] = kernel != 0
    return masks


def teacher_predictions(teacher: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The teacher's outputs for `x`, in inference mode, to pass as `teacher_outputs`.

    Args:
        teacher: A single-output model.
        x: Inputs, batch first.
        batch_size: Samples per forward pass, >= 1.

    Returns:
        float32 array (N, classes): probabilities or logits, as the model outputs them.

    Raises:
        CompressorError: A bad batch size, or a model with several outputs.
    """
    _check_int("batch_size", batch_size, "an integer >= 1", 1)
    outputs = teacher.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(outputs, (list, tuple, dict)):
        raise CompressorError(f"the teacher {teacher.name!r} has several outputs; expected a single-output classifier")
    return np.asarray(outputs, dtype=np.float32)


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


# --- outputs as logits -----------------------------------------------------------------


def _teacher_logits(
    teacher: Optional[keras.Model], outputs: Optional[np.ndarray], train: Dataset, classes: int
) -> Optional[np.ndarray]:
    """The teacher's logits for every training sample, or None without a teacher."""
    probabilities = None
    if outputs is None:
        if teacher is None:
            return None
        probabilities = _ends_in_softmax(teacher)
        outputs = teacher_predictions(teacher, train.x)
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.shape != (len(train), classes):
        raise DataError(
            f"teacher outputs have shape {outputs.shape}; expected one row of {classes} class "
            f"scores per training sample: {(len(train), classes)}"
        )
    if probabilities is None:
        probabilities = _look_like_probabilities(outputs)
    return np.log(np.clip(outputs, EPSILON, 1.0)) if probabilities else outputs


def _ends_in_softmax(model: keras.Model) -> Optional[bool]:
    """True if the model's output layer applies softmax, False if it is linear, None if unknown."""
    try:
        last = layer_calls(model)[-1].operation
    except CompressorError:  # no layer graph (a subclassed model): unknown
        return None
    if isinstance(last, keras.layers.Softmax):
        return True
    if not hasattr(last, "get_config"):
        return None
    activation = last.get_config().get("activation", "<none>")
    if activation == "softmax":
        return True
    return False if activation in (None, "linear") else None


def _look_like_probabilities(outputs: np.ndarray) -> bool:
    """Whether rows are non-negative and sum to 1 (float32 rounding allowed)."""
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3))


def _student_outputs_probabilities(student: keras.Model, x: np.ndarray) -> bool:
    known = _ends_in_softmax(student)
    if known is not None:
        return known
    return _look_like_probabilities(np.asarray(student(x[:32], training=False), dtype=np.float32))


# --- training --------------------------------------------------------------------------


def _train_step(
    student: keras.Model,
    x_train: np.ndarray,
    config: FinetuneConfig,
    steps_per_epoch: int,
    weights: tuple[float, float],
    masker: "_Masker",
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], Any]:
    """A compiled step: forward in training mode, loss, Adam update, masks re-applied."""
    variables = list(student.trainable_variables)
    if not variables:
        raise CompressorError(f"model {student.name!r} has no trainable weights: nothing to fine-tune")
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * steps_per_epoch)
    optimizer = keras.optimizers.Adam(schedule)
    optimizer.build(variables)
    grad_masks = masker.masks_for(variables)
    soft_weight, label_weight = weights
    temperature = float(config.temperature)
    probabilities = _student_outputs_probabilities(student, x_train)

    def step(x: tf.Tensor, y: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            outputs = tf.cast(student(x, training=True), tf.float32)
            logits = tf.math.log(tf.clip_by_value(outputs, EPSILON, 1.0)) if probabilities else outputs
            loss = tf.constant(0.0)
            if soft_weight:
                loss += soft_weight * temperature**2 * _kl(t / temperature, logits / temperature)
            if label_weight:
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                loss += label_weight * tf.reduce_mean(ce)
            if student.losses:  # regularizers' penalties
                loss += tf.add_n([tf.cast(penalty, tf.float32) for penalty in student.losses])
        grads = tape.gradient(loss, variables)
        pairs = [
            (grad if keep is None else grad * keep, var)
            for grad, var, keep in zip(grads, variables, grad_masks)
            if grad is not None
        ]
        optimizer.apply_gradients(pairs)
        masker.apply_in_graph()
        return loss

    signature = [
        tf.TensorSpec((None, *x_train.shape[1:]), tf.as_dtype(x_train.dtype)),
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None, None), tf.float32),
    ]
    return tf.function(step, input_signature=signature, jit_compile=_use_xla(student))


def _run_epoch(
    step_fn: Callable, masker: "_Masker", arrays: tuple[np.ndarray, ...], order: np.ndarray, batch_size: int, step: int
) -> tuple[float, int]:
    """One pass over the data in `order`; returns (mean loss per sample, next step)."""
    losses = []
    for lo in range(0, len(order), batch_size):
        masker.update(step)
        batch = order[lo : lo + batch_size]
        # Kept as tensors until the epoch ends: reading each loss would wait for its step.
        losses.append(step_fn(*(array[batch] for array in arrays)) * len(batch))
        step += 1
    return float(np.sum(losses)) / len(order), step


def _kl(teacher_logits: tf.Tensor, student_logits: tf.Tensor) -> tf.Tensor:
    """Batch mean of KL(softmax(teacher) ‖ softmax(student))."""
    log_p = tf.nn.log_softmax(teacher_logits)
    log_q = tf.nn.log_softmax(student_logits)
    return tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1))


def _use_xla(model: keras.Model) -> bool:
    """XLA when `model.fit` would choose it: a GPU is present and every layer supports it."""
    if not tf.config.list_physical_devices("GPU"):
        return False  # Keras leaves XLA off on CPU-only machines too: slower to compile than it saves
    from tensorflow.python.framework.config import is_op_determinism_enabled

    if is_op_determinism_enabled():
        return False  # not every XLA op has a deterministic kernel
    return all(getattr(layer, "supports_jit", True) for layer in _all_layers(model))


def _all_layers(model: Any) -> list:
    layers = []
    for layer in getattr(model, "layers", ()):
        layers.append(layer)
        layers.extend(_all_layers(layer))
    return layers


# --- masks -----------------------------------------------------------------------------


def _kernel_layers(model: keras.Model) -> dict[str, Any]:
    """Layer name (qualified in nested models) -> layer, for the layers with a main kernel."""
    return {call.path: call.operation for call in layer_calls(model) if kernel_name(call.operation) is not None}


@dataclass
class _Masked:
    """One masked kernel: its variable, the mask applied to it, and where it comes from."""

    name: str
    layer: Any
    variable: Any
    mask: tf.Variable  # float32, 1 where kept; applied to gradients and weights
    fixed: Optional[np.ndarray]  # boolean, the user's mask, if any
    target: Optional[SparsitySpec]  # the gradual-sparsity target, if any
    sparsity: Optional[np.ndarray] = None  # the schedule's sparsity per step


class _Masker:
    """Holds the masked kernels of one run, and updates them on the sparsity schedule."""

    def __init__(
        self, model: keras.Model, masks: Mapping[str, np.ndarray], gradual: Optional[GradualSparsity], steps: int
    ) -> None:
        self._gradual = gradual
        self._entries: list[_Masked] = []
        targets = dict(gradual.targets) if gradual else {}
        names = list(masks) + [name for name in targets if name not in masks]
        layers = _kernel_layers(model) if names else {}
        for name in names:
            self._entries.append(self._entry(name, layers, masks.get(name), targets.get(name)))
        self._prune = np.zeros(steps, dtype=bool)
        self._end_step = 0
        if gradual is not None:
            self._plan(gradual, steps)
        for entry in self._entries:
            if entry.fixed is not None:
                self._set(entry, entry.fixed)

    @staticmethod
    def _entry(name: str, layers: dict, fixed: Optional[np.ndarray], target: Optional[SparsitySpec]) -> _Masked:
        if name not in layers:
            shown = ", ".join(sorted(layers)) or "none"
            raise CompressorError(f"no layer with a kernel named {name!r} to mask; layers with kernels: {shown}")
        layer = layers[name]
        variable = layer.weights[kernel_index(layer)]
        shape = tuple(variable.shape)
        if fixed is not None:
            fixed = np.asarray(fixed)
            if fixed.shape != shape:
                raise CompressorError(
                    f"the mask for layer {name!r} has shape {fixed.shape}; expected its kernel's shape {shape}"
                )
            fixed = fixed.astype(bool)
        if target is not None:
            _check_target(name, layer, target)
        mask = tf.Variable(np.ones(shape, np.float32), trainable=False, name="finetune_mask")
        return _Masked(name, layer, variable, mask, fixed, target)

    def _plan(self, gradual: GradualSparsity, steps: int) -> None:
        """Evaluate tfmot's schedule at every step of the run, once."""
        # Imported here: tfmot imports tf_keras, which takes seconds that runs without it need not spend.
        from tensorflow_model_optimization.sparsity.keras import PolynomialDecay

        begin = math.floor(gradual.begin_fraction * steps)
        end = max(round(gradual.end_fraction * steps), begin + 1)  # the schedule divides by end - begin
        self._end_step = end
        every_step = tf.range(steps, dtype=tf.int64)
        for entry in self._entries:
            if entry.target is None:
                continue
            final = 0.0 if entry.target.structure == "n:m" else 1.0 - entry.target.density
            schedule = PolynomialDecay(0.0, final, begin, end, power=gradual.power, frequency=gradual.frequency)
            prune, sparsity = schedule(every_step)
            self._prune = prune.numpy()
            entry.sparsity = sparsity.numpy()

    def masks_for(self, variables: list) -> list[Optional[tf.Variable]]:
        """The mask of each variable (None for unmasked ones), to multiply its gradient by."""
        by_id = {id(entry.variable): entry.mask for entry in self._entries}
        return [by_id.get(id(variable)) for variable in variables]

    def apply_in_graph(self) -> None:
        """Zero the masked weights (called inside the compiled step, after the optimizer)."""
        for entry in self._entries:
            entry.variable.assign(entry.variable * entry.mask)

    def update(self, step: int) -> None:
        """At a pruning step of the schedule, mask each target again at its density."""
        if step >= len(self._prune) or not self._prune[step]:
            return
        for entry in self._entries:
            if entry.target is not None:
                spec = entry.target if step >= self._end_step else _at_density(entry.target, entry.sparsity[step])
                self._set(entry, self._mask(entry, spec))

    def finish(self) -> None:
        """Give every target its exact final mask (a run may end before the schedule does)."""
        for entry in self._entries:
            if entry.target is not None:
                self._set(entry, self._mask(entry, entry.target))

    def pruning_done(self, step: int) -> bool:
        """Whether the schedule has reached its final densities by `step`."""
        return self._gradual is None or step > self._end_step

    def densities(self) -> dict[str, float]:
        """Fraction of each target kernel's weights that are kept."""
        return {
            entry.name: np.count_nonzero(keras.ops.convert_to_numpy(entry.mask)) / int(np.prod(entry.mask.shape))
            for entry in self._entries
            if entry.target is not None
        }

    @staticmethod
    def _mask(entry: _Masked, spec: SparsitySpec) -> np.ndarray:
        """The layer's mask in `spec`; weights the user's mask drops rank below every other."""
        layer = entry.layer
        kernel = pattern_kernel(layer, keras.ops.convert_to_numpy(entry.variable))
        scores = np.square(kernel.astype(np.float64))
        if entry.fixed is not None:
            scores = np.where(pattern_kernel(layer, entry.fixed), scores, -1.0)
            keep = sparsity_mask(kernel, spec, scores) & pattern_kernel(layer, entry.fixed)
        else:
            keep = sparsity_mask(kernel, spec, scores)
        return restore_kernel(layer, keep)

    @staticmethod
    def _set(entry: _Masked, keep: np.ndarray) -> None:
        entry.mask.assign(keep.astype(np.float32))
        entry.variable.assign(entry.variable * keras.ops.convert_to_tensor(entry.mask))


def _check_target(name: str, layer: Any, target: SparsitySpec) -> None:
    """Raise now, not mid-run, if the layer cannot be masked or the pattern does not fit it."""
    reason = Sparsity().check(layer)
    if reason is not None:
        raise CompressorError(f"cannot prune layer {name!r}: it {reason}")
    check_pattern(layer, target)  # PlanError, with the reason


def _at_density(target: SparsitySpec, sparsity: float) -> SparsitySpec:
    if target.structure == "n:m":
        return target
    return dataclasses.replace(target, density=min(1.0, max(0.0, 1.0 - float(sparsity))))
