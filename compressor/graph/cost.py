"""Per-layer parameters and FLOPs of a Keras model, and which techniques could shrink each layer.

`model_cost` lists every leaf layer of a Functional or Sequential model (layers of
nested models as `outer/inner`), with its output shape, its parameters (each weight
variable counted once, so the total equals `model.count_params()`) and its FLOPs
summed over all its calls (a shared layer costs once per call). FLOPs count
multiply-accumulates as 2, at batch 1; the per-layer conventions are in
`compressor.graph.flops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import keras

from compressor.graph.calls import LayerCall, Shape, layer_calls
from compressor.graph.channel_rules import attention_heads
from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, RECURRENT, SEPARABLE, layer_flops

TECHNIQUES = ("tucker", "svd", "sparsity", "channel")


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer of a model.

    Attributes:
        name: Qualified name; a layer inside a nested model is `outer/inner`.
        type: The layer's class name.
        output_shape: Output shape of its first call, None for the batch; a tuple of
            shapes when the layer has several outputs.
        params: Scalars in the weights it owns that no earlier layer owned.
        flops: FLOPs summed over all its calls, at batch 1.
        techniques: Compression techniques that could apply (see `applicable_techniques`).
    """

    name: str
    type: str
    output_shape: tuple
    params: int
    flops: int
    techniques: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return {
            "name": self.name,
            "type": self.type,
            "output_shape": _jsonable(self.output_shape),
            "params": self.params,
            "flops": self.flops,
            "techniques": list(self.techniques),
        }


@dataclass(frozen=True)
class ModelCost:
    """Totals and per-layer costs of a model.

    Attributes:
        params: Total parameters; equals `model.count_params()`.
        flops: Total FLOPs at batch 1 (2 per multiply-accumulate).
        layers: One entry per leaf layer, in topological order.
    """

    params: int
    flops: int
    layers: tuple[LayerCost, ...]

    def to_dict(self) -> dict[str, Any]:
        """`{"params", "flops", "layers": [...]}`, JSON-serializable."""
        return {"params": self.params, "flops": self.flops, "layers": [layer.to_dict() for layer in self.layers]}


def model_cost(model: keras.Model, input_shapes: Optional[Sequence[Shape]] = None) -> ModelCost:
    """Analyse a graph model layer by layer.

    Args:
        model: A Functional model or a built Sequential model; nested models and
            shared layers are allowed.
        input_shapes: Per-input shapes without the batch axis, to count FLOPs at
            another input size (needed when the model's inputs have free spatial
            dimensions, which otherwise count 0). Default: the model's own shapes.

    Returns:
        The per-layer and total parameters and FLOPs.

    Raises:
        ModelLoadError: The model has no layer graph (subclassed, or unbuilt
            Sequential), or `input_shapes` does not fit its inputs.
    """
    calls = layer_calls(model, input_shapes)
    flops: dict[tuple[str, int], int] = {}
    first: dict[tuple[str, int], LayerCall] = {}
    for call in calls:
        key = (call.path, id(call.operation))
        first.setdefault(key, call)
        flops[key] = flops.get(key, 0) + layer_flops(call.operation, call.input_shapes, call.output_shapes)
    seen: set[int] = set()
    layers = [_layer_cost(call, flops[key], _new_params(call.operation, seen)) for key, call in first.items()]
    leftover = _new_params(model, seen)  # weights a subclassed graph model holds itself
    if leftover:
        layers.append(LayerCost(model.name, type(model).__name__, (), leftover, 0, ()))
    return ModelCost(
        params=sum(layer.params for layer in layers),
        flops=sum(layer.flops for layer in layers),
        layers=tuple(layers),
    )


