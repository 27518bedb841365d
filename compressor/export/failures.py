"""Say which Keras layer a converter failed on: one line naming the layer and the format.

The converters report TensorFlow ops ("kws_1/gru_1/TensorArrayV2_1"), named by the
name scopes Keras opens while tracing. Those scopes are the layer names made unique
within the traced graph, so `conv2d` may trace as `conv2d_1` and `conv2d_1` as
`conv2d_1_2`: a layer name cannot be read back from an op name by text alone.
`layer_scopes` therefore traces the model once more, recording the name scope each
layer's `call` runs in, and `layer_of_op` picks the innermost layer whose scope holds
the op. That second trace happens only after a conversion failed.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import keras

from compressor.errors import ExportError, first_line
from compressor.graph.walk import nested_layers

FORMAT_NAMES = {"tflite": "TFLite", "onnx": "ONNX"}

# TFLite: loc(callsite(fused["TensorListReserve:", "kws_1/gru_1/TensorArrayV2_1@__inference_function_11"] ...
_TFLITE_OP = re.compile(r'fused\["[^"]*", "([^"@]+)(?:@[^"]*)?"\]|loc\("([^"@]+)(?:@[^"]*)?"\)')
# ... 'tf.TensorListReserve' op requires element_shape to be static ...
_TFLITE_REASON = re.compile(r"('tf\.\w+' op [^\n]*)")
# tf2onnx: "Tensorflow op [encoder_1/dense_1/Gelu/Erfc: Erfc] is not supported"
#          "Failed to convert node 'name' (fct=...)"
_ONNX_OP = re.compile(r"\[([^:\]]+): [^\]]+\]|node '([^']+)'")


def tflite_failure(model: keras.Model, exc: BaseException) -> ExportError:
    """The one-line error for a TFLite converter exception, naming the layer it failed on."""
    text = str(exc)
    reason = _TFLITE_REASON.search(text)
    return conversion_error(model, "tflite", _first_op(_TFLITE_OP, text),
                            reason.group(1) if reason else _error_line(text))


def onnx_failure(model: keras.Model, errors: list[str], opset: int) -> ExportError:
    """The one-line error for tf2onnx's error log, naming the layer of the first op it could not convert."""
    named = [line for line in errors if _ONNX_OP.search(line)]
    line = (named or errors)[0]
    return conversion_error(model, "onnx", _first_op(_ONNX_OP, line), f"tf2onnx (opset {opset}): {line}")


def conversion_error(model: keras.Model, fmt: str, op: Optional[str], reason: str) -> ExportError:
    """"layer 'gru' (GRU) cannot be exported to TFLite: <reason>" (the op when no layer holds it)."""
    layer = layer_of_op(model, op) if op else None
    if layer is not None:
        where = f"layer '{layer.name}' ({type(layer).__name__})"
    elif op:
        where = f"op '{op}' of model '{model.name}'"
    else:
        where = f"model '{model.name}'"
    return ExportError(f"{where} cannot be exported to {FORMAT_NAMES[fmt]}: {reason}")


def layer_of_op(model: keras.Model, op: str) -> Optional[Any]:
    """The innermost layer whose traced name scope holds the op, or None."""
    try:
        scopes = layer_scopes(model)
    except Exception:  # naming the layer is a courtesy: a model that cannot be traced gets the op named
        return None
    held = [scope for scope in scopes if op == scope or op.startswith(scope + "/")]
    return scopes[max(held, key=len)] if held else None


def layer_scopes(model: keras.Model) -> dict[str, Any]:
    """{name scope: layer} for every layer call of one trace of the model (nested models' layers too).

    Each layer's `call` is shadowed, for the trace only, by one that records the
    current name scope; the layers are left as they were.
    """
    import tensorflow as tf

    scopes: dict[str, Any] = {}
    layers = {id(layer): layer for layer in [model, *nested_layers(model)]}.values()  # a shared layer once
    shadowed = [layer for layer in layers if "call" not in vars(layer)]
    for layer in shadowed:
        object.__setattr__(layer, "call", _recording(layer, layer.call, scopes))
    try:
        spec = [tf.TensorSpec((None, *x.shape[1:]), x.dtype) for x in model.inputs]
        tf.function(lambda *x: model(*x, training=False), input_signature=spec, autograph=False).get_concrete_function()
    finally:
        for layer in shadowed:
            object.__delattr__(layer, "call")
    return scopes


def _recording(layer: Any, call: Callable, scopes: dict[str, Any]) -> Callable:
    import tensorflow as tf

    def recorded(*args: Any, **kwargs: Any) -> Any:
        scopes.setdefault(tf.get_current_name_scope(), layer)
        return call(*args, **kwargs)

    return recorded


def _first_op(pattern: re.Pattern, text: str) -> Optional[str]:
    match = pattern.search(text)
    return next((group for group in match.groups() if group), None) if match else None


def _error_line(text: str) -> str:
    """The first line that says what went wrong (converter messages start with locations)."""
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return lines[0] if lines else first_line(Exception(text))
