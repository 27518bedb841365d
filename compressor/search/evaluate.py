"""Whole-model top-1 accuracy of candidate plans, fast enough to call hundreds of times.

Every edit is linear in the kernel (`compressor.search.kernels`), so a plan's model
computes the same function as the original with each edited layer's main kernel W
replaced by its effective kernel Ŵ. The evaluator keeps one working copy of the
model, sets the Ŵ of a plan into the copy's layers, runs one compiled forward pass
over the search data, and puts the original kernels back. No graph is rewritten and
nothing is retraced between evaluations.

Each pass measures two things: how many samples are classified right (under another
metric than top-1, the sum of the per-sample scores, `compressor.metrics`), and how far
the outputs moved from the original model's, as Σ‖f̂(x) − f(x)‖² / Σ‖f(x)‖² over the
samples (a noise-to-signal ratio; the original's outputs come from the first pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

import keras
import numpy as np

from compressor.errors import DataError
from compressor.graph.signature import output_index, pick_output
from compressor.io.data import Dataset, sample_rows
from compressor.metrics import TOP1, Metric
from compressor.search.kernels import KernelCache
from compressor.surgery.editable import editable_layers
from compressor.surgery.plan import LayerEdit, PlanError
from compressor.surgery.rewrite import rewrite_model
from compressor.techniques.base import assign_searched_kernel, kernel_name, searched_kernel

DEFAULT_BATCH_SIZE = 256


def correct_predictions(model: keras.Model, data: Dataset, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per sample of labelled `data`, whether the model's top output is its label (inference mode).

    Read as the artifacts are (`compressor.bench.benchmark.top1_classes`); for a model
    with several outputs, the output `data.y` labels (`data.output`).
    """
    from compressor.bench.benchmark import top1_classes

    return top1_classes(_flat_outputs(model, data, batch_size)) == np.asarray(data.y)


