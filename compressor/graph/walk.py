"""The one walker over a graph model's nodes: list them, or run them again, op by op.

A Functional (or built Sequential) model records each layer call as a node. `graph_of`
lists a model's nodes in topological order; `run_nodes` calls them again on other
tensors (symbolic KerasTensors to rebuild a graph, eager tensors to run it), each
call going through a hook that may replace it. Every analysis and rewrite in this
package that needs calls one by one goes through here: layer calls and costs
(`compressor.graph.calls`), channel groups, residual blocks and gates, the K-FAC
recorder. Whole-model copies go through `compressor.graph.clone` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import keras

from compressor.errors import ModelLoadError
from compressor.graph.keras_api import GraphNode, functional_graph, graph_nodes

Call = Callable[[Any, tuple, dict], Any]
"""A hook `call(operation, args, kwargs) -> outputs` through which a walk calls each node."""


@dataclass(frozen=True)
class Graph:
    """The nodes of a graph model.

    Attributes:
        inputs: Its input KerasTensors.
        outputs: Its output KerasTensors.
        nodes: Every node, in topological order (input layers' nodes first).
    """

    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    nodes: tuple[GraphNode, ...]


def graph_of(model: Any) -> Optional[Graph]:
    """The nodes of a Functional or built Sequential model; None for anything else."""
    functional = functional_graph(model)
    if functional is None:
        return None
    return Graph(tuple(functional.inputs), tuple(functional.outputs), tuple(graph_nodes(functional)))


def require_graph(model: Any, purpose: str) -> Graph:
    """`graph_of(model)`, or an error that names what needed it.

    Args:
        model: The model.
        purpose: What needs the graph, completing "... has no layer graph: {purpose} needs ...".

    Raises:
        ModelLoadError: The model is subclassed, or a Sequential model without an input shape.
    """
    graph = graph_of(model)
    if graph is None:
        raise ModelLoadError(
            f"model '{model.name}' ({type(model).__name__}) has no layer graph: {purpose} "
            "needs a Functional model or a Sequential model with a known input shape"
        )
    return graph


def call_operation(operation: Any, args: tuple, kwargs: dict) -> Any:
    """The default hook: call the operation as recorded."""
    return operation(*args, **kwargs)


def run_nodes(nodes: Iterable[GraphNode], values: dict[int, Any], call: Call = call_operation) -> dict[int, Any]:
    """Call each node whose inputs have values, in order, through `call`; record its outputs.

    Args:
        nodes: Nodes in topological order (input layers' nodes are skipped).
        values: id(recorded tensor) → its value; updated with every output computed.
        call: The hook each call goes through.

    Returns:
        `values`, updated.
    """
    for node in nodes:
        if node.is_input or any(id(x) not in values for x in node.inputs):
            continue  # not reachable from the given tensors
        args, kwargs = node.arguments(values)
        outputs = keras.tree.flatten(call(node.operation, args, kwargs))
        values.update(zip(map(id, node.outputs), outputs))
    return values


def run_graph(model: Any, inputs: Sequence[Any], call: Call = call_operation) -> list:
    """Run a graph model op by op on `inputs` (one per model input); its outputs, flat.

    Raises:
        ModelLoadError: The model has no layer graph.
    """
    graph = require_graph(model, "running it op by op")
    values = run_nodes(graph.nodes, {id(x): value for x, value in zip(graph.inputs, inputs)}, call)
    return [values[id(x)] for x in graph.outputs]


def nested_layers(model: Any) -> list:
    """Every layer of a model, those of nested models included (after the nested model itself)."""
    found = []
    for layer in getattr(model, "layers", ()):
        found.append(layer)
        found.extend(nested_layers(layer))
    return found
