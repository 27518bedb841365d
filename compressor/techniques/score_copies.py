"""Copies of a model that scores are computed on: another dtype, activations taken out.

SNIP takes its loss on logits, so it runs a copy whose final softmax is the identity
(`logits_copy`); SynFlow runs a float64 copy without any activation whose weights are
their magnitudes (`compressor.techniques.synflow`). Both are clones by
`compressor.graph.clone.clone_graph` with the original's weights; the original model
is left unchanged, and nested graph models are cloned the same way (their inputs get
the dtype too, which `clone_model(recursive=True)` would not give them).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import keras
import numpy as np

from compressor.graph.clone import clone_graph, copy_layer
from compressor.graph.flops import ACTIVATION
from compressor.graph.outputs import softmax_output_layers
from compressor.graph.walk import nested_layers

Transform = Callable[[str, np.ndarray], np.ndarray]


def scoring_copy(
    model: keras.Model,
    *,
    dtype: Optional[str] = None,
    linear: Callable[[Any], bool] = lambda layer: False,
    transform: Transform = lambda name, value: value,
) -> tuple[keras.Model, dict[int, Any]]:
    """A clone of `model` with its weights, optionally in another dtype and with activations taken out.

    Args:
        model: A Functional or built Sequential model; left unchanged.
        dtype: The copy's dtype (layers and inputs); default each layer's own.
            keras.ops operations in the graph (`x * 0.5`) compute in their inputs' dtype.
        linear: Whether a layer loses its activation: an activation layer becomes an
            Identity, a fused `activation` becomes "linear".
        transform: Applied to every weight as transform(weight name, value) before it
            is set (cast to the copy's dtype after).

    Returns:
        (copy, copies): copies maps id(original layer) → its copy.

    Raises:
        ModelLoadError: The model (or a nested one) has no layer graph, or a layer
            cannot be copied from its config.
    """
    copies: dict[int, Any] = {}

    def clone_layer(layer: Any) -> Any:
        if id(layer) not in copies:
            if isinstance(layer, keras.Model):
                copies[id(layer)] = clone_graph(layer, clone_layer, input_dtype=dtype, purpose="scoring")
            else:
                copies[id(layer)] = _copy_layer(layer, dtype, linear(layer))
        return copies[id(layer)]

    clone = clone_graph(model, clone_layer, input_dtype=dtype, purpose="scoring")
    _set_weights(model, copies, transform)
    return clone, copies


def logits_copy(model: keras.Model) -> tuple[keras.Model, dict[int, Any]]:
    """`scoring_copy` of a classifier without the softmax that makes its outputs (if any): its logits.

    Which layers that is, `compressor.graph.outputs.softmax_output_layers` says.
    """
    softmax = {id(layer) for layer in softmax_output_layers(model)}
    return scoring_copy(model, linear=lambda layer: id(layer) in softmax)


def _copy_layer(layer: Any, dtype: Optional[str], linear: bool) -> Any:
    def config() -> dict:
        config = layer.get_config()
        if dtype is not None and isinstance(layer, keras.layers.Layer):
            config["dtype"] = dtype
        if linear and "activation" in config:
            config["activation"] = "linear"
        return config

    if linear and isinstance(layer, ACTIVATION):
        return keras.layers.Identity(name=layer.name, dtype=config().get("dtype"))
    return copy_layer(layer, config, why=" to score it")


def _set_weights(model: keras.Model, copies: dict[int, Any], transform: Transform) -> None:
    """Give each copy its original's weights, passed through transform(name, value)."""
    originals = {id(layer): layer for layer in nested_layers(model)}
    for key, copy in copies.items():
        original = originals.get(key)
        if original is None or isinstance(copy, keras.Model) or type(copy) is not type(original):
            continue  # nested models hold their layers; an Identity stands in for an activation
        values = [
            transform(weight.name, keras.ops.convert_to_numpy(weight)).astype(target.dtype)
            for weight, target in zip(original.weights, copy.weights)
        ]
        copy.set_weights(values)
