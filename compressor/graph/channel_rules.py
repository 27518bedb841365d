"""Which layers channel pruning can see through, and why it cannot see through the others.

`compressor.graph.groups` walks a graph with these rules. A layer is transparent when
its channels can be followed from its input to its output and its weights sliced
along them: producers (ConvND, ConvNDTranspose, SeparableConvND, Dense), grouped
ConvND (`groups` > 1: channels go a whole group at a time, see
`compressor.graph.groups`), per-channel layers (BatchNormalization, DepthwiseConvND,
PReLU, activations, dropout and noise, pooling, padding/cropping/upsampling, scalar
Rescaling), LayerNormalization over the channel axis alone, merges, and reshapes that
keep the channel axis last. Anything else is opaque: `opaque_reason` says why, in
words that complete "'name' (Type), ...".

A MultiHeadAttention is opaque to the channels of its tensors, but its heads can go
whole (`attention_heads`): a head is its slice of the query, key and value projections
and its rows of the output projection, so the layer keeps its input and output widths.

LayerNormalization is transparent although its statistics mix channels: its
gamma/beta are per channel and slice like BatchNormalization's, and the mean and
variance are then taken over the channels kept. Removing a channel therefore moves the
other channels' outputs a little (unlike BatchNormalization), which the accuracy
check and fine-tuning after pruning account for, as they do for the removed channel
itself; Torch-Pruning prunes LayerNorm the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np

from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, GLOBAL_POOLING, MERGE, POOLING, SEPARABLE

L = keras.layers
PRODUCERS = CONV + CONV_TRANSPOSE + SEPARABLE + (L.Dense,)
RESAMPLING = (
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
)  # fmt: skip
ELEMENTWISE = (
    L.ReLU, L.LeakyReLU, L.ELU,
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization, L.Identity,
)  # fmt: skip
# Weights each sliceable layer class may hold; any other weight makes the layer opaque.
KNOWN_WEIGHTS = (
    (SEPARABLE, {"depthwise_kernel", "pointwise_kernel", "bias"}),
    (CONV + CONV_TRANSPOSE + DEPTHWISE + (L.Dense,), {"kernel", "bias"}),
    ((L.BatchNormalization,), {"gamma", "beta", "moving_mean", "moving_variance"}),
    ((L.LayerNormalization,), {"gamma", "beta"}),
    ((L.PReLU,), {"alpha"}),
)
CHANNEL_SOFTMAX = {"softmax", "log_softmax"}
# The weights of a MultiHeadAttention whose heads can be removed: weight key → its head axis.
HEAD_AXES = {
    **{f"{part}/kernel": 1 for part in ("query", "key", "value")},  # (d_model, heads, dim)
    **{f"{part}/bias": 0 for part in ("query", "key", "value")},  # (heads, dim)
    "attention_output/kernel": 0,  # (heads, dim, d_model); its bias is over d_model
}
OPAQUE = "which channel pruning cannot see through"


def opaque_reason(layer: Any, node: Any) -> Optional[str]:
    """Why channel pruning cannot see through a call (completes "'name' (Type), ..."); None if it can."""
    if isinstance(layer, keras.Model):
        return "a nested model, which channel pruning keeps whole"
    if not isinstance(layer, L.Layer):
        return OPAQUE
    if not isinstance(layer, _TRANSPARENT):
        return OPAQUE
    merge = isinstance(layer, (L.Concatenate,) + MERGE)
    if len(node.outputs) != 1 or (len(node.inputs) != 1 and not merge):
        return f"a call with {len(node.inputs)} inputs and {len(node.outputs)} outputs, {OPAQUE}"
    if any(len(t.shape) < 2 for t in (*node.inputs, *node.outputs)):
        return f"whose tensors have no channel axis, {OPAQUE}"
    return _layer_reason(layer, node)


def attention_heads(layer: Any) -> bool:
    """Whether `layer` is a MultiHeadAttention with several heads and only the weights in HEAD_AXES."""
    if not isinstance(layer, L.MultiHeadAttention) or layer.num_heads < 2 or not layer.weights:
        return False
    return {weight_key(weight) for weight in layer.weights} <= {*HEAD_AXES, "attention_output/bias"}


def weight_key(weight: Any) -> str:
    """A weight's name with its sublayer's ("query/kernel"), as a layer's own weight names can repeat."""
    return "/".join(weight.path.split("/")[-2:])


def _layer_reason(layer: Any, node: Any) -> Optional[str]:
    """Layer-specific reasons a transparent layer type still cannot be seen through."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return "which uses the channels_first layout"
    if getattr(layer, "groups", 1) != 1 and not isinstance(layer, CONV):
        return f"a grouped layer (groups={layer.groups})"
    unknown = _unknown_weights(layer)
    if unknown:
        return f"with weights channel pruning cannot slice ({', '.join(sorted(unknown))})"
    rank = len(node.inputs[0].shape)
    if isinstance(layer, L.BatchNormalization) and int(layer.axis) % rank != rank - 1:
        return f"normalizing along axis {layer.axis}, not the channel axis"
    if isinstance(layer, L.LayerNormalization) and _axes(layer.axis, rank) != {rank - 1}:
        return f"normalizing over axes {sorted(_axes(layer.axis, rank))}, not the channel axis alone"
    if isinstance(layer, L.Activation) and activation_name(layer) in CHANNEL_SOFTMAX:
        return "a softmax across channels"
    if isinstance(layer, L.Softmax) and (rank - 1) in _axes(layer.axis, rank):
        return "a softmax across channels"
    if isinstance(layer, L.Rescaling) and (np.size(layer.scale) != 1 or np.size(layer.offset) != 1):
        return "with a per-channel scale or offset"
    if isinstance(layer, (L.Flatten, L.Reshape)):
        return _reshape_reason(layer, node)
    return None


def _axes(axis: Any, rank: int) -> set[int]:
    return {int(a) % rank for a in np.atleast_1d(axis)}


def _reshape_reason(layer: Any, node: Any) -> Optional[str]:
    before, after = tuple(node.inputs[0].shape), tuple(node.outputs[0].shape)
    if len(before) > 2 and len(after) == 2:  # flattening: needs every spatial size
        return None if all(d is not None for d in before[1:]) else f"flattening free spatial sizes, {OPAQUE}"
    if isinstance(layer, L.Flatten) or (before[-1] is not None and before[-1] == after[-1]):
        return None
    return "a reshape that moves the channel axis"


def _unknown_weights(layer: Any) -> set[str]:
    names = {weight.name for weight in layer.weights}
    for classes, known in KNOWN_WEIGHTS:
        if isinstance(layer, classes):
            return names - known
    return names


def activation_name(layer: Any) -> str:
    activation = layer.activation
    return getattr(activation, "__name__", str(activation))


_TRANSPARENT = (  # the layer classes the rules above know
    PRODUCERS + DEPTHWISE + MERGE + POOLING + GLOBAL_POOLING + RESAMPLING + ELEMENTWISE
    + (L.Concatenate, L.BatchNormalization, L.LayerNormalization, L.PReLU, L.Activation, L.Softmax, L.Rescaling)
    + (L.Flatten, L.Reshape)
)  # fmt: skip
