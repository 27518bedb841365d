"""Knowledge distillation, shared by fine-tuning (`compressor.finetune`) and gate training.

A student learns to answer as its teacher (the model before compression) does
(Hinton et al.). The teacher's term of the loss is

    weight · T² · KL(softmax(t/T) ‖ softmax(s/T))

with t, s the teacher's and student's logits and T the temperature: a higher T
softens both distributions, so the teacher's ranking of the wrong classes counts
more, and T² keeps this term's gradients on the scale of a cross-entropy's. Models
that end in a softmax give their log-probabilities (clipped at EPSILON) as logits;
which models do is decided by `compressor.graph.outputs`.

The teacher's outputs are computed once, before training, in inference mode: they do
not change during a run, and one pass costs less than a teacher forward pass per step.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np

from compressor.errors import CompressorError, DataError
from compressor.graph.outputs import outputs_probabilities
from compressor.io.data import Dataset

EPSILON = 1e-7
"""Probabilities are clipped here before their log: log(0) would be -inf."""

DEFAULT_TEMPERATURE = 4.0
"""The distillation temperature fine-tuning and gate training use unless told otherwise."""


def teacher_predictions(teacher: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The teacher's outputs for `x`, in inference mode (to reuse across runs).

    Args:
        teacher: A single-output model.
        x: Inputs, batch first.
        batch_size: Samples per forward pass, >= 1.

    Returns:
        float32 array (N, classes): probabilities or logits, as the model outputs them.

    Raises:
        CompressorError: A bad batch size, or a model with several outputs.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CompressorError(f"Invalid batch_size. Expected an integer >= 1. Received: batch_size={batch_size!r}")
    outputs = teacher.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(outputs, (list, tuple, dict)):
        raise CompressorError(f"the teacher {teacher.name!r} has several outputs; expected a single-output classifier")
    return np.asarray(outputs, dtype=np.float32)


def teacher_logits(
    teacher: Optional[keras.Model], train: Dataset, classes: int, outputs: Optional[np.ndarray] = None
) -> Optional[np.ndarray]:
    """The teacher's logits for every training sample, or None without a teacher.

    Args:
        teacher: The teacher model, or None.
        train: The training data (its inputs are predicted when `outputs` is None).
        classes: The student's number of classes.
        outputs: The teacher's predictions for `train.x` (`teacher_predictions`),
            used instead of `teacher`; whether they are probabilities is then told
            by their values alone.

    Returns:
        float32 (len(train), classes), or None when there is neither teacher nor outputs.

    Raises:
        DataError: The outputs do not have one row of `classes` scores per sample.
    """
    model = None
    if outputs is None:
        if teacher is None:
            return None
        model = teacher
        outputs = teacher_predictions(teacher, train.x)
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.shape != (len(train), classes):
        raise DataError(
            f"teacher outputs have shape {outputs.shape}; expected one row of {classes} class "
            f"scores per training sample: {(len(train), classes)}"
        )
    probabilities = outputs_probabilities(model, lambda: outputs)
    return np.log(np.clip(outputs, EPSILON, 1.0)) if probabilities else outputs


def student_probabilities(student: keras.Model, x: np.ndarray) -> bool:
    """Whether the student outputs probabilities (its graph, else its outputs on the first 32 of `x`)."""
    return outputs_probabilities(student, lambda: np.asarray(student(x[:32], training=False), dtype=np.float32))


def as_logits(outputs: Any, probabilities: bool) -> Any:
    """A model's outputs as logits inside a train step: the clipped log of probabilities, logits as they are."""
    import tensorflow as tf

    return tf.math.log(tf.clip_by_value(outputs, EPSILON, 1.0)) if probabilities else outputs


def kl_divergence(teacher_logits: Any, student_logits: Any) -> Any:
    """Batch mean of KL(softmax(teacher) ‖ softmax(student))."""
    import tensorflow as tf

    return tf.reduce_mean(_per_sample_kl(teacher_logits, student_logits))


def per_sample_distillation(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) of each sample: the teacher's term before its weight and batch mean.

    Summed and divided by the global batch size, a replica's share of the loss under
    a distribution strategy (a replica's batch may be empty: no mean of nothing).
    """
    return temperature**2 * _per_sample_kl(teacher_logits / temperature, student_logits / temperature)


def _per_sample_kl(teacher_logits: Any, student_logits: Any) -> Any:
    import tensorflow as tf

    log_p = tf.nn.log_softmax(teacher_logits)
    log_q = tf.nn.log_softmax(student_logits)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_term(teacher_logits: Any, student_logits: Any, temperature: float, weight: float) -> Any:
    """The teacher's term of the loss: weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) (module docstring)."""
    return weight * temperature**2 * kl_divergence(teacher_logits / temperature, student_logits / temperature)
