"""A model's named inputs and outputs: what data feeds, what artifacts are called with, which output a metric reads.

    names = input_names(model)          # ("image", "meta")
    shapes = sample_shapes(model)        # (32, 32, 3) for one input, {"image": (...), "meta": (...)} for several
    name, note = metric_output(model)    # the output whose top-1 an accuracy budget reads

An input is named as its `keras.Input` (its input layer); an output as the layer that produces it (Keras'
own `output_names`), made unique by a suffix when one layer produces two outputs. The
exported TFLite and ONNX artifacts carry these names, and a multi-input `.npz` names its
arrays with them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import keras

from compressor.errors import OptionError
from compressor.graph.keras_api import producer

Shape = tuple
SampleShapes = Union[Shape, dict[str, Shape]]


def input_names(model: keras.Model) -> tuple[str, ...]:
    """The model's input names, in its input order."""
    return _unique([producer(tensor).name for tensor in keras.tree.flatten(model.inputs)])


def output_names(model: keras.Model) -> tuple[str, ...]:
    """The model's output names, in its output order (the producing layers' names)."""
    return _unique([producer(tensor).name for tensor in keras.tree.flatten(model.outputs)])


def input_shapes(model: keras.Model) -> dict[str, Shape]:
    """Per input name, its shape with the batch axis (None for free dimensions)."""
    return {name: tuple(tensor.shape) for name, tensor in zip(input_names(model), keras.tree.flatten(model.inputs))}


def sample_shapes(model: keras.Model) -> SampleShapes:
    """Per-sample input shape (no batch axis): a tuple for one input, a dict name -> tuple for several."""
    shapes = {name: shape[1:] for name, shape in input_shapes(model).items()}
    return next(iter(shapes.values())) if len(shapes) == 1 else shapes


def is_multi_io(model: keras.Model) -> bool:
    """Whether the model has more than one input or more than one output."""
    return len(keras.tree.flatten(model.inputs)) > 1 or len(keras.tree.flatten(model.outputs)) > 1


def metric_output(model: keras.Model, name: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The output an accuracy reads, and a one-line note when it was chosen rather than named.

    Args:
        model: A graph model.
        name: The output to read; None: the only output, or (several outputs) the first
            whose last dimension is above 1 (class scores).

    Returns:
        (output name, note): the note says which output was chosen among several; None
        when the model has one output or `name` named it.

    Raises:
        OptionError: `name` is not an output of the model, or no output holds class scores.
    """
    names = output_names(model)
    if name is not None:
        if name not in names:
            raise OptionError("{metric_output} {name!r} is not an output of model {model!r}; its outputs are {names}",
                              name=name, model=model.name, names=", ".join(names))
        return name, None
    if len(names) == 1:
        return names[0], None
    tensors = keras.tree.flatten(model.outputs)
    scores = [n for n, t in zip(names, tensors) if len(t.shape) >= 2 and (t.shape[-1] or 0) > 1]
    if not scores:
        raise OptionError("model {model!r} has outputs {names} and none holds class scores; name the output "
                          "the metric reads with {metric_output}", model=model.name, names=", ".join(names))
    return scores[0], f"accuracy reads output {scores[0]!r} of {', '.join(names)} (the first with class scores)"


def output_index(model: keras.Model, name: Optional[str]) -> int:
    """Position of output `name` among the model's outputs (0 for None)."""
    return 0 if name is None else output_names(model).index(name)


def pick_output(outputs: Any, index: int) -> Any:
    """Output `index` of what a model call returned (one tensor, a list, or a dict in output order)."""
    return keras.tree.flatten(outputs)[index]


def _unique(names: list[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return tuple(unique)
