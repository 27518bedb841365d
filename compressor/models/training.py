"""Seeded, deterministic training of the built-in examples (imports TensorFlow)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import keras
import numpy as np
import tensorflow as tf

from compressor.models.splits import Splits
from compressor.models.zoo import ARCHITECTURES

if TYPE_CHECKING:
    from compressor.models.examples import EpochCallback, ExampleSpec


@dataclass
class TrainedModel:
    """A trained, inference-ready model and its accuracies.

    Attributes:
        model: The trained weights in a fresh, uncompiled copy of the architecture.
        val_accuracy: Accuracy on the validation split.
        test_accuracy: Accuracy on the test split.
        train_seconds: Wall-clock time of `fit`.
    """

    model: keras.Model
    val_accuracy: float
    test_accuracy: float
    train_seconds: float


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy, TensorFlow and Keras, and run TensorFlow ops deterministically.

    Op determinism is what makes two runs with one seed give bit-identical weights.
    It is process-wide and slows some ops down (or makes them raise), so it is turned
    off again on exit if it was off before; the seeds stay set.
    """
    keras.utils.set_random_seed(seed)
    was_enabled = _op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            _disable_op_determinism()


def _op_determinism_enabled() -> bool:
    # TensorFlow exposes only the switch-on publicly; the query and switch-off live
    # in its framework config. Without them, determinism is simply left on.
    from tensorflow.python.framework import config

    query = getattr(config, "is_op_determinism_enabled", None)
    return True if query is None else bool(query())


def _disable_op_determinism() -> None:
    from tensorflow.python.framework import config

    config.disable_op_determinism()


def train_classifier(
    spec: "ExampleSpec", data: Splits, epochs: int, on_epoch: Optional["EpochCallback"] = None
) -> TrainedModel:
    """Build the example's architecture and fit it with Adam and cross-entropy.

    The learning rate decays along a cosine from `spec.learning_rate` to 0 over the
    run, so the final weights do not depend on where a noisy epoch happened to end.

    Args:
        spec: The example (architecture, batch size, learning rate).
        data: Its splits; val is watched during training, test only evaluated after.
        epochs: Number of epochs.
        on_epoch: Called after each epoch with (epoch, epochs, metrics).

    Returns:
        The trained model, ready to save, and its accuracies.
    """
    model = ARCHITECTURES[spec.architecture](**spec.model_kwargs)
    x_train, y_train = data.train
    steps = epochs * int(np.ceil(len(y_train) / spec.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(spec.learning_rate, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [_EpochReporter(epochs, on_epoch)] if on_epoch else []
    start = time.perf_counter()
    model.fit(
        x_train, y_train, batch_size=spec.batch_size, epochs=epochs,
        validation_data=data.val, shuffle=True, verbose=0, callbacks=callbacks,
    )
    seconds = time.perf_counter() - start
    model = _uncompiled_copy(model)
    val_accuracy, test_accuracy = _accuracies(model, data.val, data.test)
    return TrainedModel(model, val_accuracy, test_accuracy, seconds)


def _uncompiled_copy(model: keras.Model) -> keras.Model:
    """The same layers and weights without optimizer: a small file that reloads quietly.

    A saved compiled model carries its optimizer; reloading one whose optimizer was
    never built warns about skipped variables, and Adam's slots would triple the file.
    """
    # clone_model would carry the compiled optimizer along; from_config does not.
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _accuracies(model: keras.Model, *splits: tuple[np.ndarray, np.ndarray]) -> list[float]:
    """Accuracy on each (x, y), from a single predict call (one graph trace)."""
    x = np.concatenate([x for x, _ in splits])
    predicted = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)
    bounds = np.cumsum([0] + [len(y) for _, y in splits])
    return [
        float(np.mean(predicted[lo:hi] == y))
        for (lo, hi), (_, y) in zip(zip(bounds[:-1], bounds[1:]), splits)
    ]


class _EpochReporter(keras.callbacks.Callback):
    """Forward each epoch's metrics (rounded floats) to a plain callback."""

    def __init__(self, epochs: int, report: "EpochCallback") -> None:
        super().__init__()
        self._epochs = epochs
        self._report = report

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        self._report(epoch + 1, self._epochs, metrics)
