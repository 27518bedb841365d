"""FLOPs of one layer call, from the layer's config and the shapes it was called with.

Conventions (one sample, i.e. batch 1; the batch axis of every shape is ignored):

- A multiply-accumulate is 2 FLOPs. Convolutions and Dense layers cost
  2 × (output elements) × (inputs each output reads), plus 1 per output element
  for the bias add, plus 1 per output element for a fused activation.
  - ConvND: each output reads kernel_size × in_channels / groups inputs (strides,
    dilation and padding enter through the output shape).
  - ConvNDTranspose: each *input* element scatters into kernel_size × filters outputs.
  - DepthwiseConvND: each output reads kernel_size inputs.
  - SeparableConvND: the depthwise part (kernel_size per intermediate element) plus
    the 1x1 pointwise part (in_channels × depth_multiplier per output element).
  - Dense: each output reads the last input axis (any input rank).
- Recurrent layers (LSTM, GRU, SimpleRNN, a `keras.layers.RNN` of their cells or of
  the low-rank cells of `compressor.layers.recurrent`; both directions of a
  Bidirectional): per time step, with u units and G gates (4, 3, 1), the input and
  recurrent matrix products (2 × Cin × G·u and 2 × u × G·u, or 2 × r × (rows + G·u)
  for a kernel stored as rank-r factors), G·u to add the two, G·u per bias (a GRU
  with reset_after has two), and the gate arithmetic, 1 per element per operation:
  LSTM 9u (four gate activations, f·c + i·g, o·act(c)), GRU 8u (r·h, the candidate's
  add, three activations, z·h + (1 − z)·h̃), SimpleRNN u (its activation). The time
  steps are the input's second axis; a free one counts 0.
- MultiHeadAttention with h heads, key size k, value size v (the query's last axis
  Dq, key's Dk, value's Dv, output's Do; T positions of a tensor besides batch and
  features, A of them on the attention axes): the projections as Dense layers
  (2·Tq·Dq·h·k for the query, 2·Tk·Dk·h·k, 2·Tv·Dv·h·v, 2·Tq·h·v·Do for the output,
  each + its bias), the query's scaling Tq·h·k, the scores 2·h·Tq·Ak·k, their
  softmax h·Tq·Ak, the weighted values 2·h·Tq·Ak·v; with `use_gate`, the gate's
  projection, bias, sigmoid and product (2·Tq·Dq·h·v + 3·Tq·h·v).
- BatchNormalization: 2 per element (inference: one scale, one shift).
  LayerNormalization: 5 per element for its statistics and normalization (mean,
  centre, square, variance, multiply by 1/σ), + 1 for `scale`, + 1 for `center`.
- Rescaling: 1 per element for the scale, +1 when the offset is not zero.
  Normalization: 2 per element (subtract the mean, multiply by 1/std).
- Max/average pooling: pool-window size per output element. Global pooling: 1 per
  input element.
- Add/Subtract/Multiply/Average/Maximum/Minimum layers: (inputs − 1) per output
  element. Element-wise keras.ops operations in the graph (`x + y`, `x * 0.5`): 1 per
  output element.
- Activation functions (Activation, ReLU, LeakyReLU, PReLU, ELU, Softmax layers, and
  fused `activation=`): 1 per element, whatever the function; "linear" is free.
- Gated residual blocks (`compressor.layers.gating`): the branch's layers count
  as they are (every gate open: the most an input can cost), the block's Add 1 per
  element; a gate: its global average pooling (1 per input element), its
  standardization and Dense (4 per channel) and 2 for its bias and offset.
- Data movement is free: InputLayer, ZeroPadding, Cropping, Reshape, Flatten,
  Permute, Concatenate, Dropout and the other regularization layers.
- Any other layer, and any layer whose shapes have free (None) dimensions besides the
  batch, counts 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np

from compressor.layers.gating import GatedResidual, SkipGate
from compressor.layers.recurrent import GATES

Shape = tuple[Optional[int], ...]

L = keras.layers
CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
CONV_TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
RECURRENT = (L.LSTM, L.GRU, L.SimpleRNN)
POOLING = (
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
)  # fmt: skip
GLOBAL_POOLING = (
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
)  # fmt: skip
MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
ACTIVATION = (L.Activation, L.ReLU, L.LeakyReLU, L.PReLU, L.ELU, L.Softmax)
ELEMENTWISE_OPS = {"Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power"}


class _FreeDimension(Exception):
    """A shape has a None dimension besides the batch: the cost is unknown."""


def layer_flops(layer: Any, input_shapes: Sequence[Shape], output_shapes: Sequence[Shape]) -> int:
    """FLOPs of one call of `layer` at batch 1 (conventions in the module docstring).

    Args:
        layer: A Keras layer, or a keras.ops operation found in a Functional graph.
        input_shapes: Shapes of the call's tensor inputs, batch first.
        output_shapes: Shapes of the call's outputs, batch first.

    Returns:
        The FLOPs; 0 for layers without a rule and for shapes with free dimensions.
    """
    if not output_shapes:
        return 0
    try:
        if not isinstance(layer, L.Layer):
            return _size(output_shapes[0]) if type(layer).__name__ in ELEMENTWISE_OPS else 0
        if isinstance(layer, L.Bidirectional):
            return sum(_recurrent(side, input_shapes[0]) for side in (layer.forward_layer, layer.backward_layer))
        if isinstance(layer, L.RNN):
            return _recurrent(layer, input_shapes[0])
        for classes, rule in _RULES:
            if isinstance(layer, classes):
                return int(rule(layer.get_config(), list(input_shapes), list(output_shapes)))
    except _FreeDimension:
        return 0
    return 0


def _size(shape: Shape) -> int:
    """Elements of one sample (the batch axis dropped)."""
    dims = shape[1:]
    if any(d is None for d in dims):
        raise _FreeDimension(shape)
    return math.prod(dims)


def _prod(value: Any) -> int:
    return math.prod(value) if isinstance(value, (tuple, list)) else int(value)


def _channels(config: dict, shape: Shape) -> int:
    channel = shape[1] if config.get("data_format") == "channels_first" else shape[-1]
    if channel is None:
        raise _FreeDimension(shape)
    return channel


def _epilogue(config: dict, out: Shape) -> int:
    """Bias add and fused activation, 1 per output element each."""
    size = _size(out)
    bias = size if config.get("use_bias", False) else 0
    return bias + (size if _is_activation(config.get("activation")) else 0)


def _is_activation(name: Any) -> bool:
    return name not in (None, "linear")


def _conv(config: dict, ins: list, outs: list) -> int:
    per_output = _prod(config["kernel_size"]) * _channels(config, ins[0]) // config.get("groups", 1)
    return 2 * _size(outs[0]) * per_output + _epilogue(config, outs[0])


def _conv_transpose(config: dict, ins: list, outs: list) -> int:
    per_input = _prod(config["kernel_size"]) * config["filters"]
    return 2 * _size(ins[0]) * per_input + _epilogue(config, outs[0])


def _depthwise(config: dict, ins: list, outs: list) -> int:
    return 2 * _size(outs[0]) * _prod(config["kernel_size"]) + _epilogue(config, outs[0])


def _separable(config: dict, ins: list, outs: list) -> int:
    positions = _size(outs[0]) // config["filters"]
    middle = _channels(config, ins[0]) * config["depth_multiplier"]
    depthwise = 2 * positions * middle * _prod(config["kernel_size"])
    pointwise = 2 * positions * middle * config["filters"]
    return depthwise + pointwise + _epilogue(config, outs[0])


def _dense(config: dict, ins: list, outs: list) -> int:
    features = ins[0][-1]
    if features is None:
        raise _FreeDimension(ins[0])
    return 2 * _size(outs[0]) * features + _epilogue(config, outs[0])


# Gate arithmetic per unit and time step besides the matrix products and biases (module docstring).
GATE_ARITHMETIC = {"LSTMCell": 9, "GRUCell": 8, "SimpleRNNCell": 1}


def _recurrent(layer: Any, input_shape: Shape) -> int:
    """A recurrent layer's FLOPs over its input's time steps (module docstring); 0 for another RNN cell."""
    cell = layer.cell
    kind = next((name for name in GATES if isinstance(cell, getattr(L, name))), None)
    if kind is None or len(input_shape) != 3:
        return 0
    steps, features = input_shape[1], input_shape[2]
    if steps is None or features is None:
        raise _FreeDimension(input_shape)
    units = cell.units
    width = GATES[kind] * units
    products = _product_macs(features, width, getattr(cell, "input_rank", None))
    products += _product_macs(units, width, getattr(cell, "recurrent_rank", None))
    biases = 0
    if cell.use_bias:
        biases = width * (2 if kind == "GRUCell" and cell.reset_after else 1)
    return steps * (2 * products + width + biases + GATE_ARITHMETIC[kind] * units)


def _product_macs(rows: int, cols: int, rank: Optional[int]) -> int:
    return rows * cols if rank is None else rank * (rows + cols)


def _attention(config: dict, ins: list, outs: list) -> int:
    """MultiHeadAttention (module docstring); inputs (query, value[, key])."""
    query, value = ins[0], ins[1]
    key = ins[2] if len(ins) > 2 else value
    heads, key_dim = config["num_heads"], config["key_dim"]
    value_dim = config.get("value_dim") or key_dim
    positions = {name: _size(shape) // shape[-1] for name, shape in (("q", query), ("k", key), ("v", value))}
    axes = config.get("attention_axes") or tuple(range(1, len(key) - 1))
    attended = math.prod(key[axis] for axis in ((a if a >= 0 else len(key) + a) for a in axes))
    bias = 1 if config.get("use_bias", True) else 0
    out_dim = outs[0][-1]
    tq = positions["q"]
    projections = (
        (2 * query[-1] + bias) * tq * heads * key_dim
        + (2 * key[-1] + bias) * positions["k"] * heads * key_dim
        + (2 * value[-1] + bias) * positions["v"] * heads * value_dim
        + (2 * heads * value_dim + bias) * tq * out_dim
    )
    attention = tq * heads * key_dim + heads * tq * attended * (2 * key_dim + 1 + 2 * value_dim)
    gate = (2 * query[-1] + 3) * tq * heads * value_dim if config.get("use_gate") else 0
    return projections + attention + gate


def _layer_norm(config: dict, ins: list, outs: list) -> int:
    return _size(outs[0]) * (5 + bool(config.get("scale", True)) + bool(config.get("center", True)))


def _rescaling(config: dict, ins: list, outs: list) -> int:
    shift = bool(np.any(np.asarray(config.get("offset", 0.0)) != 0))
    return _size(outs[0]) * (2 if shift else 1)


def _activation(config: dict, ins: list, outs: list) -> int:
    if "activation" in config and not _is_activation(config["activation"]):
        return 0
    return _size(outs[0])


def _gate(config: dict, ins: list, outs: list) -> int:
    return _size(ins[0]) + 4 * _channels({}, ins[0]) + 2


_Rule = Callable[[dict, list, list], int]
_RULES: tuple[tuple[tuple[type, ...], _Rule], ...] = (
    (CONV, _conv),
    (CONV_TRANSPOSE, _conv_transpose),
    (DEPTHWISE, _depthwise),
    (SEPARABLE, _separable),
    ((L.Dense,), _dense),
    ((L.MultiHeadAttention,), _attention),
    ((L.BatchNormalization,), lambda c, ins, outs: 2 * _size(outs[0])),
    ((L.LayerNormalization,), _layer_norm),
    ((L.Rescaling,), _rescaling),
    ((L.Normalization,), lambda c, ins, outs: 2 * _size(outs[0])),
    (POOLING, lambda c, ins, outs: _size(outs[0]) * _prod(c["pool_size"])),
    (GLOBAL_POOLING, lambda c, ins, outs: _size(ins[0])),
    (MERGE, lambda c, ins, outs: (len(ins) - 1) * _size(outs[0])),
    (ACTIVATION, _activation),
    ((SkipGate,), _gate),
    ((GatedResidual,), lambda c, ins, outs: _size(outs[0])),
)
