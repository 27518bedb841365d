"""Early exits: internal classifiers that answer confident inputs early (Shallow-Deep Networks).

An exit point is a tensor of the model's top-level graph that every path from the
input to the output goes through (`exit_points`): cut there, the network is a first
part and a rest. A head (`exit_head`: average pooling to a coarse grid beside a
global max pooling, one hidden dense layer, the class logits) answers from that
tensor. `insert_exits` rebuilds the model as nested `ExitBranch` layers
(`compressor.layers.early_exit`): the first part, then at each exit point the head
and, when it is not confident enough, the rest. The layers are copies of the
model's (same names and weights); the model itself is not changed.

Only single-input, single-output graph models without shared layers have exit points,
and only feature maps (batch, steps, channels) or (batch, height, width, channels) are offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import keras
from compressor.errors import CompressorError
from compressor.graph.clone import copy_layer
from compressor.graph.walk import require_graph, run_nodes
from compressor.layers.early_exit import CLOSED, ExitBranch, exit_layers

EXIT_TARGETS = (0.25, 0.5, 0.75)
"""Where exits are placed by default: the exit points nearest these fractions of the model's FLOPs."""

MAX_FRACTION = 0.95
"""Exit points after this fraction of the FLOPs are not offered: an exit there would save nothing."""

GRID = 4
"""A head pools its feature map to at most this many cells per spatial axis (`pooled_features`)."""

SAME_POINT = 0.005
"""Consecutive exit points closer than this fraction of the FLOPs are one: the later is offered."""


@dataclass(frozen=True)
class ExitPoint:
    """A tensor the whole network goes through.

    Attributes:
        name: The layer that outputs it.
        index: Its node's position in the graph's topological order.
        shape: Its shape without the batch axis.
        flops: FLOPs at batch 1 of everything up to and including that layer.
        fraction: `flops` as a fraction of the model's.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    flops: int
    fraction: float


def exit_points(model: keras.Model) -> list[ExitPoint]:
    """The model's exit points, input to output (module docstring): none for a model that has none."""
    from compressor.graph.cost import model_cost

    graph = require_graph(model, "early exits")
    nodes = list(graph.nodes)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return []
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    if any(count > 1 for count in calls.values()):
        return []  # a shared layer may sit on both sides of a cut
    position = {id(t): i for i, node in enumerate(nodes) for t in node.outputs}
    last_use = {key: index for key, index in position.items()}
    for i, node in enumerate(nodes):
        for t in node.inputs:
            last_use[id(t)] = max(last_use.get(id(t), i), i)
    for t in graph.outputs:
        last_use[id(t)] = len(nodes)
    rows: dict[str, int] = {}
    for row in model_cost(model).layers:
        top = row.name.split("/", 1)[0]
        rows[top] = rows.get(top, 0) + row.flops
    total = max(sum(rows.values()), 1)
    points, done = [], 0
    for i, node in enumerate(nodes):
        done += rows.get(node.operation.name, 0)
        crossing = [key for key, start in position.items() if start <= i < last_use[key]]
        if node.is_input or len(crossing) != 1 or len(node.outputs) != 1 or id(node.outputs[0]) != crossing[0]:
            continue
        shape = tuple(node.outputs[0].shape[1:])
        if len(shape) not in (2, 3) or any(d is None for d in shape) or done / total > MAX_FRACTION:
            continue
        points.append(ExitPoint(node.operation.name, i, shape, done, done / total))
    # Of two points a cheap elementwise layer apart (an Add and the ReLU after it), the later one.
    return [p for p, after in zip(points, points[1:] + [None])
            if after is None or after.index != p.index + 1 or after.fraction - p.fraction > SAME_POINT]


def choose_points(points: Sequence[ExitPoint], targets: Sequence[float] = EXIT_TARGETS) -> list[ExitPoint]:
    """The exit points nearest each target fraction of the FLOPs, once each, in graph order."""
    chosen: dict[str, ExitPoint] = {}
    for target in targets:
        if points:
            nearest = min(points, key=lambda p: abs(p.fraction - target))
            chosen[nearest.name] = nearest
    return sorted(chosen.values(), key=lambda p: p.index)


def exit_head(point: ExitPoint, classes: int, hidden: int, name: str, grid: int = GRID) -> keras.Model:
    """A head on an exit point: `pooled_features` (at most `grid` cells a side) → Dense(hidden, relu) → Dense(classes) logits."""
    features = keras.Input(shape=point.shape, name=f"{name}_input")
    pooled = pooled_features(features, name, grid)
    hidden_out = keras.layers.Dense(hidden, activation="relu", name=f"{name}_hidden")(pooled)
    logits = keras.layers.Dense(classes, name=f"{name}_logits")(hidden_out)
    return keras.Model(features, logits, name=name)


