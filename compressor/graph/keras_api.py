"""Every use of Keras' private API in this package, in one place.

Keras 3 has no public API for the nodes of a graph model, for the layer that
produced a tensor, or for turning safe mode off around an in-memory copy. The rest
of the package reaches these through the functions below, so a Keras upgrade that
moves them touches this file only. Checked against Keras 3.15.1 (TensorFlow 2.21).

Used here, and why:

- `keras.src.models.functional.Functional`: the class of graph models; a
  `keras.Model(inputs, outputs)` is one.
- `Sequential._functional`: the graph a built Sequential model runs (None until the
  model knows its input shape).
- `Function._nodes_by_depth` and `Node.operation`, `.input_tensors`, `.outputs`,
  `.is_input`, `.arguments.fill_in`: a graph's layer calls, and a call's arguments
  with its recorded tensors swapped for others (how a graph is run again, op by op).
- `KerasTensor._keras_history.operation`: the layer that produced a tensor.
- `Layer._call_context_args`: whether a layer's `call` takes `training`.
- `keras.src.saving.serialization_lib.SafeModeScope`: safe mode off while a layer
  already in memory is copied from its config (a Lambda's function comes back from
  its own bytecode, which loading the model ran or allowed).

After an upgrade, `tests/test_graph_kinds.py` (every model kind through every
rewriter) shows what broke.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import keras

KERAS_VERSION = "3.15.1"
"""The Keras version this module was checked against."""


@dataclass(frozen=True)
class GraphNode:
    """One call recorded in a graph model: a layer (or keras.ops operation) on some tensors.

    Attributes:
        operation: The layer, nested model or keras.ops operation called.
        inputs: The KerasTensors it was called on, as recorded when the graph was built.
        outputs: The KerasTensors it returned.
        is_input: Whether this is an input layer's node (it computes nothing).
    """

    operation: Any
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    is_input: bool
    fill_in: Callable[[Mapping[int, Any]], tuple[tuple, dict]] = field(repr=False, compare=False)

    def arguments(self, values: Mapping[int, Any]) -> tuple[tuple, dict]:
        """The call's (args, kwargs) with each recorded tensor replaced by `values[id(tensor)]`."""
        return self.fill_in(values)

    def call(self, values: Mapping[int, Any]) -> list:
        """Call the operation again on the tensors `values` maps its inputs to (by id); its outputs, flat."""
        args, kwargs = self.arguments(values)
        return keras.tree.flatten(self.operation(*args, **kwargs))

    def infer(self, values: Mapping[int, Any]) -> list:
        """The output specs of the call on other input specs (by id), flat; nothing is computed."""
        args, kwargs = self.arguments(values)
        return keras.tree.flatten(self.operation.compute_output_spec(*args, **kwargs))


def functional_graph(model: Any) -> Optional[keras.Model]:
    """The Functional graph of a Functional or built Sequential model; None for anything else."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        model = getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def is_graph_model(model: Any) -> bool:
    """Whether `model` is a Sequential or Functional model (built or not), not a subclassed one."""
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def graph_nodes(graph: keras.Model) -> list[GraphNode]:
    """The nodes of a Functional graph in topological order.

    Deepest first (inputs), and within one depth in the order of `graph.operations`,
    so the same graph always lists its nodes in the same order.
    """
    order = {id(op): i for i, op in enumerate(graph.operations)}
    nodes = []
    by_depth = graph._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        for node in sorted(by_depth[depth], key=lambda n: order.get(id(n.operation), -1)):
            if node.operation is None:
                continue
            nodes.append(
                GraphNode(
                    operation=node.operation,
                    inputs=tuple(node.input_tensors),
                    outputs=tuple(node.outputs),
                    is_input=node.is_input,
                    fill_in=node.arguments.fill_in,
                )
            )
    return nodes


def producer(tensor: Any) -> Any:
    """The layer (or operation) whose call produced a KerasTensor of a graph."""
    return tensor._keras_history.operation


def takes_training(layer: Any) -> bool:
    """Whether the layer's `call` has a `training` argument."""
    return "training" in getattr(layer, "_call_context_args", ())


@contextlib.contextmanager
def safe_mode_off() -> Iterator[None]:
    """Let `from_config` rebuild Lambda functions: only for copies of layers already in memory."""
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        yield