def applicable_techniques(layer: Any) -> tuple[str, ...]:
    """Compression techniques that could apply to a layer.

    - "tucker": Conv2D with a kernel larger than 1x1 (Tucker-2 over the channel modes).
    - "svd": 1x1 Conv2D, Conv1D and Dense (truncated SVD into two layers); the pointwise
      kernel of SeparableConv1D/2D; the input and recurrent kernels of LSTM, GRU
      (reset_after) and SimpleRNN, also both directions of a Bidirectional of them
      (forward and backward of one kind and width, one rank for both).
    - "sparsity": any layer with a kernel (ConvND, ConvNDTranspose, Dense,
      DepthwiseConvND, SeparableConvND).
    - "channel": Conv1D, Conv2D (grouped too), Dense, DepthwiseConv1D/2D,
      SeparableConv1D/2D, MultiHeadAttention with several heads (structured channel removal; a grouped
      convolution loses whole groups, an attention layer whole heads).

    Grouped convolutions (groups > 1) get no "tucker" or "svd": their kernel is not one
    matrix over all channels.

    Args:
        layer: A Keras layer (or a keras.ops operation, which gets none).

    Returns:
        The technique names, in the order of `TECHNIQUES`; empty for layers without weights.
    """
    if not getattr(layer, "weights", None):
        return ()
    grouped = getattr(layer, "groups", 1) != 1
    found = []
    if isinstance(layer, keras.layers.Conv2D) and not grouped:
        found.append("tucker" if math.prod(layer.kernel_size) > 1 else "svd")
    elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Dense) + SEPARABLE) and not grouped:
        found.append("svd")
    elif _factorable_recurrent(layer):
        found.append("svd")
    if isinstance(layer, CONV + CONV_TRANSPOSE + DEPTHWISE + SEPARABLE + (keras.layers.Dense,)):
        found.append("sparsity")
    channel = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense) + DEPTHWISE + SEPARABLE
    if isinstance(layer, channel) or attention_heads(layer):
        found.append("channel")
    return tuple(found)


def recurrent_sides(layer: Any) -> tuple[Any, ...]:
    """The LSTM, GRU or SimpleRNN layers `layer` runs: itself, or a Bidirectional's forward and
    backward layers; () for any other layer (a Bidirectional of other layers too)."""
    sides = (layer.forward_layer, layer.backward_layer) if isinstance(layer, keras.layers.Bidirectional) else (layer,)
    return sides if all(isinstance(side, RECURRENT) for side in sides) else ()


def _factorable_recurrent(layer: Any) -> bool:
    """Recurrent layers "svd" factorizes: no GRU with reset_after=False, both directions alike."""
    sides = recurrent_sides(layer)
    return (
        bool(sides)
        and all(getattr(side, "reset_after", True) for side in sides)
        and len({(type(side), side.units) for side in sides}) == 1
    )


def _layer_cost(call: LayerCall, flops: int, params: int) -> LayerCost:
    shapes = call.output_shapes
    output_shape = shapes[0] if len(shapes) == 1 else shapes
    return LayerCost(
        name=call.path,
        type=type(call.operation).__name__,
        output_shape=output_shape,
        params=params,
        flops=flops,
        techniques=applicable_techniques(call.operation),
    )


def _new_params(layer: Any, seen: set[int]) -> int:
    """Scalars in `layer`'s weights not yet in `seen` (which is updated)."""
    total = 0
    for weight in getattr(layer, "weights", ()):
        if id(weight) not in seen:
            seen.add(id(weight))
            total += math.prod(int(dim) for dim in weight.shape)
    return total


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


# The TFLite converter stores a constant sparsely (EXPERIMENTAL_SPARSITY) only when
# enough of it is zero; below this fraction it stays dense.
SPARSE_STORAGE_MIN_ZEROS = 0.3


def stored_params(model: keras.Model) -> int:
    """Parameters a sparse-storage artifact keeps: weights with >= 30% zeros count their non-zeros.

    For a dense model this equals `model.count_params()`; for a model with masked
    kernels or sparse residual branches it is what the TFLite file stores.
    """
    import numpy as np

    total = 0
    for weight in model.weights:
        values = np.asarray(weight)
        zeros = int(values.size - np.count_nonzero(values))
        dense = values.size < 2 or zeros / values.size < SPARSE_STORAGE_MIN_ZEROS
        total += values.size if dense else values.size - zeros
    return int(total)
