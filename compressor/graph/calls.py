"""Every layer call of a Keras graph model, with the shapes it sees.

Functional and Sequential models record each `__call__` of a layer as a node whose
input and output KerasTensors carry shapes. `layer_calls` walks those nodes in
topological order, steps into nested graph models (naming their layers
`outer/inner`), and yields one `LayerCall` per call, so a shared layer appears once
per call. The nodes come from `compressor.graph.walk`, the package's one node walker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import keras

from compressor.errors import ModelLoadError
from compressor.graph.walk import Graph, graph_of, require_graph

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
    graph = require_graph(model, "cost analysis")
    specs = list(graph.inputs) if input_shapes is None else _input_specs(graph, input_shapes)
    calls: list[LayerCall] = []
    _walk(graph, specs, "", calls)
    return calls


def _input_specs(graph: Graph, input_shapes: Sequence[Shape]) -> list:
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


def _walk(graph: Graph, input_specs: list, prefix: str, calls: list[LayerCall]) -> list:
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
        inner = graph_of(node.operation) if isinstance(node.operation, keras.Model) else None
        branch = getattr(node.operation, "gated_branch", None)
        exits = getattr(node.operation, "exit_parts", None)
        if inner is not None:
            outputs = _walk(inner, inputs, f"{prefix}{node.operation.name}/", calls)
        elif branch is not None:
            # A gated residual block: its branch's layers, then the block itself (the Add).
            _walk(require_graph(branch, "cost analysis"), inputs[:1], f"{prefix}{node.operation.name}/", calls)
            outputs = list(node.outputs)
            calls.append(LayerCall(prefix + node.operation.name, node.operation, _shapes(inputs), _shapes(outputs)))
        elif exits is not None:
            # An early exit: its head and the rest of the network, every layer counted once (at most one runs).
            for part in exits:
                _walk(require_graph(part, "cost analysis"), inputs[:1], f"{prefix}{node.operation.name}/", calls)
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
