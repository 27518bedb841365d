"""Run a graph model op by op, recording each K-FAC target's input and pre-activation.

The K-FAC pass (`compressor.techniques.kfac`) needs, for every target layer, the
input it reads and the gradient of the loss at its pre-activation output (before its
fused activation). Keras computes both inside the layer's call, out of a tape's
reach, so the model is run again op by op with the graph walker
(`compressor.graph.walk.run_graph`): a target's kernel product and bias are computed
here and watched on the tape, then its activation is applied; every other layer is
called in inference mode; nested graph models are run op by op under `outer/`.
"""

from __future__ import annotations

from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from compressor.graph.keras_api import functional_graph, takes_training
from compressor.graph.outputs import outputs_probabilities, softmax_output_layers
from compressor.graph.walk import run_graph

PROBABILITY_FLOOR = 1e-30
"""log(p) of a probability output is taken at p >= PROBABILITY_FLOOR (no -inf)."""


class PreactivationRecorder:
    """Runs a graph model op by op, recording each target's input and pre-activation (module docstring).

    Args:
        model: A Functional or built Sequential classifier.
        targets: Qualified layer name → Dense/Conv1D/Conv2D layer to record.
        tape: The tape that watches the pre-activations.

    Attributes:
        inputs: Target name → the input it was called on.
        preacts: Target name → its watched pre-activation output.
    """

    def __init__(self, model: keras.Model, targets: Mapping[str, Any], tape: tf.GradientTape) -> None:
        self._model = model
        self._targets = targets
        self._tape = tape
        self.inputs: dict[str, tf.Tensor] = {}
        self.preacts: dict[str, tf.Tensor] = {}
        self._softmax = {id(layer) for layer in softmax_output_layers(model)}
        self._logits: dict[int, tf.Tensor] = {}  # id(the output of a softmax) → its input logits

    def run(self, x: Any) -> Any:
        """The model's (first) output on `x`, computed op by op."""
        return self._run(self._model, x, "")

    def log_probs(self, output: tf.Tensor) -> tf.Tensor:
        """Log-probabilities of the model's classifier output (`compressor.graph.outputs` decides which it is)."""
        if id(output) in self._logits:
            return tf.nn.log_softmax(tf.cast(self._logits[id(output)], tf.float32))
        output = tf.cast(output, tf.float32)
        if outputs_probabilities(self._model, output.numpy):
            return tf.math.log(tf.maximum(output, PROBABILITY_FLOOR))
        return tf.nn.log_softmax(output)

    def _run(self, model: Any, x: Any, prefix: str) -> Any:
        return run_graph(model, [x], lambda op, args, kwargs: self._call(prefix, op, args, kwargs))[0]

    def _call(self, prefix: str, op: Any, args: tuple, kwargs: dict) -> Any:
        path = prefix + op.name
        nested = isinstance(op, keras.Model) and functional_graph(op) is not None
        if nested and all(key == "training" or value is None for key, value in kwargs.items()):
            return self._run(op, args[0], f"{path}/")
        if path in self._targets:
            preact = _preactivation(op, args[0])
            self._tape.watch(preact)
            self.inputs[path], self.preacts[path] = args[0], preact
            output = op.activation(preact) if op.activation is not None else preact
            if id(op) in self._softmax:  # its fused softmax makes the model's output
                self._logits[id(output)] = preact
            return output
        if takes_training(op):
            kwargs = {**kwargs, "training": False}
        output = op(*args, **kwargs)
        if id(op) in self._softmax and isinstance(op, (keras.layers.Softmax, keras.layers.Activation)):
            self._logits[id(output)] = args[0]
        return output


def _preactivation(layer: Any, x: Any) -> tf.Tensor:
    """What `layer(x)` computes before its fused activation (kernel product + bias)."""
    dtype = layer.compute_dtype
    x, kernel = ops.cast(x, dtype), ops.cast(layer.kernel, dtype)
    if isinstance(layer, keras.layers.Dense):
        z = ops.matmul(x, kernel)
    else:
        z = _convolve(layer, x, kernel, layer.data_format)
    if layer.use_bias:
        bias = ops.cast(layer.bias, dtype)
        if _channels_first(layer):
            bias = ops.reshape(bias, (1, -1) + (1,) * (len(z.shape) - 2))
        z = z + bias
    return z


def _convolve(layer: Any, x: Any, kernel: Any, data_format: str) -> tf.Tensor:
    """The layer's convolution of x with another kernel (as Keras' Conv1D/Conv2D.call)."""
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        pad = [[0, 0], [left, 0], [0, 0]] if data_format == "channels_last" else [[0, 0], [0, 0], [left, 0]]
        x, padding = ops.pad(x, pad), "valid"
    strides, dilation = list(layer.strides), layer.dilation_rate
    return ops.conv(x, kernel, strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)


def _channels_first(layer: Any) -> bool:
    return not isinstance(layer, keras.layers.Dense) and layer.data_format == "channels_first"


def channels_last(layer: Any, tensor: Any) -> np.ndarray:
    """A recorded tensor as float64 numpy, channels last."""
    values = np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float64)
    return np.moveaxis(values, 1, -1) if _channels_first(layer) else values


