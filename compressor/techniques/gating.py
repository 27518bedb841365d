"""Dynamic gating: a learned per-input decision to skip a residual block (SkipNet).

A residual block is a branch that rejoins its own input through an `Add` of two
tensors of the same shape: `y = x + f(x)`. `insert_gates` finds these blocks in a
graph model and replaces each `Add` (with its branch `f`) by a `SkipGate` on `x` and a
`GatedResidual([x, logit])` holding `f` as a nested model (`compressor.layers.gating`
describes both); `remove_gates` puts the branches of some blocks back as they were.
Both clone the model with `compressor.graph.clone.clone_graph`: a call hook wires the
gated block at each block's `Add` and leaves the branch's own calls out of the outer
graph. A block whose gate is shut for (nearly) every input is better removed than
gated (`remove_shut_blocks`: no gate, no branch, no conditional op left).

The block's other layers (a ReLU after the `Add`, a projection shortcut) stay outside:
only identity-shortcut blocks can be skipped, since skipping must return the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import keras
import numpy as np

from compressor.errors import CompressorError
from compressor.graph.clone import clone_graph, copy_layer
from compressor.graph.keras_api import GraphNode
from compressor.graph.walk import graph_of, run_nodes
from compressor.layers.gating import GatedResidual, SkipGate, gate_layers


@dataclass(frozen=True)
class ResidualBlock:
    """A branch that rejoins its input through an Add.

    Attributes:
        add: Name of the Add layer.
        input: Name of the layer whose output is the block input `x`.
        layers: Names of the branch's layers, in topological order.
        shortcut: Which of the Add's two inputs is `x` (0 or 1).
    """

    add: str
    input: str
    layers: tuple[str, ...]
    shortcut: int = 0


def find_residual_blocks(model: keras.Model) -> list[ResidualBlock]:
    """The identity-shortcut residual blocks of a graph model's top level.

    A block is an `Add` of exactly two tensors of the same shape, `x` and `b`, where
    every path into `b` starts at `x`, and no tensor the branch computes is used
    outside it. Blocks inside nested models are not searched.

    Raises:
        CompressorError: The model has no layer graph.
    """
    nodes = _nodes(model)
    position = {id(node): i for i, node in enumerate(nodes)}
    producer = {id(t): node for node in nodes for t in node.outputs}
    consumers: dict[int, list[Any]] = {}
    for node in nodes:
        for t in node.inputs:
            consumers.setdefault(id(t), []).append(node)
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    blocks = []
    for node in nodes:
        if not isinstance(node.operation, keras.layers.Add) or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if tuple(a.shape) != tuple(b.shape):
            continue
        for shortcut, (x, y) in enumerate(((a, b), (b, a))):
            branch = _branch(x, y, producer, consumers, node, calls, position)
            if branch:
                names = tuple(n.operation.name for n in branch)
                blocks.append(ResidualBlock(node.operation.name, producer[id(x)].operation.name, names, shortcut))
                break
    return blocks


def _branch(x: Any, y: Any, producer: dict, consumers: dict, add: Any, calls: dict, position: dict) -> list[Any]:
    """The nodes between `x` and `y` (topological order) when they form a self-contained branch, else []."""
    inside: dict[int, Any] = {}
    stack = [y]
    while stack:
        t = stack.pop()
        if t is x:
            continue
        node = producer.get(id(t))
        if node is None or node.is_input:
            return []  # a path into the branch that does not start at x
        if id(node) in inside:
            continue
        inside[id(node)] = node
        stack.extend(node.inputs)
    if not inside:
        return []
    for node in inside.values():
        if calls[id(node.operation)] != 1 or len(node.outputs) != 1:
            return []  # a shared layer or a multi-output one: skipping it would change other calls
        for t in node.outputs:
            users = consumers.get(id(t), [])
            if t is y:
                if any(user is not add for user in users):
                    return []
            elif any(id(user) not in inside for user in users):
                return []
    return sorted(inside.values(), key=lambda node: position[id(node)])


def _nodes(model: keras.Model) -> list[GraphNode]:
    """The model's graph nodes in topological order (`compressor.graph.walk`).

    Raises:
        CompressorError: The model has no layer graph.
    """
    graph = graph_of(model)
    if graph is None:
        raise CompressorError(f"model '{model.name}' has no layer graph: gating needs a Functional or Sequential model")
    return list(graph.nodes)


def insert_gates(model: keras.Model, blocks: Optional[list[ResidualBlock]] = None) -> keras.Model:
    """A copy of `model` with a gate before each residual block (module docstring).

    Args:
        model: A graph model; it is not changed (its layers are copied).
        blocks: The blocks to gate; default: every block `find_residual_blocks` finds.

    Returns:
        A Functional model with the same inputs and outputs, whose gated blocks are
        `GatedResidual` layers named `<add>_gated`, each fed by a `SkipGate` named
        `<add>_gate`. All gates start open (the model computes what `model` does).

    Raises:
        CompressorError: The model has no layer graph or no residual block.
    """
    blocks = find_residual_blocks(model) if blocks is None else blocks
    if not blocks:
        raise CompressorError(f"model '{model.name}' has no residual block (a branch added back to its own input) to gate")
    nodes = _nodes(model)
    copies: dict[int, Any] = {}  # id(original layer) → its copy
    originals: list[Any] = []

    def clone_layer(layer: Any) -> Any:
        copies[id(layer)] = copy_layer(layer)
        originals.append(layer)
        return copies[id(layer)]

    by_add = {block.add: block for block in blocks}
    in_branch = {name for block in blocks for name in block.layers}

    def call_layer(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name in in_branch:
            # Called inside its block's branch model instead; nothing outside the branch reads this.
            return keras.tree.flatten((args, kwargs))[0]
        block = by_add.get(layer.name)
        if block is None:
            return layer(*args, **kwargs)
        return _gated(block, args[0][block.shortcut], nodes, copies)

    gated = clone_graph(model, clone_layer, call_layer, compiled=False, purpose="gating")
    for original in originals:
        if isinstance(original, keras.layers.Layer):
            copies[id(original)].set_weights(original.get_weights())
    return gated


def _gated(block: ResidualBlock, x: Any, nodes: list[GraphNode], copies: dict[int, Any]) -> Any:
    """The gated block on the block input `x`: its branch's layers (copies) as a nested model."""
    add = next(node for node in nodes if node.operation.name == block.add)
    members = [node for node in nodes if node.operation.name in set(block.layers)]
    x_old, y_old = add.inputs[block.shortcut], add.inputs[1 - block.shortcut]
    branch_input = keras.Input(batch_shape=x.shape, dtype=x.dtype, name=f"{block.add}_branch_input")

    def call_copy(operation: Any, args: tuple, kwargs: dict) -> Any:
        return copies[id(operation)](*args, **kwargs)

    inner = run_nodes(members, {id(x_old): branch_input}, call_copy)
    branch = keras.Model(branch_input, inner[id(y_old)], name=f"{block.add}_branch")
    logit = SkipGate(name=f"{block.add}_gate")(x)
    return GatedResidual(branch, name=f"{block.add}_gated")([x, logit])


