"""Does a classifier end in logits or in probabilities? The one answer the package uses.

Fine-tuning and gate training distil from logits, the K-FAC pass needs
log-probabilities, SNIP takes its loss on logits; each must know whether the model's
outputs are probabilities (a softmax, whose log gives logits back up to a constant)
or logits. The graph answers first:

- a softmax over the last axis produces the output (a fused `activation="softmax"`,
  a `Softmax` layer, an `Activation("softmax")` layer; inside a nested model too):
  probabilities;
- the output layer's activation is linear or absent (`activation=None`): logits;
- anything else (a Lambda, a sigmoid, a layer without an `activation`): the graph
  does not tell, and the values decide: rows of non-negative numbers that sum to 1
  (within float32 rounding) are probabilities.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import keras
import numpy as np

from compressor.graph.keras_api import producer

SUM_TOLERANCE = 1e-3
"""How far from 1 a row of float32 probabilities may sum (rounding of a wide softmax)."""

_NO_ACTIVATION = "<none>"


def softmax_output_layers(model: keras.Model) -> list[Any]:
    """The layers whose softmax over the last axis produces the model's outputs, nested models followed.

    Args:
        model: A graph model; anything without recorded outputs has none.

    Returns:
        Those layers (each once), in the order of the outputs.
    """
    found: dict[int, Any] = {}
    for tensor in _outputs(model):
        layer = producer(tensor)
        if isinstance(layer, keras.Model):
            found.update((id(inner), inner) for inner in softmax_output_layers(layer))
        elif _activation(layer, len(tensor.shape)) == "softmax":
            found[id(layer)] = layer
    return list(found.values())


def ends_in_softmax(model: keras.Model) -> Optional[bool]:
    """Whether the graph shows the model's outputs are probabilities.

    Returns:
        True when a softmax over the last axis produces every output, False when every
        output layer is linear, None when the graph does not tell (module docstring).
    """
    answers = set()
    for tensor in _outputs(model):
        layer = producer(tensor)
        if isinstance(layer, keras.Model):
            answers.add(ends_in_softmax(layer))
            continue
        activation = _activation(layer, len(tensor.shape))
        answers.add(True if activation == "softmax" else False if activation in (None, "linear") else None)
    return answers.pop() if len(answers) == 1 else None


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Whether rows (last axis) are non-negative and sum to 1, within SUM_TOLERANCE."""
    outputs = np.asarray(outputs)
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=SUM_TOLERANCE))


def outputs_probabilities(model: Optional[keras.Model], outputs: Callable[[], np.ndarray]) -> bool:
    """Whether the model's outputs are probabilities: as its graph shows, else as `outputs()` look.

    Args:
        model: The model, or None when only its outputs are known.
        outputs: Gives some of its outputs; called only when the graph does not tell.
    """
    known = None if model is None else ends_in_softmax(model)
    return known if known is not None else looks_like_probabilities(outputs())


def _outputs(model: Any) -> list:
    try:
        return list(getattr(model, "outputs", None) or [])
    except (AttributeError, ValueError):  # a subclassed or unbuilt model has none recorded
        return []


def _activation(layer: Any, rank: int) -> Optional[str]:
    """"softmax" (over the last axis), "linear", None (no activation), or another name; "<none>" when not told."""
    if isinstance(layer, keras.layers.Softmax):
        axes = {int(a) % rank for a in np.atleast_1d(layer.axis)}
        return "softmax" if axes == {rank - 1} else "softmax over another axis"
    activation = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.Layer) and activation is not None and not isinstance(activation, str):
        name = getattr(activation, "__name__", None)
        if name is not None:
            return name
    config = layer.get_config() if hasattr(layer, "get_config") else {}
    activation = config.get("activation", _NO_ACTIVATION)
    if isinstance(activation, dict):  # a serialized activation object
        activation = activation.get("config", {}).get("name", activation.get("class_name"))
    return activation
