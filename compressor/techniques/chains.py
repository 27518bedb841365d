"""The layers a low-rank edit puts in place of one layer: a chain of kernels, and a residual branch.

A chain is given as (name suffix, kernel in pattern layout, spatial) triples; each
becomes a layer of the original's kind. A "spatial" one keeps the original's strides,
padding and dilation; the others are pointwise (1×1, or Dense).

A separable convolution is factorized through its pointwise kernel: its spatial link
is a separable convolution with the original depthwise kernel and a narrowed
pointwise kernel (Cin → r), the others are 1×1 convolutions (r → Cout), so the chain
computes depthwise, then the factorized pointwise product.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np

from compressor.graph.flops import SEPARABLE
from compressor.surgery.replacement import Piece, Replacement
from compressor.techniques.base import activation_name, kernel_of

# Config entries the new layers inherit from the layer they replace.
CARRIED = (
    "trainable", "dtype", "data_format",
    "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
    "kernel_constraint", "bias_constraint",
)  # fmt: skip
# What a separable convolution's pointwise kernel settings become on a plain convolution.
POINTWISE_AS_KERNEL = {
    "pointwise_initializer": "kernel_initializer",
    "pointwise_regularizer": "kernel_regularizer",
    "pointwise_constraint": "kernel_constraint",
}


def assemble_chain(
    layer: Any, kernels: list[tuple[str, np.ndarray, bool]], sparse: Optional[np.ndarray], notes: dict
) -> Replacement:
    """The replacement of `layer` by a chain of kernels (the last with its bias and activation).

    Args:
        layer: The original layer (a Conv1D, Conv2D, Dense or SeparableConv1D/2D).
        kernels: (name suffix, kernel in pattern layout, spatial) per chain layer, in
            order; spatial: it keeps the original's strides, padding and dilation (for a
            separable convolution: it is a separable convolution with the original's
            depthwise kernel, and the kernel is its pointwise one).
        sparse: A residual kernel shaped like the original's, run in a parallel
            branch; the activation then moves after the sum. None: no branch.
        notes: The replacement's notes (reconstruction error etc.).
    """
    dtype = kernel_of(layer).dtype
    activation = activation_name(layer)
    bias = [keras.ops.convert_to_numpy(layer.bias)] if layer.use_bias else []
    chain = []
    for position, (suffix, kernel, spatial) in enumerate(kernels):
        last = position == len(kernels) - 1
        new = derived_layer(
            layer,
            suffix,
            width=kernel.shape[-1],
            kernel_size=kernel.shape[:-2],
            spatial=spatial,
            use_bias=last and layer.use_bias,
            activation=activation if last and sparse is None else None,
            output=last and sparse is None,
        )
        weights = _leading_weights(layer, spatial) + [kernel.astype(dtype)] + (bias if last else [])
        chain.append(Piece(new, weights))
    if sparse is None:
        return Replacement(chain=chain, notes=notes)
    branch = derived_layer(
        layer, "residual", width=sparse.shape[-1], kernel_size=sparse.shape[:-2], spatial=True, use_bias=False
    )
    weights = _leading_weights(layer, True) + [sparse.astype(dtype)]
    return Replacement(chain=chain, branch=Piece(branch, weights), activation=activation, notes=notes)


def derived_layer(
    layer: Any,
    suffix: str,
    width: int,
    kernel_size: tuple[int, ...],
    spatial: bool,
    use_bias: bool,
    activation: Optional[Any] = None,
    output: bool = False,
) -> Any:
    """A new Conv1D/Conv2D/Dense (the original's base class) named `<name>_<suffix>`.

    It keeps the original's dtype policy, data format, initializers, regularizers and
    constraints. Of a separable convolution, a spatial layer is a separable
    convolution like it (narrowed to `width` filters), another a 1×1 convolution.

    Args:
        layer: The original layer.
        suffix: Appended to the original's name.
        width: Output channels (filters or units).
        kernel_size: Its kernel's spatial size (ignored for Dense and separable ones).
        spatial: Keep the original's strides, padding and dilation (else 1, "valid", 1).
        use_bias: Whether it has a bias.
        activation: Its fused activation (None: linear).
        output: It produces the layer's output: it also gets the activity regularizer.
    """
    config = layer.get_config()
    name = f"{layer.name}_{suffix}"
    if isinstance(layer, SEPARABLE) and spatial:
        new = {**config, "name": name, "filters": width, "use_bias": use_bias, "activation": activation}
        new["activity_regularizer"] = config.get("activity_regularizer") if output else None
        return type(layer).from_config(new)
    if isinstance(layer, SEPARABLE):
        config = {**config, **{kernel: config[key] for key, kernel in POINTWISE_AS_KERNEL.items() if key in config}}
    new = {key: config[key] for key in CARRIED if key in config}
    new.update(name=name, use_bias=use_bias, activation=activation)
    if output and config.get("activity_regularizer") is not None:
        new["activity_regularizer"] = config["activity_regularizer"]
    if isinstance(layer, keras.layers.Dense):
        return keras.layers.Dense.from_config({**new, "units": width})
    one_d = isinstance(layer, (keras.layers.Conv1D, keras.layers.SeparableConv1D))
    cls = keras.layers.Conv1D if one_d else keras.layers.Conv2D
    new.update(filters=width, kernel_size=tuple(kernel_size), groups=1)
    if spatial:
        new.update(strides=config["strides"], padding=config["padding"], dilation_rate=config["dilation_rate"])
    else:
        new.update(strides=1, padding="valid", dilation_rate=1)
    return cls.from_config(new)


def _leading_weights(layer: Any, spatial: bool) -> list[np.ndarray]:
    """Weights a derived layer holds before its kernel: a separable one's depthwise kernel."""
    if isinstance(layer, SEPARABLE) and spatial:
        return [keras.ops.convert_to_numpy(layer.depthwise_kernel)]
    return []
