"""Channel dependency groups: the channels of a Keras graph model that must go together.

Removing output channel i of a convolution also removes row i of every kernel that
reads it, the i-th BatchNormalization statistic on the way, and — through an `Add` —
channel i of every other tensor added to it. `channel_groups` finds these sets the way
Torch-Pruning's dependency graph does, with a union-find over channel "atoms":

- Every position of a tensor's last (channel) axis holds an atom. A producer (ConvND,
  Dense, SeparableConvND's pointwise part, ConvNDTranspose) creates one atom per output
  channel; model inputs and the outputs of layers we cannot see through get "fixed"
  atoms, which can never be removed.
- Per-channel layers pass their input's atoms through: BatchNormalization,
  DepthwiseConvND (output c·m + j carries input atom c), PReLU, activations, dropout
  and noise, pooling, padding/cropping/upsampling, scalar Rescaling, and a Reshape that
  keeps the channel axis last. Flatten tiles them: output p·C + c carries atom c.
- Add/Subtract/Multiply/Average/Maximum/Minimum unite the atoms position by position
  (an input of width 1 broadcasts and is ignored); Concatenate on the channel axis
  lays its inputs' atoms side by side (on another axis it unites them like Add).
- Any other layer (LayerNormalization, softmax over channels, Permute, Lambda,
  keras.ops nodes, nested models, grouped convolutions, layers with weights we cannot
  slice) blocks the atoms it reads, and its output is fixed. Atoms that reach a model
  output are blocked too. (The rules are in `compressor.graph.channel_rules`.)

A group is a connected set of producers whose output channels were united; channel k
of the group is one union-find class. A group is prunable unless one of its atoms is
blocked. A layer called several times has one set of atoms, and the inputs of all its
calls are united, since its kernel is sliced once for all of them.

`analyze_channels` returns the groups together with every tensor's atoms, which
`compressor.surgery.channels` needs to slice the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np

from compressor.graph.channel_rules import CHANNEL_SOFTMAX, PRODUCERS, activation_name, opaque_reason
from compressor.graph.flops import DEPTHWISE, MERGE
from compressor.graph.walk import require_graph

L = keras.layers


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        name: Stable id: the name of the group's first producer in graph order.
        size: Number of group channels k = 0 .. size-1.
        producers: Layers whose output channels belong to the group, in graph order.
        consumers: Layers whose kernel input axis is sliced when a group channel goes.
        passthrough: Per-channel layers sliced along (BatchNormalization,
            DepthwiseConvND, PReLU with per-channel alpha, Reshape keeping the channel axis).
        indices: Producer name → int array (size,): that producer's output index of
            group channel k, -1 when channel k is not among its outputs.
        prunable: False when some of the channels cannot go (see `reason`).
        reason: Why the group must stay whole, naming the layer; None when prunable.
        input_indices: Consumer or pass-through layer name → int array over that
            layer's input channel axis: the group channel at each position, -1 where
            the position belongs to another group or cannot be removed.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...]
    indices: Mapping[str, np.ndarray] = field(compare=False, repr=False)
    prunable: bool
    reason: Optional[str]
    input_indices: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class SlicedLayer:
    """A layer whose weights or config depend on which channels it sees.

    Attributes:
        layer: The layer.
        input_atoms: Atoms of its input channel axis (all its calls united); None
            when the input has no known channel axis.
        output_atoms: Atoms of its output channel axis (first call).
    """

    layer: Any
    input_atoms: Optional[np.ndarray]
    output_atoms: Optional[np.ndarray]


@dataclass(frozen=True)
class TensorCall:
    """One top-level call in the graph, with the atoms of its tensors.

    Attributes:
        operation: The layer, keras.ops operation or nested model called.
        input_shapes, output_shapes: The shapes of its tensors, batch first.
        input_atoms, output_atoms: Atoms of each tensor's last axis (None: no channel axis).
    """

    operation: Any
    input_shapes: tuple[tuple, ...]
    output_shapes: tuple[tuple, ...]
    input_atoms: tuple[Optional[np.ndarray], ...]
    output_atoms: tuple[Optional[np.ndarray], ...]


@dataclass(frozen=True)
class ChannelAnalysis:
    """Everything channel pruning needs to know about a model's channels.

    Attributes:
        groups: The channel groups, ordered by their first producer.
        calls: Every top-level call (input layers excluded), in topological order.
        layers: Layer name → its atoms, for every layer sliced with its channels.
        roots: Atom → the atom representing its union-find class.
        classes: Group name → int array (size,): the class (root atom) of each group channel.
    """

    groups: tuple[ChannelGroup, ...]
    calls: tuple[TensorCall, ...]
    layers: Mapping[str, SlicedLayer]
    roots: np.ndarray
    classes: Mapping[str, np.ndarray]

    def removed_atoms(self, removals: Mapping[str, Sequence[int]]) -> np.ndarray:
        """Bool array over atoms: True for atoms of the removed group channels.

        Args:
            removals: Group name → group channel indices (already validated).
        """
        gone = [self.classes[name][list(channels)] for name, channels in removals.items() if len(channels)]
        if not gone:
            return np.zeros(len(self.roots), dtype=bool)
        return np.isin(self.roots, np.concatenate(gone))


def channel_groups(model: keras.Model) -> list[ChannelGroup]:
    """The channel dependency groups of a graph model.

    Args:
        model: A Functional model or a built Sequential model. Nested models are
            treated as opaque layers: their channels, and those they read, stay whole.

    Returns:
        One group per connected set of producers, ordered by first producer in graph order.

    Raises:
        ModelLoadError: The model has no layer graph (subclassed or unbuilt).
    """
    return list(analyze_channels(model).groups)


def analyze_channels(model: keras.Model) -> ChannelAnalysis:
    """The channel groups of a graph model, with the atoms of every tensor.

    Args:
        model: A Functional model or a built Sequential model.

    Returns:
        The analysis that `compressor.surgery.channels` slices layers with.

    Raises:
        ModelLoadError: The model has no layer graph (subclassed or unbuilt).
    """
    graph = require_graph(model, "channel analysis")
    walker = _Walker()
    for node in graph.nodes:
        walker.visit(node)
    walker.block_outputs(graph.outputs)
    return walker.finish()


class _UnionFind:
    """Union-find over atom ids; the smallest id of a class is its root."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, atom: int) -> int:
        parent = self.parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite a[i] with b[i] for every position i."""
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        return np.asarray([self.find(atom) for atom in range(len(self.parent))], dtype=np.int64)


class _Walker:
    """Gives every tensor its atoms, node by node, and records what ties or blocks them."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.events: list[tuple[int, str]] = []  # (atom, reason) of each block, in graph order
        self.atoms: dict[int, Optional[np.ndarray]] = {}  # id(tensor) → atoms of its last axis
        self.source: dict[int, str] = {}  # id(tensor) → name of the layer that made it
        self.producers: dict[str, np.ndarray] = {}  # producer → its output atoms, graph order
        self.sliced: dict[str, SlicedLayer] = {}
        self.calls: list[TensorCall] = []

    # --- atoms --------------------------------------------------------------------

    def atoms_of(self, tensor: Any) -> Optional[np.ndarray]:
        return self.atoms.get(id(tensor))

    def fixed(self, width: Optional[int], reason: str) -> Optional[np.ndarray]:
        """New atoms that can never be removed (pre-blocked with `reason`)."""
        if width is None:
            return None
        atoms = self.uf.add(width)
        self.block(atoms, reason)
        return atoms

    def block_outputs(self, outputs: Sequence[Any]) -> None:
        """Block the atoms of the model outputs; this reason comes first, being the plainest."""
        events, self.events = self.events, []
        for tensor in outputs:
            self.block(self.atoms_of(tensor), f"it feeds the model output '{self.source.get(id(tensor), '?')}'")
        self.events.extend(events)

    def block(self, atoms: Optional[np.ndarray], reason: str) -> None:
        if atoms is not None:
            self.events.extend((int(atom), reason) for atom in atoms)

    # --- nodes --------------------------------------------------------------------

    def visit(self, node: Any) -> None:
        operation = node.operation
        name = operation.name
        if node.is_input:
            reason = f"its channels are tied to those of the model input '{name}'"
            outputs = [self.fixed(_width(t), reason) for t in node.outputs]
        else:
            inputs = [self.atoms_of(t) for t in node.inputs]
            outputs = self._rule(node, inputs)
            self.calls.append(
                TensorCall(
                    operation=operation,
                    input_shapes=tuple(tuple(t.shape) for t in node.inputs),
                    output_shapes=tuple(tuple(t.shape) for t in node.outputs),
                    input_atoms=tuple(inputs),
                    output_atoms=tuple(outputs),
                )
            )
        for tensor, atoms in zip(node.outputs, outputs):
            self.atoms[id(tensor)] = atoms
            self.source[id(tensor)] = name
        known = self.sliced.get(name)
        if known is not None and known.layer is operation and known.output_atoms is None and outputs:
            self.sliced[name] = SlicedLayer(operation, known.input_atoms, outputs[0])

    def _rule(self, node: Any, inputs: list) -> list:
        """The output atoms of one call; records ties, blocks and sliced layers."""
        layer = node.operation
        why = opaque_reason(layer, node)
        if why is not None:
            return self._opaque(node, inputs, why)
        x, shape = inputs[0], tuple(node.inputs[0].shape)
        if isinstance(layer, PRODUCERS):
            self._record(layer, x)
            return [self._produce(layer, _width(node.outputs[0]))]
        if isinstance(layer, (L.Concatenate,) + MERGE):
            return [self._merge(layer, inputs, node)]
        if isinstance(layer, DEPTHWISE):
            self._record(layer, x)
            return [None if x is None else np.repeat(x, layer.depth_multiplier)]
        if isinstance(layer, (L.BatchNormalization, L.PReLU)):
            self._record(layer, x)
            return [x]
        if isinstance(layer, L.Reshape):
            self._record(layer, x)  # its target_shape names the channel count
        if isinstance(layer, (L.Flatten, L.Reshape)) and len(shape) > 2 and len(node.outputs[0].shape) == 2:
            # row-major flattening: output p·C + c is channel c at position p
            return [None if x is None else np.tile(x, math.prod(shape[1:-1]))]
        return [x]  # per-channel: the atoms pass through unchanged

    def _opaque(self, node: Any, inputs: list, why: str) -> list:
        layer = node.operation
        described = f"'{layer.name}' ({type(layer).__name__}), {why}"
        for atoms in inputs:
            self.block(atoms, f"it feeds {described}")
        reason = f"its channels are tied to the output of {described}"
        return [self.fixed(_width(t), reason) for t in node.outputs]

    def _record(self, layer: Any, atoms: Optional[np.ndarray]) -> None:
        """Remember a sliced layer's input atoms; a later call's are united with them."""
        known = self.sliced.get(layer.name)
        if known is None:
            self.sliced[layer.name] = SlicedLayer(layer, atoms, None)
        elif known.input_atoms is not None and atoms is not None:
            self.uf.union(known.input_atoms, atoms)

    def _produce(self, layer: Any, width: Optional[int]) -> Optional[np.ndarray]:
        """The output atoms of a producer: new on its first call, the same on later ones."""
        if layer.name in self.producers:
            return self.producers[layer.name]
        if width is None:
            return None
        atoms = self.uf.add(width)
        self.producers[layer.name] = atoms
        if getattr(layer, "activation", None) is not None and activation_name(layer) in CHANNEL_SOFTMAX:
            self.block(atoms, f"'{layer.name}' ({type(layer).__name__}) applies a softmax across its channels")
        return atoms

    def _merge(self, layer: Any, inputs: list, node: Any) -> Optional[np.ndarray]:
        width = _width(node.outputs[0])
        if any(atoms is None for atoms in inputs):
            for atoms in inputs:
                self.block(atoms, f"it feeds '{layer.name}' ({type(layer).__name__}) with inputs of unknown width")
            return self.fixed(width, f"its channels are tied to the output of '{layer.name}'")
        rank = len(node.outputs[0].shape)
        if isinstance(layer, L.Concatenate) and layer.axis % rank == rank - 1:
            return np.concatenate(inputs)
        wide = [atoms for atoms in inputs if len(atoms) == width]  # width-1 inputs broadcast
        if not wide:
            return self.fixed(width, f"its channels are tied to the output of '{layer.name}'")
        for atoms in wide[1:]:
            self.uf.union(wide[0], atoms)
        return wide[0]

    # --- groups -------------------------------------------------------------------

    def finish(self) -> ChannelAnalysis:
        sliced = dict(self.sliced)
        roots = self.uf.roots()
        groups, classes = _Grouper(self, roots, sliced).groups()
        return ChannelAnalysis(
            groups=tuple(groups),
            calls=tuple(self.calls),
            layers=MappingProxyType(sliced),
            roots=_frozen(roots),
            classes=MappingProxyType(classes),
        )