def pooled_features(tensor: Any, name: str = "exit_head", grid: int = GRID) -> Any:
    """What `exit_head` computes before its dense layers, on a symbolic feature map.

    Average pooling to a grid of at most `grid` cells per spatial axis (windows of
    ceil(size / grid), valid padding), flattened, beside a global max pooling: where
    in the image a feature fires matters early in the network, where a global average
    (`grid` 1) leaves a head on the first stage far less accurate (`benchmarks/exit_heads.md`).
    """
    spatial = tuple(int(d) for d in tensor.shape[1:-1])
    window = tuple(-(-d // grid) for d in spatial)
    average, maximum = {1: (keras.layers.AveragePooling1D, keras.layers.GlobalMaxPooling1D),
                        2: (keras.layers.AveragePooling2D, keras.layers.GlobalMaxPooling2D)}[len(spatial)]
    grid = keras.layers.Flatten(name=f"{name}_grid")(average(window, window, name=f"{name}_avg")(tensor))
    return keras.layers.Concatenate(name=f"{name}_pool")([grid, maximum(name=f"{name}_max")(tensor)])


def insert_exits(model: keras.Model, points: Sequence[ExitPoint], heads: Sequence[keras.Model],
                 probabilities: bool) -> keras.Model:
    """A copy of `model` with an exit at each point (module docstring), every exit closed.

    Args:
        model: A graph model with these exit points; it is not changed.
        points: Exit points of `model` (`exit_points`), in graph order.
        heads: One head per point (`exit_head`), used as they are (not copied).
        probabilities: Whether the model outputs probabilities (`ExitBranch`).

    Returns:
        A Functional model named as `model`: the layers up to the first point, then an
        `ExitBranch` named `<point>_exit` whose `rest` (`<point>_rest`) holds the next.

    Raises:
        CompressorError: No point, or a point the model does not have.
    """
    graph = require_graph(model, "early exits")
    nodes = list(graph.nodes)
    if not points:
        raise CompressorError(f"model '{model.name}' gets no exit: no exit point given")
    names = {node.operation.name: i for i, node in enumerate(nodes)}
    missing = [p.name for p in points if names.get(p.name) != p.index]
    if missing:
        raise CompressorError(f"model '{model.name}' has no exit point {', '.join(missing)}")
    copies: dict[int, Any] = {}

    def call_copy(operation: Any, args: tuple, kwargs: dict) -> Any:
        if id(operation) not in copies:
            copies[id(operation)] = copy_layer(operation)
        return copies[id(operation)](*args, **kwargs)

    def part(start: int, end: int, source: Any, first: Any) -> Any:
        """Run nodes start..end (inclusive) from `first` as the value of `source`; their values."""
        return run_nodes(nodes[start : end + 1], {id(source): first}, call_copy)

    cut = [nodes[p.index].outputs[0] for p in points]
    output = graph.outputs[0]
    branch = None
    for k in range(len(points) - 1, -1, -1):
        start = keras.Input(shape=points[k].shape, dtype=cut[k].dtype, name=f"{points[k].name}_rest_input")
        end = points[k + 1].index if k + 1 < len(points) else len(nodes) - 1
        values = part(points[k].index + 1, end, cut[k], start)
        out = branch(values[id(cut[k + 1])]) if branch is not None else values[id(output)]
        rest = keras.Model(start, out, name=f"{points[k].name}_rest")
        branch = ExitBranch(heads[k], rest, probabilities, CLOSED, name=f"{points[k].name}_exit")
    x = keras.Input(batch_shape=graph.inputs[0].shape, dtype=graph.inputs[0].dtype, name=graph.inputs[0].name)
    values = part(0, points[0].index, graph.inputs[0], x)
    built = keras.Model(x, branch(values[id(cut[0])]), name=model.name)
    for node in nodes:
        copy = copies.get(id(node.operation))
        if copy is not None:
            copy.set_weights(node.operation.get_weights())
    return built


def set_thresholds(model: keras.Model, thresholds: Sequence[float]) -> None:
    """Set each exit's threshold, first to last (CLOSED: the exit never answers)."""
    branches = exit_layers(model)
    if len(thresholds) != len(branches):
        raise CompressorError(f"{len(thresholds)} thresholds for {len(branches)} exits")
    for branch, value in zip(branches, thresholds):
        branch.threshold.assign(float(value))
