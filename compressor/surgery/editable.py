"""Which layers of a model the rewriter can replace, and why the others cannot.

The rewriter replaces one layer call `y = layer(x)` by new layers on the same `x`, so
it handles leaf layers whose every call takes one tensor and returns one tensor
(Conv1D, Conv2D, DepthwiseConv2D, Dense, and most single-input layers). Merge layers
(Add, Concatenate), input layers, keras.ops operations and nested models themselves
are not editable; the layers inside a nested graph model are, under `outer/inner`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import keras

from compressor.graph.calls import LayerCall, layer_calls
from compressor.surgery.plan import PlanError

_EXAMPLES = 5  # valid names quoted in an error message
_UNKNOWN = "no layer of that name"


def editable_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The layers `rewrite_model` can replace.

    Args:
        model: A Functional model or a built Sequential model.

    Returns:
        Qualified name (`layer`, or `outer/inner` inside nested models) → layer, in
        topological order.

    Raises:
        ModelLoadError: The model has no layer graph (subclassed or unbuilt).
    """
    grouped = _calls_by_name(layer_calls(model))
    return {name: calls[0].operation for name, calls in grouped.items() if _reason(calls) is None}


def why_not_editable(model: keras.Model, name: str) -> Optional[str]:
    """Why the layer `name` cannot be replaced; None when it can.

    Args:
        model: A Functional model or a built Sequential model.
        name: Qualified layer name.

    Raises:
        ModelLoadError: The model has no layer graph (subclassed or unbuilt).
    """
    return _reason_for(_calls_by_name(layer_calls(model)), name)


def check_editable(model: keras.Model, names: Iterable[str]) -> None:
    """Raise unless every name is an editable layer of `model`.

    Raises:
        PlanError: Names that are not in the model (with a few valid names quoted),
            or layers that cannot be replaced (with the reason for each).
        ModelLoadError: The model has no layer graph.
    """
    names = list(names)
    if not names:
        return
    grouped = _calls_by_name(layer_calls(model))
    reasons = {name: _reason_for(grouped, name) for name in names}
    unknown = [name for name, reason in reasons.items() if reason == _UNKNOWN]
    if unknown:
        valid = [name for name, calls in grouped.items() if _reason(calls) is None][:_EXAMPLES]
        raise PlanError(
            f"unknown layer name(s) in model '{model.name}': {', '.join(map(repr, unknown))}. "
            f"Expected qualified names such as {', '.join(map(repr, valid)) or '(none: nothing is editable)'}"
        )
    refused = [f"'{name}' ({reason})" for name, reason in reasons.items() if reason is not None]
    if refused:
        raise PlanError(f"layer(s) of model '{model.name}' cannot be replaced: {'; '.join(refused)}")


def _reason_for(grouped: dict[str, list[LayerCall]], name: str) -> Optional[str]:
    if name in grouped:
        return _reason(grouped[name])
    if _is_nested_model(grouped, name):
        return f"a nested model: replace its layers ('{name}/...') instead"
    return _UNKNOWN


def _calls_by_name(calls: list[LayerCall]) -> dict[str, list[LayerCall]]:
    grouped: dict[str, list[LayerCall]] = {}
    for call in calls:
        grouped.setdefault(call.path, []).append(call)
    return grouped


def _is_nested_model(grouped: dict[str, list[LayerCall]], name: str) -> bool:
    return any(path.startswith(name + "/") for path in grouped)


def _reason(calls: list[LayerCall]) -> Optional[str]:
    operation = calls[0].operation
    if isinstance(operation, keras.layers.InputLayer):
        return "an input layer"
    if isinstance(operation, keras.Model):
        return f"a {type(operation).__name__} model without a layer graph"
    if not isinstance(operation, keras.layers.Layer):
        return f"a keras.ops operation ({type(operation).__name__}), not a layer"
    inputs = sorted({len(call.input_shapes) for call in calls})
    outputs = sorted({len(call.output_shapes) for call in calls})
    if inputs != [1]:
        return f"{type(operation).__name__} takes {' or '.join(map(str, inputs))} tensor inputs; only one is supported"
    if outputs != [1]:
        return f"{type(operation).__name__} returns {' or '.join(map(str, outputs))} tensors; only one is supported"
    return None
