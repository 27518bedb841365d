"""Whole-model top-1 accuracy of candidate plans, fast enough to call hundreds of times.

Every edit is linear in the kernel (`compressor.search.kernels`), so a plan's model
computes the same function as the original with each edited layer's main kernel W
replaced by its effective kernel Ŵ. The evaluator keeps one working copy of the
model, sets the Ŵ of a plan into the copy's layers, runs one compiled forward pass
over the search data, and puts the original kernels back. No graph is rewritten and
nothing is retraced between evaluations.

Each pass measures two things: how many samples are classified right, and how far
the outputs moved from the original model's, as Σ‖f̂(x) − f(x)‖² / Σ‖f(x)‖² over the
samples (a noise-to-signal ratio; the original's outputs come from the first pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import keras
import numpy as np

from compressor.errors import DataError
from compressor.io.data import Dataset
from compressor.search.kernels import KernelCache
from compressor.surgery.editable import editable_layers
from compressor.surgery.plan import LayerEdit, PlanError
from compressor.surgery.rewrite import rewrite_model
from compressor.techniques.base import assign_searched_kernel, kernel_name, searched_kernel

DEFAULT_BATCH_SIZE = 256


def correct_predictions(model: keras.Model, data: Dataset, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per sample of labelled `data`, whether the model's top output is its label (inference mode).

    Read as the artifacts are (`compressor.bench.benchmark.top1_classes`).
    """
    from compressor.bench.benchmark import top1_classes

    outputs = np.asarray(model.predict(data.x, batch_size=batch_size, verbose=0)).reshape(len(data), -1)
    return top1_classes(outputs) == np.asarray(data.y)


@dataclass(frozen=True)
class Measurement:
    """One evaluation of the model with some edits.

    Attributes:
        correct: Samples classified right (top-1).
        output_error: Σ‖f̂(x) − f(x)‖² / Σ‖f(x)‖² of the first output against the
            original model's, over all samples; 0 for the original, inf when the
            outputs are not finite.
    """

    correct: int
    output_error: float