class _Grouper:
    """Turns the union-find classes into groups of producers."""

    def __init__(self, walker: _Walker, roots: np.ndarray, sliced: Mapping[str, SlicedLayer]) -> None:
        self.walker, self.roots, self.sliced = walker, roots, sliced

    def groups(self) -> tuple[list[ChannelGroup], dict[str, np.ndarray]]:
        members = self._components()
        group_classes = [
            _unique(np.concatenate([self.roots[self.walker.producers[p]] for p in producers])) for producers in members
        ]
        inputs = self._input_indices(group_classes)
        blocked = self._reasons()
        groups = [
            self._group(producers, classes, inputs[g], blocked)
            for g, (producers, classes) in enumerate(zip(members, group_classes))
        ]
        return groups, {group.name: _frozen(classes) for group, classes in zip(groups, group_classes)}

    def _components(self) -> list[list[str]]:
        """Producers joined by shared classes, each list in graph order, by first producer."""
        group_of: dict[int, int] = {}  # class → first producer (index) holding it
        parent: list[int] = []

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for index, atoms in enumerate(self.walker.producers.values()):
            parent.append(index)
            for root in set(self.roots[atoms].tolist()):
                a, b = find(group_of.setdefault(root, index)), find(index)
                parent[max(a, b)] = min(a, b)
        components: dict[int, list[str]] = {}
        for index, name in enumerate(self.walker.producers):
            components.setdefault(find(index), []).append(name)
        return [components[key] for key in sorted(components)]

    def _reasons(self) -> dict[int, tuple[int, str]]:
        """Class → (when, why) of the first block of one of its atoms, in graph order."""
        blocked: dict[int, tuple[int, str]] = {}
        for when, (atom, reason) in enumerate(self.walker.events):
            blocked.setdefault(int(self.roots[atom]), (when, reason))
        return blocked

    def _input_indices(self, group_classes: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per group: sliced layer → group channel at each of its input positions (-1: not this group)."""
        group_of = np.full(len(self.roots), -1, dtype=np.int64)  # class → group
        channel_of = np.full(len(self.roots), -1, dtype=np.int64)  # class → channel within its group
        for g, classes in enumerate(group_classes):
            group_of[classes], channel_of[classes] = g, np.arange(len(classes))
        out: list[dict[str, np.ndarray]] = [{} for _ in group_classes]
        for name, layer in self.sliced.items():
            if layer.input_atoms is None:
                continue
            roots = self.roots[layer.input_atoms]
            groups, channels = group_of[roots], channel_of[roots]
            for g in np.unique(groups[groups >= 0]).tolist():
                out[g][name] = _frozen(np.where(groups == g, channels, -1))
        return out

    def _group(
        self,
        producers: list[str],
        classes: np.ndarray,
        inputs: dict[str, np.ndarray],
        blocked: dict[int, tuple[int, str]],
    ) -> ChannelGroup:
        position = {root: k for k, root in enumerate(classes.tolist())}
        indices, tied = {}, None
        for name in producers:
            index = np.full(len(classes), -1, dtype=np.int64)
            for i, root in enumerate(self.roots[self.walker.producers[name]].tolist()):
                if index[position[root]] >= 0:
                    tied = tied or f"output channels of '{name}' are tied to each other"
                else:
                    index[position[root]] = i
            indices[name] = _frozen(index)
        reasons = [blocked[root] for root in classes.tolist() if root in blocked]
        reason = min(reasons)[1] if reasons else tied
        consumers = tuple(n for n in inputs if isinstance(self.sliced[n].layer, PRODUCERS))
        return ChannelGroup(
            name=producers[0],
            size=len(classes),
            producers=tuple(producers),
            consumers=consumers,
            passthrough=tuple(n for n in inputs if n not in consumers),
            indices=MappingProxyType(indices),
            prunable=reason is None,
            reason=reason,
            input_indices=MappingProxyType(inputs),
        )


def _width(tensor: Any) -> Optional[int]:
    shape = tuple(tensor.shape)
    return shape[-1] if len(shape) >= 2 else None


def _unique(values: np.ndarray) -> np.ndarray:
    """Distinct values in order of first appearance."""
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array
