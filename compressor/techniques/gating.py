"""Dynamic gating: a learned per-input decision to skip a residual block (SkipNet).

A residual block is a branch that rejoins its own input through an `Add` of two
tensors of the same shape: `y = x + f(x)`. `insert_gates` finds these blocks in a
graph model and replaces each `Add` (with its branch `f`) by two layers:

- `SkipGate`: global average pooling of `x`, one tiny dense layer, one logit. The
  block runs when `logit + offset > 0`; `offset` (a non-trainable weight) moves every
  decision at once and forces a gate open (+inf) or shut (-inf).
- `GatedResidual([x, logit])`: holds `f` as a nested model. At a static batch of 1
  (how the artifacts are exported) it is `keras.ops.cond(open, x + f(x), x)`, so the
  branch's work is really skipped: TFLite gets an `IF` op and ONNX an `If` node. At
  other batch sizes every sample's branch is computed and multiplied by its 0/1
  decision, which gives the same outputs. The decision is hard in the forward pass;
  gradients reach the gate through its probability (straight-through estimator).

Both layers are registered Keras objects: a gated `.keras` file loads wherever this
module has been imported (`compressor.io.models.load_model` does it).

The block's other layers (a ReLU after the `Add`, a projection shortcut) stay outside:
only identity-shortcut blocks can be skipped, since skipping must return the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import keras
import numpy as np
from keras import ops

from compressor.errors import CompressorError

OPEN = 1e9
"""An offset that forces a gate open; -OPEN forces it shut."""

GATE_BIAS = 3.0
"""Initial gate bias: sigmoid(3) = 0.95, so a new gate runs its block and the model is unchanged."""


@keras.saving.register_keras_serializable(package="compressor")
class SkipGate(keras.layers.Layer):
    """Global average pooling → standardization → Dense(1): the logit of running a residual block.

    The pooled features are standardized with a fixed mean and scale per channel
    (`standardize`, from data) so that the dense layer sees features that differ
    from input to input on one scale, and its decision can depend on the input.

    Args:
        offset: Added to the logit; the block runs when `logit + offset > 0`.
    """

    def __init__(self, offset: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial_offset = float(offset)

    def build(self, input_shape: tuple) -> None:
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(channels, 1), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(1,), initializer=keras.initializers.Constant(GATE_BIAS))
        self.offset = self.add_weight(
            name="offset", shape=(), initializer=keras.initializers.Constant(self.initial_offset), trainable=False
        )
        self.mean = self.add_weight(name="mean", shape=(channels,), initializer="zeros", trainable=False)
        self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones", trainable=False)

    def call(self, x: Any) -> Any:
        return ops.matmul((self.pooled(x) - self.mean) * self.scale, self.kernel) + self.bias + self.offset

    @staticmethod
    def pooled(x: Any) -> Any:
        """Global average pooling over every axis between batch and channels."""
        axes = tuple(range(1, len(x.shape) - 1))
        return ops.mean(x, axis=axes) if axes else x

    def standardize(self, pooled: np.ndarray) -> None:
        """Set the mean and scale from pooled features of real inputs, (samples, channels)."""
        self.mean.assign(pooled.mean(axis=0))
        self.scale.assign(1.0 / (pooled.std(axis=0) + 1e-3))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "offset": self.initial_offset}


@keras.saving.register_keras_serializable(package="compressor")
class GatedResidual(keras.layers.Layer):
    """`x + branch(x)` when the gate is open, `x` when it is shut (module docstring).

    Args:
        branch: A graph model from `x` to the branch output (same shape as `x`).
    """

    def __init__(self, branch: keras.Model, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.branch = branch

    @property
    def block_name(self) -> str:
        """The name of the Add this block replaced (`<add>_gated` without the suffix)."""
        return self.name.removesuffix("_gated")

    @property
    def gated_branch(self) -> keras.Model:
        """The branch model (cost analysis walks into it)."""
        return self.branch

    def build(self, input_shape: Any) -> None:
        if not self.branch.built:
            self.branch.build(input_shape[0])

    def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
        x, logit = inputs
        if x.shape[0] == 1:
            return ops.cond(logit[0, 0] > 0, lambda: x + self.branch(x, training=training), lambda: x)
        probability = ops.sigmoid(logit)
        hard = ops.cast(logit > 0, x.dtype)
        # Straight-through: the forward pass uses the 0/1 decision, the backward pass its probability.
        decision = probability + ops.stop_gradient(hard - probability)
        decision = ops.reshape(decision, (-1,) + (1,) * (len(x.shape) - 1))
        return x + decision * self.branch(x, training=training)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "branch": keras.saving.serialize_keras_object(self.branch)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GatedResidual":
        config = dict(config)
        config["branch"] = keras.saving.deserialize_keras_object(config["branch"])
        return cls(**config)


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


def _nodes(model: keras.Model) -> list[Any]:
    """The model's graph nodes in topological order (`compressor.graph.calls.graph_nodes`).

    Raises:
        CompressorError: The model has no layer graph.
    """
    from compressor.graph.calls import graph_nodes

    nodes = graph_nodes(model)
    if nodes is None:
        raise CompressorError(f"model '{model.name}' has no layer graph: gating needs a Functional or Sequential model")
    return nodes


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
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    by_add = {block.add: block for block in blocks}
    in_branch = {name for block in blocks for name in block.layers}
    nodes = _nodes(copy)
    values: dict[int, Any] = {}
    inputs = []
    for node in nodes:
        name = node.operation.name
        if node.is_input:
            tensor = keras.Input(batch_shape=node.outputs[0].shape, dtype=node.outputs[0].dtype, name=name)
            inputs.append(tensor)
            values[id(node.outputs[0])] = tensor
            continue
        if name in in_branch:
            continue
        block = by_add.get(name)
        if block is not None:
            outputs = [_gated(block, node, nodes, values)]
        else:
            outputs = node.call(values)
        values.update(zip(map(id, node.outputs), outputs))
    graph_outputs = [values[id(t)] for t in copy.outputs]
    # One input or output as a tensor, not a list: Keras warns when a list-input model is called on a tensor.
    return keras.Model(_one_or_list(inputs), _one_or_list(graph_outputs), name=model.name)


def _one_or_list(tensors: list[Any]) -> Any:
    return tensors[0] if len(tensors) == 1 else tensors


def _gated(block: ResidualBlock, add: _GraphNode, nodes: list[_GraphNode], values: dict[int, Any]) -> Any:
    members = [node for node in nodes if node.operation.name in set(block.layers)]
    x_old, y_old = add.inputs[block.shortcut], add.inputs[1 - block.shortcut]
    x = values[id(x_old)]
    branch_input = keras.Input(batch_shape=x.shape, dtype=x.dtype, name=f"{block.add}_branch_input")
    inner = {id(x_old): branch_input}
    for node in members:
        inner.update(zip(map(id, node.outputs), node.call(inner)))
    branch = keras.Model(branch_input, inner[id(y_old)], name=f"{block.add}_branch")
    logit = SkipGate(name=f"{block.add}_gate")(x)
    return GatedResidual(branch, name=f"{block.add}_gated")([x, logit])


def remove_gates(gated: keras.Model, keep: set[str]) -> keras.Model:
    """The gated model without the gates of blocks not in `keep` (Add names): those blocks always run.

    Their branch layers go back into the graph as they are (same layer objects, same
    weights) and are added to the block input by a plain `Add` named like the original.
    """
    nodes = _nodes(gated)
    values: dict[int, Any] = {}
    inputs = []
    for node in nodes:
        operation = node.operation
        if node.is_input:
            tensor = keras.Input(batch_shape=node.outputs[0].shape, dtype=node.outputs[0].dtype, name=operation.name)
            inputs.append(tensor)
            values[id(node.outputs[0])] = tensor
            continue
        if isinstance(operation, SkipGate) and operation.name.removesuffix("_gate") not in keep:
            continue  # its logit feeds only its block, which is rebuilt without it
        if isinstance(operation, GatedResidual) and operation.block_name not in keep:
            outputs = [_ungated(operation, values[id(node.inputs[0])])]
        else:
            outputs = node.call(values)
        values.update(zip(map(id, node.outputs), outputs))
    graph_outputs = [values[id(t)] for t in gated.outputs]
    return keras.Model(_one_or_list(inputs), _one_or_list(graph_outputs), name=gated.name)


def _ungated(block: GatedResidual, x: Any) -> Any:
    """`x + branch(x)` with the branch's layers called in the outer graph."""
    nodes = _nodes(block.branch)
    inner: dict[int, Any] = {}
    for node in nodes:
        if node.is_input:
            inner[id(node.outputs[0])] = x
            continue
        inner.update(zip(map(id, node.outputs), node.call(inner)))
    return keras.layers.Add(name=block.block_name)([x, inner[id(block.branch.outputs[0])]])


