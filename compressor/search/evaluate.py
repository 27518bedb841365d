"""Whole-model top-1 accuracy of candidate plans, fast enough to call hundreds of times.

Every edit is linear in the kernel (`compressor.search.kernels`), so a plan's model
computes the same function as the original with each edited layer's main kernel W
replaced by its effective kernel Ŵ. The evaluator keeps one working copy of the
model, sets the Ŵ of a plan into the copy's layers, runs one compiled forward pass
over the search data, and puts the original kernels back. No graph is rewritten and
nothing is retraced between evaluations.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import keras
import numpy as np

from compressor.errors import DataError
from compressor.io.data import Dataset
from compressor.search.kernels import KernelCache
from compressor.surgery.editable import editable_layers
from compressor.surgery.plan import LayerEdit, PlanError
from compressor.surgery.rewrite import rewrite_model
from compressor.techniques.base import kernel_index, kernel_name

DEFAULT_BATCH_SIZE = 256


class Evaluator:
    """Top-1 accuracy on fixed labelled data of the model with some edits applied.

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
        classes = _output_classes(self._copy)
        if int(data.y.max()) >= max(classes, 2):
            raise DataError(
                f"data from {data.source} has labels up to {int(data.y.max())}, but the model "
                f"outputs {classes} class score(s)"
            )

    def correct(self, edits: Iterable[LayerEdit] = ()) -> int:
        """How many samples the model with `edits` applied classifies right.

        Raises:
            PlanError: An edit names a layer that is not an editable layer of the model.
        """
        edits = list(edits)
        try:
            for edit in edits:
                self._set(edit)
            total = sum(int(self._predict(x, y)) for x, y in self._batches)
        finally:
            self._restore()
        self.evaluations += 1
        return total

    def accuracy(self, edits: Iterable[LayerEdit] = ()) -> float:
        """Top-1 accuracy of the model with `edits` applied (see `correct`)."""
        return self.correct(edits) / self.samples

    def _set(self, edit: LayerEdit) -> None:
        if edit.layer not in self._layers or kernel_name(self._layers[edit.layer]) is None:
            raise PlanError(f"the edit of layer {edit.layer!r} does not name a layer with a kernel in the model")
        if edit.layer in self._saved:
            raise PlanError(f"two edits of layer {edit.layer!r} in one evaluation")
        variable = _kernel_variable(self._layers[edit.layer])
        self._saved[edit.layer] = keras.ops.convert_to_numpy(variable)
        variable.assign(self.kernels.get(self._originals[edit.layer], edit).kernel)

    def _restore(self) -> None:
        for name, kernel in self._saved.items():
            _kernel_variable(self._layers[name]).assign(kernel)
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


def _kernel_variable(layer: Any) -> Any:
    return layer.weights[kernel_index(layer)]


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
    """A tf.function (samples, labels) → number classified right; outputs never leave the graph.

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
        outputs = tf.reshape(outputs, (tf.shape(outputs)[0], -1))
        if outputs.shape[-1] == 1:
            predicted = tf.cast(outputs[:, 0] > 0.5, tf.int64)
        else:
            predicted = tf.argmax(outputs, axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int64)), tf.int32))

    return predict
