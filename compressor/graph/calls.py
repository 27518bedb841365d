"""Every layer call of a Keras graph model, with the shapes it sees.

Functional and Sequential models record each `__call__` of a layer as a node whose
input and output KerasTensors carry shapes. `layer_calls` walks those nodes in
topological order, steps into nested graph models (naming their layers
`outer/inner`), and yields one `LayerCall` per call, so a shared layer appears once
per call. Keras has no public API for the nodes of a graph; all private-API use is
in `_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import keras

from compressor.errors import ModelLoadError

Shape = tuple[Optional[int], ...]


@dataclass(frozen=True)
class LayerCall:
    """One call of a layer (or keras.ops operation) inside a model.

    Attributes:
        path: Qualified name: `layer`, or `outer/inner/layer` inside nested models.
        operation: The layer (or operation) that was called.
        input_shapes: Shapes of its tensor inputs, batch first (None when free).
        output_shapes: Shapes of its outputs, batch first.
    """

    path: str
    operation: Any
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class _Node:
    operation: Any
    inputs: tuple[Any, ...]  # KerasTensors as recorded when the graph was built
    outputs: tuple[Any, ...]
    is_input: bool
    infer: Callable[[dict], list]  # output specs for other input specs (id -> spec)
    call: Callable[[dict], list]  # calls the operation again on other tensors (id -> tensor): its outputs


@dataclass(frozen=True)
class _Graph:
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    nodes: tuple[_Node, ...]  # topological order


def layer_calls(model: keras.Model, input_shapes: Optional[Sequence[Shape]] = None) -> list[LayerCall]:
    """List every leaf-layer call of a graph model, nested models flattened.

    Args:
        model: A Functional model or a built Sequential model.
        input_shapes: Per-input shapes without the batch axis, to analyse the model
            at another input size (e.g. to fix free spatial dimensions). Default:
            the shapes the model was built with.

    Returns:
        The calls in topological order; the top-level input layers come first.

    Raises:
        ModelLoadError: The model has no graph (subclassed or unbuilt), or
            `input_shapes` does not match its inputs.
    """
    graph = _graph(model)
    if graph is None:
        raise ModelLoadError(
            f"model '{model.name}' ({type(model).__name__}) has no layer graph: cost analysis "
            "needs a Functional model or a Sequential model with a known input shape"
        )
    specs = list(graph.inputs) if input_shapes is None else _input_specs(graph, input_shapes)
    calls: list[LayerCall] = []
    _walk(graph, specs, "", calls)
    return calls


def _input_specs(graph: _Graph, input_shapes: Sequence[Shape]) -> list:
    if len(input_shapes) != len(graph.inputs):
        raise ModelLoadError(
            f"the model has {len(graph.inputs)} input(s); got {len(input_shapes)} input shape(s)"
        )
    specs = []
    for tensor, shape in zip(graph.inputs, input_shapes):
        if len(shape) != len(tensor.shape) - 1:
            raise ModelLoadError(
                f"input '{tensor.name}' has shape {tuple(tensor.shape)}; "
                f"got per-sample shape {tuple(shape)} of another rank"
            )
        specs.append(keras.KerasTensor((tensor.shape[0], *shape), dtype=tensor.dtype))
    return specs


def _walk(graph: _Graph, input_specs: list, prefix: str, calls: list[LayerCall]) -> list:
    """Append the calls of `graph` to `calls`; return the specs of its outputs."""
    values = {id(x): spec for x, spec in zip(graph.inputs, input_specs)}
    for node in graph.nodes:
        if node.is_input:
            if not prefix:  # nested models' input layers only rename the outer tensor
                outputs = [values.get(id(x), x) for x in node.outputs]
                calls.append(LayerCall(node.operation.name, node.operation, (), _shapes(outputs)))
            continue
        if any(id(x) not in values for x in node.inputs):
            continue  # not reachable from these inputs
        inputs = [values[id(x)] for x in node.inputs]
        inner = _graph(node.operation) if isinstance(node.operation, keras.Model) else None
        branch = getattr(node.operation, "gated_branch", None)
        if inner is not None:
            outputs = _walk(inner, inputs, f"{prefix}{node.operation.name}/", calls)
        elif branch is not None:
            # A gated residual block: its branch's layers, then the block itself (the Add).
            _walk(_graph(branch), inputs[:1], f"{prefix}{node.operation.name}/", calls)
            outputs = list(node.outputs)
            calls.append(LayerCall(prefix + node.operation.name, node.operation, _shapes(inputs), _shapes(outputs)))
        else:
            same = all(a.shape == b.shape for a, b in zip(inputs, node.inputs))
            outputs = list(node.outputs) if same else node.infer(values)
            calls.append(LayerCall(prefix + node.operation.name, node.operation, _shapes(inputs), _shapes(outputs)))
        values.update(zip(map(id, node.outputs), outputs))
    return [values[id(x)] for x in graph.outputs]


def _shapes(tensors: Sequence[Any]) -> tuple[Shape, ...]:
    return tuple(tuple(t.shape) for t in tensors)


def _graph(model: Any) -> Optional[_Graph]:
    """The nodes of a Functional or built Sequential model; None for anything else.

    Private Keras API used here (keras 3.x): `Sequential._functional`,
    `Function._nodes_by_depth`, `Node.arguments.fill_in`, `Node.is_input`.
    """
    from keras.src import tree
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        model = getattr(model, "_functional", None)
    if not isinstance(model, Functional):
        return None
    order = {id(op): i for i, op in enumerate(model.operations)}
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in sorted(model._nodes_by_depth[depth], key=lambda n: order.get(id(n.operation), -1)):
            if node.operation is None:
                continue
            nodes.append(
                _Node(
                    operation=node.operation,
                    inputs=tuple(node.input_tensors),
                    outputs=tuple(node.outputs),
                    is_input=node.is_input,
                    infer=_inferrer(node, tree),
                    call=_caller(node, tree),
                )
            )
    return _Graph(tuple(model.inputs), tuple(model.outputs), tuple(nodes))


def graph_nodes(model: Any) -> Optional[list[_Node]]:
    """The nodes of a Functional or built Sequential model in topological order; None for others.

    Each node's `call(values)` calls its operation again on the tensors `values` maps
    its recorded inputs to (by id): how a graph is rebuilt with some nodes replaced.
    """
    graph = _graph(model)
    return None if graph is None else list(graph.nodes)


def _caller(node: Any, tree: Any) -> Callable[[dict], list]:
    def call(values: dict) -> list:
        args, kwargs = node.arguments.fill_in(values)
        return tree.flatten(node.operation(*args, **kwargs))

    return call


def _inferrer(node: Any, tree: Any) -> Callable[[dict], list]:
    def infer(values: dict) -> list:
        args, kwargs = node.arguments.fill_in(values)
        return tree.flatten(node.operation.compute_output_spec(*args, **kwargs))

    return infer