def sample_values(model: keras.Model, data: Dataset, metric: Metric = TOP1,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per sample of `data`, the metric's value for the model (`Metric.values`; top-1: `correct_predictions`)."""
    return metric.values(_flat_outputs(model, data, batch_size), data.y)


def _flat_outputs(model: keras.Model, data: Dataset, batch_size: int) -> np.ndarray:
    """The outputs the labels of `data` read (`data.output`; the first), one flat row per sample."""
    predicted = model.predict(data.x, batch_size=batch_size, verbose=0)
    return np.asarray(pick_output(predicted, output_index(model, data.output))).reshape(len(data), -1)


@dataclass(frozen=True)
class Measurement:
    """One evaluation of the model with some edits.

    Attributes:
        correct: Samples classified right (top-1); under another metric, the sum of the
            per-sample scores (`Metric.scores`, the original's mean value as reference).
        output_error: Σ‖f̂(x) − f(x)‖² / Σ‖f(x)‖² of the output the labels read (the
            first, or `Dataset.output`) against the original model's, over all samples; 0 for the original, inf when the
            outputs are not finite.
    """

    correct: float
    output_error: float


class Evaluator:
    """Top-1 accuracy and output change on fixed labelled data, with some edits applied.

    Args:
        model: The original model; never modified.
        data: Labelled search data.
        kernels: Effective kernels already built (e.g. by `layer_candidates`); default
            a fresh cache.
        batch_size: Samples per forward pass.
        metric: What `correct` counts (default top-1; `compressor.metrics`).

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
        metric: Metric = TOP1,
    ) -> None:
        check_labels(data)
        self.metric = metric
        self._labels = data.y
        self._reference: Optional[float] = None  # the original's mean metric value (metrics other than top-1)
        self.kernels = KernelCache() if kernels is None else kernels
        self.evaluations = 0
        self.samples = len(data)
        self._originals = editable_layers(model)
        # The project's own clone: same qualified names, weights copied, nested models kept.
        self._copy = rewrite_model(model, {})
        self._layers = editable_layers(self._copy)
        self._saved: dict[str, np.ndarray] = {}
        index = output_index(self._copy, data.output)
        if metric.is_top1:
            self._predict, self._batches = _compiled_predict(self._copy, data, index), _batches(data, batch_size)
        else:
            unlabelled = replace(data, y=np.zeros(len(data), np.int64))  # the metric reads the labels in NumPy
            self._predict = _compiled_outputs(self._copy, data, index)
            self._batches = [(x, None) for x, _ in _batches(unlabelled, batch_size)]
        self._references: Optional[list[np.ndarray]] = None  # the original's outputs, per batch
        classes = _output_classes(self._copy, index)
        if metric.labels == "classes" and int(data.y.max()) >= max(classes, 2):
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

    def correct(self, edits: Iterable[LayerEdit] = ()) -> float:
        """How many samples the model with `edits` applied classifies right (one evaluation).

        Raises:
            PlanError: As `measure`.
        """
        return self._run(list(edits))[0]

    def accuracy(self, edits: Iterable[LayerEdit] = ()) -> float:
        """Top-1 accuracy of the model with `edits` applied (see `correct`)."""
        return self.correct(edits) / self.samples

    def _run(self, edits: list[LayerEdit]) -> tuple[float, list[np.ndarray]]:
        """One forward pass with `edits` set: (correct count or score sum, outputs per batch); kernels restored."""
        if not self.metric.is_top1 and self._reference is None and edits:
            self._run([])  # the original's value, which the scores are relative to
        try:
            for edit in edits:
                self._set(edit)
            results = [self._predict(x, y) if self.metric.is_top1 else (0, self._predict(x)) for x, y in self._batches]
        finally:
            self._restore()
        self.evaluations += 1
        outputs = [np.asarray(out, dtype=np.float64) for _, out in results]
        if self.metric.is_top1:
            return sum(int(batch_correct) for batch_correct, _ in results), outputs
        values = self.metric.values(np.concatenate(outputs), self._labels)
        if self._reference is None:
            self._reference = float(np.mean(values))
        total = np.sum(self.metric.scores(values, self._reference))
        return (int(total) if self.metric.binary else float(total)), outputs

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


def _output_classes(model: keras.Model, index: int = 0) -> int:
    output = keras.tree.flatten(model.outputs)[index]
    return int(np.prod([d for d in output.shape[1:] if d is not None] or [1]))


def _batches(data: Dataset, batch_size: int) -> list[tuple[Any, Any]]:
    import tensorflow as tf

    return [
        (tf.nest.map_structure(tf.constant, sample_rows(data.x, slice(start, start + batch_size))),
         tf.constant(data.y[start : start + batch_size]))
        for start in range(0, len(data), batch_size)
    ]


def _sample_spec(data: Dataset) -> Any:
    """The tf.TensorSpec of a batch of `data`'s samples (a dict by input name for several inputs)."""
    import tensorflow as tf

    def spec(values: np.ndarray) -> Any:
        return tf.TensorSpec((None, *values.shape[1:]), tf.as_dtype(values.dtype))

    return {name: spec(v) for name, v in data.x.items()} if isinstance(data.x, dict) else spec(data.x)


def _compiled_outputs(model: keras.Model, data: Dataset, index: int = 0) -> Any:
    """A tf.function samples → output `index` flattened per sample, for metrics scored in NumPy."""
    import tensorflow as tf

    @tf.function(input_signature=[_sample_spec(data)])
    def predict(x: Any) -> Any:
        outputs = keras.tree.flatten(model(x, training=False))[index]
        return tf.reshape(outputs, (-1, int(np.prod(outputs.shape[1:]))))

    return predict


def _compiled_predict(model: keras.Model, data: Dataset, index: int = 0) -> Any:
    """A tf.function (samples, labels) → (number classified right, outputs flattened per sample).

    Read like `compressor.bench.benchmark.top1_accuracy`: output `index` (the first
    unless the labels read another), flattened per sample; a single column is a
    sigmoid probability thresholded at 0.5. Samples of several inputs are a dict by input name.
    """
    import tensorflow as tf

    signature = [_sample_spec(data), tf.TensorSpec((None,), tf.as_dtype(data.y.dtype))]

    @tf.function(input_signature=signature)
    def predict(x: Any, y: Any) -> Any:
        outputs = keras.tree.flatten(model(x, training=False))[index]
        width = int(np.prod(outputs.shape[1:]))  # static: the model's output shape is known
        outputs = tf.reshape(outputs, (-1, width))
        if width == 1:
            predicted = tf.cast(outputs[:, 0] > 0.5, tf.int64)
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int64)), tf.int32)), outputs

    return predict
