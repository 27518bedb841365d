"""The layers of a gated model: `SkipGate` and `GatedResidual` (SkipNet-style dynamic gating).

A gated residual block `y = x + f(x)` runs its branch `f` only when its gate says so:

- `SkipGate`: global average pooling of `x`, one tiny dense layer, one logit. The
  block runs when `logit + offset > 0`; `offset` (a non-trainable weight) moves every
  decision at once and forces a gate open (+OPEN) or shut (-OPEN).
- `GatedResidual([x, logit])`: holds `f` as a nested model. At a static batch of 1
  (how the artifacts are exported) it is `keras.ops.cond(open, x + f(x), x)`, so the
  branch's work is really skipped: TFLite gets an `IF` op and ONNX an `If` node. At
  other batch sizes every sample's branch is computed and multiplied by its 0/1
  decision, which gives the same outputs. The decision is hard in the forward pass;
  gradients reach the gate through its probability (straight-through estimator).

These are leaves: cost analysis, loading and export import them without importing the
gating technique (`compressor.techniques.gating` inserts and removes gates,
`compressor.search.gating` trains them). Both are registered Keras objects under
"compressor>SkipGate" and "compressor>GatedResidual": a gated `.keras` file loads
wherever this module has been imported (`compressor.io.models.load_model` does it),
files written when the layers lived in `compressor.techniques.gating` included, since
Keras finds a registered class by that name before its module.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np
from keras import ops

OPEN = 1e9
"""An offset that forces a gate open; -OPEN forces it shut."""

GATE_BIAS = 3.0
"""Initial gate bias: sigmoid(3) = 0.95, so a new gate runs its block and the model is unchanged."""


@keras.saving.register_keras_serializable(package="compressor")
class SkipGate(keras.layers.Layer):
    """Global average pooling → standardization → Dense(1): the logit of running a residual block.

    The pooled features are standardized with a fixed mean and scale per channel
    (`standardize`, from data) so that the dense layer sees features that differ
    from input to input on one scale, and its decision can depend on the input.

    Args:
        offset: Added to the logit; the block runs when `logit + offset > 0`.
    """

    def __init__(self, offset: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial_offset = float(offset)

    def build(self, input_shape: tuple) -> None:
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(channels, 1), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(1,), initializer=keras.initializers.Constant(GATE_BIAS))
        self.offset = self.add_weight(
            name="offset", shape=(), initializer=keras.initializers.Constant(self.initial_offset), trainable=False
        )
        self.mean = self.add_weight(name="mean", shape=(channels,), initializer="zeros", trainable=False)
        self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones", trainable=False)

    def call(self, x: Any) -> Any:
        return ops.matmul((self.pooled(x) - self.mean) * self.scale, self.kernel) + self.bias + self.offset

    @staticmethod
    def pooled(x: Any) -> Any:
        """Global average pooling over every axis between batch and channels."""
        axes = tuple(range(1, len(x.shape) - 1))
        return ops.mean(x, axis=axes) if axes else x

    def standardize(self, pooled: np.ndarray) -> None:
        """Set the mean and scale from pooled features of real inputs, (samples, channels)."""
        self.mean.assign(pooled.mean(axis=0))
        self.scale.assign(1.0 / (pooled.std(axis=0) + 1e-3))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "offset": self.initial_offset}


@keras.saving.register_keras_serializable(package="compressor")
class GatedResidual(keras.layers.Layer):
    """`x + branch(x)` when the gate is open, `x` when it is shut (module docstring).

    Args:
        branch: A graph model from `x` to the branch output (same shape as `x`).
    """

    def __init__(self, branch: keras.Model, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.branch = branch

    @property
    def block_name(self) -> str:
        """The name of the Add this block replaced (`<add>_gated` without the suffix)."""
        return self.name.removesuffix("_gated")

    @property
    def gated_branch(self) -> keras.Model:
        """The branch model (cost analysis walks into it)."""
        return self.branch

    def build(self, input_shape: Any) -> None:
        if not self.branch.built:
            self.branch.build(input_shape[0])

    def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
        x, logit = inputs
        if x.shape[0] == 1:
            return ops.cond(logit[0, 0] > 0, lambda: x + self.branch(x, training=training), lambda: x)
        probability = ops.sigmoid(logit)
        hard = ops.cast(logit > 0, x.dtype)
        # Straight-through: the forward pass uses the 0/1 decision, the backward pass its probability.
        decision = probability + ops.stop_gradient(hard - probability)
        decision = ops.reshape(decision, (-1,) + (1,) * (len(x.shape) - 1))
        return x + decision * self.branch(x, training=training)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "branch": keras.saving.serialize_keras_object(self.branch)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GatedResidual":
        config = dict(config)
        config["branch"] = keras.saving.deserialize_keras_object(config["branch"])
        return cls(**config)


def gate_layers(model: keras.Model) -> list[tuple[SkipGate, GatedResidual]]:
    """(gate, gated block) pairs of a gated model, in graph order."""
    gates = {layer.name: layer for layer in model.layers if isinstance(layer, SkipGate)}
    pairs = []
    for layer in model.layers:
        if isinstance(layer, GatedResidual):
            pairs.append((gates[layer.block_name + "_gate"], layer))
    return pairs


def is_gated(model: keras.Model) -> bool:
    """Whether the model holds any gated residual block."""
    return any(isinstance(layer, GatedResidual) for layer in model.layers)
