"""The pieces of a fine-tuning run: batches streamed by tf.data, the compiled train step, the device strategy.

Batches: each epoch's order (a permutation of the sample indices, drawn from the
run's seed) is streamed by tf.data, which gathers each batch's rows from the arrays
already in memory and prepares the next batches while the current step runs
(`prefetch`). Only indices and a few batches are held on top of the arrays: memory
does not grow with the dataset.

Teacher: its outputs are computed once before the run and streamed with the inputs
("once", the default: one inference pass, reused by every epoch and, in the channel
search, by every run), or computed inside each train step ("per_batch": a teacher
forward pass per step, no array of outputs). `benchmarks/finetune_throughput.md`
measures both.

Devices: "mirrored" trains on every local device under
`tf.distribute.MirroredStrategy` (`distribute_strategy`): each replica takes its share
of the global batch, the loss is divided by the global batch size, and the optimizer
sums the replicas' gradients, so a step is the same step as on one device (up to
batch normalization, whose statistics are per replica). Variables must be created in
the strategy's scope: `finetune` clones the student (and a per-batch teacher) into it
and copies the trained weights back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from compressor.config import DISTRIBUTE
from compressor.distillation import as_logits, per_sample_distillation
from compressor.errors import CompressorError
from compressor.kernel_masks import KernelMasks

TEACHER_PASSES = ("once", "per_batch")
"""When the teacher's outputs are computed: once before the run, or inside each step."""

PREFETCH = 2
"""Batches tf.data prepares ahead of the running step."""


def distribute_strategy(name: str) -> Optional[tf.distribute.Strategy]:
    """The strategy named by `name` (DISTRIBUTE); None for "none"."""
    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise CompressorError(f"Invalid distribute. Expected one of {DISTRIBUTE}. Received: distribute={name!r}")


def in_scope(model: keras.Model, strategy: tf.distribute.Strategy) -> keras.Model:
    """A copy of `model` whose variables the strategy created (mirrored on its devices)."""
    with strategy.scope():
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    return clone


def batch_sizes(samples: int, batch_size: int, replicas: int = 1) -> list[int]:
    """The sizes of an epoch's batches: `batch_size` each, the rest last.

    With several replicas a last batch smaller than their number joins the one
    before it: every replica gets a sample (a replica's empty batch would give batch
    normalization a mean of nothing).
    """
    sizes = [batch_size] * (samples // batch_size) + ([samples % batch_size] if samples % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < replicas:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def batches(
    arrays: tuple[np.ndarray, ...], order: np.ndarray, sizes: list[int], strategy: Optional[tf.distribute.Strategy]
) -> Any:
    """The rows of `arrays` in `order`, in batches of `sizes` (`batch_sizes`), as a prefetching tf.data pipeline.

    Each batch is gathered from the in-memory arrays when tf.data asks for it; under a
    strategy, each global batch is split among the replicas.
    """
    bounds = np.cumsum([0, *sizes]).astype(np.int64)
    if bounds[-1] != len(order):
        raise ValueError(f"batch sizes add up to {bounds[-1]}, not to the {len(order)} indices in order")
    specs = tuple(tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype)) for array in arrays)

    def gather(lo: np.int64, hi: np.int64) -> tuple[np.ndarray, ...]:
        index = order[lo:hi]
        return tuple(array[index] for array in arrays)

    def fetch(lo: tf.Tensor, hi: tf.Tensor) -> tuple[tf.Tensor, ...]:
        rows = tf.numpy_function(gather, [lo, hi], [spec.dtype for spec in specs], stateful=False)
        for row, spec in zip(rows, specs):
            row.set_shape(spec.shape)
        return tuple(rows)

    # Batch bounds, not samples, are the dataset's elements (a generator-fed dataset
    # measured 1.5x slower per step here: its Python thread competes with the step's).
    data = tf.data.Dataset.from_tensor_slices((bounds[:-1], bounds[1:])).map(fetch).prefetch(PREFETCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # One thread gathers rows from memory, a fixed number of batches ahead: the cores stay with the step.
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    data = data.with_options(options)
    return data if strategy is None else strategy.experimental_distribute_dataset(data)


def train_step(
    student: keras.Model,
    teacher: Optional[keras.Model],
    arrays: tuple[np.ndarray, ...],
    schedule_steps: int,
    config: Any,
    weights: tuple[float, float],
    masker: KernelMasks,
    strategy: Optional[tf.distribute.Strategy],
    jit: bool = False,
) -> Callable[..., Any]:
    """A compiled step: forward in training mode, loss, Adam update, masks re-applied.

    Args:
        student: The model trained (created in the strategy's scope when there is one).
        teacher: Computed per step when given (`teacher_pass` "per_batch"); else the
            third array holds its logits.
        arrays: (x, y, teacher logits), as `batches` streams them.
        schedule_steps: The run's planned steps: the cosine decay's length.
        config: The `FinetuneConfig`.
        weights: (teacher term, labels term).
        masker: The run's kernel masks.
        strategy: The device strategy, or None.
        jit: Compile the step with XLA (not under a strategy: one device's step).

    Returns:
        step(x, y, t) -> the batch's mean loss (x, y, t per replica under a strategy).
    """
    variables = list(student.trainable_variables)
    if not variables:
        raise CompressorError(f"model {student.name!r} has no trainable weights: nothing to fine-tune")
    from compressor.distillation import student_probabilities

    x_train = arrays[0]
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, schedule_steps)
        optimizer = keras.optimizers.Adam(schedule)
        optimizer.build(variables)
    grad_masks = masker.masks_for(variables)
    soft_weight, label_weight = weights
    temperature = float(config.temperature)
    probabilities = student_probabilities(student, x_train)
    teacher_probabilities = teacher is not None and student_probabilities(teacher, x_train)

    def replica_step(x: tf.Tensor, y: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        count = tf.cast(tf.shape(x)[0], tf.float32)
        replicas = 1
        context = tf.distribute.get_replica_context()
        if strategy is not None:  # this replica's share of the global batch's mean
            count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
            replicas = strategy.num_replicas_in_sync
        if teacher is not None:
            t = as_logits(tf.cast(teacher(x, training=False), tf.float32), teacher_probabilities)
        with tf.GradientTape() as tape:
            outputs = tf.cast(student(x, training=True), tf.float32)
            logits = as_logits(outputs, probabilities)
            loss = tf.constant(0.0)
            if soft_weight:
                loss += soft_weight * (tf.reduce_sum(per_sample_distillation(t, logits, temperature)) / count)
            if label_weight:
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                loss += label_weight * (tf.reduce_sum(ce) / count)
            if student.losses:  # regularizers' penalties, once over the replicas
                loss += tf.add_n([tf.cast(penalty, tf.float32) for penalty in student.losses]) / replicas
        grads = tape.gradient(loss, variables)
        pairs = [
            (grad if keep is None else grad * keep, var)
            for grad, var, keep in zip(grads, variables, grad_masks)
            if grad is not None
        ]
        optimizer.apply_gradients(pairs)
        return loss

    if strategy is None:

        def step(x: tf.Tensor, y: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
            loss = replica_step(x, y, t)
            masker.apply_in_graph()
            return loss

        signature = [tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype)) for array in arrays]
        return tf.function(step, input_signature=signature, jit_compile=jit)

    def distributed_step(x: Any, y: Any, t: Any) -> tf.Tensor:
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(x, y, t)), axis=None)
        masker.apply_in_graph()  # in cross-replica context: every replica's copy of a kernel is masked
        return loss

    return tf.function(distributed_step, reduce_retracing=True)
