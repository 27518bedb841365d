"""The layer of an early-exit model: `ExitBranch` (Shallow-Deep Networks).

An early-exit model answers an input at the first internal classifier confident
enough, and runs nothing after it. At an exit point `h` (a tensor every path to the
output goes through), `ExitBranch(head, rest)` computes the exit's answer `head(h)`
and its confidence, the largest softmax probability. At a static batch of 1 (how the
artifacts are exported) it is `keras.ops.cond(confidence >= threshold, answer,
rest(h))`, so the rest of the network really does not run: TFLite gets an `IF` op and
ONNX an `If` node. `rest` holds the remaining layers as a nested model, itself
holding the next `ExitBranch`, so K exits are K nested conditions. At other batch sizes
both are computed and each sample takes the one its confidence chooses, which gives
the same outputs.

`threshold` is a non-trainable weight: calibration moves it without rebuilding the
model; a threshold above 1 closes the exit. Cost analysis, loading and export import
this module without the technique (`compressor.techniques.early_exit` builds the
model, `compressor.search.early_exit` trains and calibrates the exits). Registered as
"compressor>ExitBranch": an early-exit `.keras` file loads wherever this module has
been imported (`compressor.io.models.load_model` does it).
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

CLOSED = 2.0
"""A threshold no confidence reaches: the exit never answers."""


@keras.saving.register_keras_serializable(package="compressor")
class ExitBranch(keras.layers.Layer):
    """`head(h)` when its confidence reaches the threshold, else `rest(h)` (module docstring).

    Args:
        head: A model from `h` to the exit's logits.
        rest: A model from `h` to the network's output (the layers after the exit point).
        probabilities: Whether the network outputs probabilities (the exit then answers
            softmax(logits)) or logits (the exit answers its logits).
        threshold: The confidence (largest softmax probability) at which the exit answers.
    """

    def __init__(self, head: keras.Model, rest: keras.Model, probabilities: bool = True, threshold: float = CLOSED,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = head
        self.rest = rest
        self.probabilities = bool(probabilities)
        self.initial_threshold = float(threshold)

    @property
    def point(self) -> str:
        """The name of the layer whose output is the exit point (`<point>_exit` without the suffix)."""
        return self.name.removesuffix("_exit")

    @property
    def exit_parts(self) -> tuple[keras.Model, keras.Model]:
        """(head, rest): cost analysis walks into both."""
        return self.head, self.rest

    def build(self, input_shape: Any) -> None:
        self.threshold = self.add_weight(
            name="threshold", shape=(), initializer=keras.initializers.Constant(self.initial_threshold), trainable=False
        )
        for model in (self.head, self.rest):
            if not model.built:
                model.build(input_shape)

    def answer(self, h: Any) -> tuple[Any, Any]:
        """(the exit's output, its confidence per sample) on `h`."""
        logits = self.head(h, training=False)
        probabilities = ops.softmax(logits, axis=-1)
        output = probabilities if self.probabilities else logits
        return output, ops.max(probabilities, axis=-1)

    def call(self, h: Any, training: Optional[bool] = None) -> Any:
        output, confidence = self.answer(h)
        if h.shape[0] == 1:
            return ops.cond(confidence[0] >= self.threshold, lambda: output, lambda: self.rest(h, training=training))
        leave = ops.expand_dims(confidence >= self.threshold, -1)
        return ops.where(leave, ops.cast(output, self.compute_dtype), self.rest(h, training=training))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(self.rest.compute_output_shape(input_shape))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "head": keras.saving.serialize_keras_object(self.head),
            "rest": keras.saving.serialize_keras_object(self.rest),
            "probabilities": self.probabilities,
            "threshold": self.initial_threshold,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ExitBranch":
        config = dict(config)
        for key in ("head", "rest"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def exit_layers(model: keras.Model) -> list[ExitBranch]:
    """The exits of an early-exit model, first to last (each one's `rest` holds the next)."""
    found: list[ExitBranch] = []
    layers = list(model.layers)
    while layers:
        branch = next((layer for layer in layers if isinstance(layer, ExitBranch)), None)
        if branch is None:
            break
        found.append(branch)
        layers = list(branch.rest.layers)
    return found


def has_exits(model: keras.Model) -> bool:
    """Whether the model holds an early exit."""
    return any(isinstance(layer, ExitBranch) for layer in model.layers)