class Evaluator:
    """Top-1 accuracy and output change on fixed labelled data, with some edits applied.

    Args:
        model: The original model; never modified.
        data: Labelled search data.
        kernels: Effective kernels already built (e.g. by `layer_candidates`); default
            a fresh cache.
        batch_size: Samples per forward pass.

    Attributes:
        evaluations: Forward passes over the whole data run so far.
        samples: Number of samples.

    Raises:
        DataError: The data has no labels or no samples, or labels beyond the outputs.
    """

    def __init__(
        self,
        model: keras.Model,
        data: Dataset,
        kernels: Optional[KernelCache] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        check_labels(data)
        self.kernels = KernelCache() if kernels is None else kernels
        self.evaluations = 0
        self.samples = len(data)
        self._originals = editable_layers(model)
        # The project's own clone: same qualified names, weights copied, nested models kept.
        self._copy = rewrite_model(model, {})
        self._layers = editable_layers(self._copy)
        self._saved: dict[str, np.ndarray] = {}
        self._predict = _compiled_predict(self._copy, data)
        self._batches = _batches(data, batch_size)
        self._references: Optional[list[np.ndarray]] = None  # the original's outputs, per batch
        classes = _output_classes(self._copy)
        if int(data.y.max()) >= max(classes, 2):
            raise DataError(
                f"data from {data.source} has labels up to {int(data.y.max())}, but the model "
                f"outputs {classes} class score(s)"
            )

    def measure(self, edits: Iterable[LayerEdit] = ()) -> Measurement:
        """Correct samples and output change of the model with `edits` applied.

        The original model's outputs come from the first call without edits; a call
        with edits before any such call runs the original once more (one evaluation).

        Raises:
            PlanError: An edit names a layer that is not an editable layer of the model,
                or names a layer twice.
        """
        edits = list(edits)
        if self._references is None and edits:
            self.measure()
        correct, outputs = self._run(edits)
        if self._references is None:
            self._references = outputs
        signal = sum(float(np.sum(np.square(ref))) for ref in self._references)
        noise = sum(float(np.sum(np.square(out - ref))) for out, ref in zip(outputs, self._references))
        error = noise / signal if signal else noise
        return Measurement(correct, error if np.isfinite(error) else float("inf"))  # non-finite outputs: infinitely far

    def correct(self, edits: Iterable[LayerEdit] = ()) -> int:
        """How many samples the model with `edits` applied classifies right (one evaluation).

        Raises:
            PlanError: As `measure`.
        """
        return self._run(list(edits))[0]

    def accuracy(self, edits: Iterable[LayerEdit] = ()) -> float:
        """Top-1 accuracy of the model with `edits` applied (see `correct`)."""
        return self.correct(edits) / self.samples

    def _run(self, edits: list[LayerEdit]) -> tuple[int, list[np.ndarray]]:
        """One forward pass with `edits` set: (correct count, outputs per batch); kernels restored."""
        try:
            for edit in edits:
                self._set(edit)
            results = [self._predict(x, y) for x, y in self._batches]
        finally:
            self._restore()
        self.evaluations += 1
        correct = sum(int(batch_correct) for batch_correct, _ in results)
        return correct, [np.asarray(outputs, dtype=np.float64) for _, outputs in results]

    def _set(self, edit: LayerEdit) -> None:
        if edit.layer not in self._layers or kernel_name(self._layers[edit.layer]) is None:
            raise PlanError(f"the edit of layer {edit.layer!r} does not name a layer with a kernel in the model")
        if edit.layer in self._saved:
            raise PlanError(f"two edits of layer {edit.layer!r} in one evaluation")
        layer = self._layers[edit.layer]
        self._saved[edit.layer] = searched_kernel(layer)
        assign_searched_kernel(layer, self.kernels.get(self._originals[edit.layer], edit).kernel)

    def _restore(self) -> None:
        for name, kernel in self._saved.items():
            assign_searched_kernel(self._layers[name], kernel)
        self._saved.clear()


def check_labels(data: Dataset) -> None:
    """Raise DataError unless the data has samples and labels (accuracy needs both)."""
    if data.y is None:
        raise DataError(
            f"data from {data.source} has no labels; an accuracy budget needs labelled data "
            "(an .npz with 'y', or class subfolders)"
        )
    if len(data) == 0:
        raise DataError(f"data from {data.source} has no samples")


def _output_classes(model: keras.Model) -> int:
    output = keras.tree.flatten(model.outputs)[0]
    return int(np.prod([d for d in output.shape[1:] if d is not None] or [1]))


def _batches(data: Dataset, batch_size: int) -> list[tuple[Any, Any]]:
    import tensorflow as tf

    return [
        (tf.constant(data.x[start : start + batch_size]), tf.constant(data.y[start : start + batch_size]))
        for start in range(0, len(data), batch_size)
    ]


def _compiled_predict(model: keras.Model, data: Dataset) -> Any:
    """A tf.function (samples, labels) → (number classified right, outputs flattened per sample).

    Read like `compressor.bench.benchmark.top1_accuracy`: the first output, flattened
    per sample; a single column is a sigmoid probability thresholded at 0.5.
    """
    import tensorflow as tf

    signature = [
        tf.TensorSpec((None, *data.x.shape[1:]), tf.as_dtype(data.x.dtype)),
        tf.TensorSpec((None,), tf.as_dtype(data.y.dtype)),
    ]

    @tf.function(input_signature=signature)
    def predict(x: Any, y: Any) -> Any:
        outputs = keras.tree.flatten(model(x, training=False))[0]
        width = int(np.prod(outputs.shape[1:]))  # static: the model's output shape is known
        outputs = tf.reshape(outputs, (-1, width))
        if width == 1:
            predicted = tf.cast(outputs[:, 0] > 0.5, tf.int64)
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int64)), tf.int32)), outputs

    return predict
