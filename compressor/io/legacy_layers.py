"""Layer configs of Keras 2 (tf_keras) `.h5` files that Keras 3 refuses, read as Keras 3 layers.

Keras 2 stored in a layer's config some arguments Keras 3's layer does not take, and
Keras 3 refuses the whole file for one of them ("Unrecognized keyword arguments passed
to SeparableConv2D"). Measured on files tf_keras 2.21 writes: SeparableConv1D/2D
(`groups`, and a `kernel_*` initializer, regularizer and constraint no separable
kernel uses), DepthwiseConv1D/2D and ConvNDTranspose (`groups`), LSTM, GRU and SimpleRNN
(`time_major`), MultiHeadAttention (the `query_shape`/`key_shape`/`value_shape` it was
built with, `softmax_robust_masking`).

`LEGACY_LAYERS` maps each of these class names (and Bidirectional, for the layers it
wraps) to a loader whose `from_config` drops those keys and builds the plain Keras 3 layer, passed to Keras' `.h5` loader as
custom objects (they are looked up before Keras' own classes). A key is dropped only
when Keras 3 computes the same thing without it: `groups` of 1, `time_major` False,
`softmax_robust_masking` False, build shapes, unused separable `kernel_*` settings.
Any other value (a time-major LSTM) fails in one line naming the layer and the setting.

A Keras 2 file also records a call's tensor keyword arguments by reference
(`attention(x, value=y)`: `[["x", 0, 0, {"value": ["y", 0, 0]}]]`), which Keras 3's
loader passes on as a plain list, so such a layer fails to build. `tensor_arguments_fixed`
rewrites those calls in Keras 3's node format, with the references as tensors.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import keras

from compressor.errors import ModelLoadError

NEUTRAL = {"groups": 1, "time_major": False, "softmax_robust_masking": False}
"""Keras 2 arguments Keras 3 lacks, and the value at which leaving them out changes nothing."""
UNUSED = {
    "separable": ("kernel_initializer", "kernel_regularizer", "kernel_constraint"),
    "attention": ("query_shape", "key_shape", "value_shape"),
}
"""Keras 2 arguments that configure nothing Keras 3's layer computes."""

_L = keras.layers
_KINDS = {
    "separable": (_L.SeparableConv1D, _L.SeparableConv2D),
    "depthwise": (_L.DepthwiseConv1D, _L.DepthwiseConv2D),
    "transpose": (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose),
    "recurrent": (_L.LSTM, _L.GRU, _L.SimpleRNN),
    "attention": (_L.MultiHeadAttention,),
}


def keras3_config(layer_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the Keras 2 keys `layer_class` refuses (module docstring).

    Raises:
        ModelLoadError: A Keras 2 setting Keras 3 cannot reproduce (e.g. time_major=True).
    """
    kind = next(kind for kind, classes in _KINDS.items() if layer_class in classes)
    cleaned = dict(config)
    for key in UNUSED.get(kind, ()):
        cleaned.pop(key, None)
    for key, neutral in NEUTRAL.items():
        if key in cleaned and key not in _accepted(layer_class):
            value = cleaned.pop(key)
            if value != neutral:
                raise ModelLoadError(
                    f"layer '{config.get('name')}' ({layer_class.__name__}) has {key}={value!r}, a Keras 2 setting "
                    f"Keras 3 does not have (only {key}={neutral!r} loads): re-save the model without it"
                )
    return cleaned


def _accepted(layer_class: type) -> set[str]:
    import inspect

    return set(inspect.signature(layer_class.__init__).parameters)


def _loader(layer_class: type) -> type:
    """A class the `.h5` loader finds under `layer_class`'s name, which builds a plain `layer_class`."""

    def from_config(cls, config, custom_objects=None):
        return layer_class.from_config(keras3_config(layer_class, config))

    return type(f"Keras2{layer_class.__name__}", (layer_class,), {"from_config": classmethod(from_config)})


def _inner(config: dict[str, Any]) -> dict[str, Any]:
    """A wrapped layer's serialized config with its Keras 2 keys dropped (when its class is one of `_KINDS`)."""
    layer_class = getattr(_L, str(config.get("class_name")), None)
    if not any(layer_class in classes for classes in _KINDS.values()):
        return config
    return {**config, "config": keras3_config(layer_class, config["config"])}


def _bidirectional(cls, config, custom_objects=None):
    config = dict(config, layer=_inner(config["layer"]))
    if config.get("backward_layer"):
        config["backward_layer"] = _inner(config["backward_layer"])
    return _L.Bidirectional.from_config(config, custom_objects)


LEGACY_LAYERS = {cls.__name__: _loader(cls) for classes in _KINDS.values() for cls in classes}
LEGACY_LAYERS["Bidirectional"] = type("Keras2Bidirectional", (_L.Bidirectional,),
                                      {"from_config": classmethod(_bidirectional)})
"""Custom objects for Keras' `.h5` loader: class name -> a loader of Keras 2 configs."""


def tensor_arguments_fixed(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """A Keras 2 model config with its calls' tensor keyword arguments as Keras 3 nodes; None: nothing to fix.

    Args:
        config: The model config (`{"class_name": "Functional", "config": {"layers": [...]}}`),
            nested models included.
    """
    fixed = copy.deepcopy(config)
    return fixed if _fix_model(fixed.get("config", {})) else None


def _fix_model(config: dict[str, Any]) -> bool:
    layers = config.get("layers") or []
    names = {layer.get("config", {}).get("name", layer.get("name")) for layer in layers} | {
        layer.get("name") for layer in layers}
    changed = False
    for layer in layers:
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            changed |= _fix_model(layer["config"])
        nodes = layer.get("inbound_nodes") or []
        for position, node in enumerate(nodes):
            if isinstance(node, list) and _has_tensor_kwargs(node, names):
                nodes[position] = _keras3_node(node, names)
                changed = True
    return changed


def _is_reference(value: Any, names: set) -> bool:
    return (isinstance(value, list) and len(value) == 3 and value[0] in names
            and all(isinstance(i, int) for i in value[1:]))


def _has_tensor_kwargs(node: list, names: set) -> bool:
    return any(len(entry) == 4 and any(_is_reference(v, names) for v in entry[3].values()) for entry in node)


def _tensor(reference: list) -> dict[str, Any]:
    # The shape is a placeholder: Keras swaps the tensor for the referenced layer's output by its history.
    return {"class_name": "__keras_tensor__", "config": {"shape": (), "dtype": "float32", "keras_history": reference}}


def _keras3_node(node: list, names: set) -> dict[str, Any]:
    inputs = [_tensor(entry[:3]) for entry in node]
    kwargs: dict[str, Any] = {}
    for entry in node:
        for key, value in (entry[3] if len(entry) == 4 else {}).items():
            kwargs[key] = _tensor(value) if _is_reference(value, names) else value
    return {"args": [inputs[0] if len(inputs) == 1 else inputs], "kwargs": kwargs}