def gated_blocks(model: keras.Model) -> list[str]:
    """The Add names of a gated model's gated blocks, in graph order."""
    return [block.block_name for _, block in gate_layers(model)]


def gate_layers(model: keras.Model) -> list[tuple[SkipGate, GatedResidual]]:
    """(gate, gated block) pairs of a gated model, in graph order."""
    gates = {layer.name: layer for layer in model.layers if isinstance(layer, SkipGate)}
    pairs = []
    for layer in model.layers:
        if isinstance(layer, GatedResidual):
            pairs.append((gates[layer.block_name + "_gate"], layer))
    return pairs


def gate_tensors(model: keras.Model) -> list[tuple[Any, Any]]:
    """(input, logit) tensors of each gate in `model`'s own graph, in `gate_layers` order.

    Not `gate.input`/`gate.output`: a gate kept by `remove_gates` has been called in two
    graphs, and those attributes name the first one's tensors.
    """
    found = {node.operation.name: (node.inputs[0], node.outputs[0]) for node in _nodes(model) if isinstance(node.operation, SkipGate)}
    return [found[gate.name] for gate, _ in gate_layers(model)]


def set_offsets(model: keras.Model, offset: float | list[float]) -> None:
    """Set every gate's offset (one value, or one per gate): +OPEN forces open, -OPEN shut."""
    pairs = gate_layers(model)
    offsets = offset if isinstance(offset, (list, tuple, np.ndarray)) else [offset] * len(pairs)
    for (gate, _), value in zip(pairs, offsets):
        gate.offset.assign(float(value))


def is_gated(model: keras.Model) -> bool:
    """Whether the model holds any gated residual block."""
    return any(isinstance(layer, GatedResidual) for layer in model.layers)