def remove_gates(gated: keras.Model, keep: set[str]) -> keras.Model:
    """The gated model without the gates of blocks not in `keep` (Add names): those blocks always run.

    Their branch layers go back into the graph as they are (same layer objects, same
    weights) and are added to the block input by a plain `Add` named like the original.
    """

    def call_layer(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, SkipGate) and layer.name.removesuffix("_gate") not in keep:
            return args[0]  # its logit feeds only its block, which is rebuilt without it
        if isinstance(layer, GatedResidual) and layer.block_name not in keep:
            return _ungated(layer, args[0][0])
        return layer(*args, **kwargs)

    return clone_graph(gated, lambda layer: layer, call_layer, compiled=False, purpose="gating")


def remove_shut_blocks(gated: keras.Model, names: set[str]) -> keras.Model:
    """The gated model without the blocks in `names` (Add names), gate and branch: what a gate shut for every input computes.

    The kept layers are the gated model's own (same objects, as `remove_gates`).
    """

    def call_layer(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, SkipGate) and layer.name.removesuffix("_gate") in names:
            return args[0]  # its logit feeds only its block, which goes
        if isinstance(layer, GatedResidual) and layer.block_name in names:
            return args[0][0]
        return layer(*args, **kwargs)

    return clone_graph(gated, lambda layer: layer, call_layer, compiled=False, purpose="gating")


def _ungated(block: GatedResidual, x: Any) -> Any:
    """`x + branch(x)` with the branch's layers called in the outer graph."""
    graph = graph_of(block.branch)
    inner = run_nodes(graph.nodes, {id(graph.inputs[0]): x})
    return keras.layers.Add(name=block.block_name)([x, inner[id(graph.outputs[0])]])


def gated_blocks(model: keras.Model) -> list[str]:
    """The Add names of a gated model's gated blocks, in graph order."""
    return [block.block_name for _, block in gate_layers(model)]


def gate_tensors(model: keras.Model) -> list[tuple[Any, Any]]:
    """(input, logit) tensors of each gate in `model`'s own graph, in `gate_layers` order.

    Not `gate.input`/`gate.output`: a gate kept by `remove_gates` has been called in two
    graphs, and those attributes name the first one's tensors.
    """
    found = {
        node.operation.name: (node.inputs[0], node.outputs[0])
        for node in _nodes(model)
        if isinstance(node.operation, SkipGate)
    }
    return [found[gate.name] for gate, _ in gate_layers(model)]


def set_offsets(model: keras.Model, offset: float | list[float]) -> None:
    """Set every gate's offset (one value, or one per gate): +OPEN forces open, -OPEN shut."""
    pairs = gate_layers(model)
    offsets = offset if isinstance(offset, (list, tuple, np.ndarray)) else [offset] * len(pairs)
    for (gate, _), value in zip(pairs, offsets):
        gate.offset.assign(float(value))
