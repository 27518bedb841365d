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
  LayerNormalization over the channel axis, DepthwiseConvND and ConvND with one input
  channel per group (`Conv2D(groups=C)`, ConvNeXt's depthwise convolution; output
  c·m + j carries input atom c), PReLU, activations, dropout and noise, pooling,
  padding/cropping/upsampling, scalar Rescaling, and a Reshape that keeps the channel
  axis last. Flatten tiles them: output p·C + c carries atom c.
- A grouped ConvND (1 < groups < input channels) creates its output atoms like any
  producer, then unites, for each group i, all of group i's input atoms with all of
  its output atoms: a group of the convolution is one channel of the dependency group
  and goes whole (the layer keeps groups - 1 groups, each as wide as before). Keras
  needs filters and input channels divisible by `groups`, and exports map the layer to
  one grouped Conv, so removing whole groups keeps it a valid grouped convolution;
  narrowing every group equally would instead tie channel j of all groups together,
  which would leave a depthwise `Conv2D(groups=C)` nothing to remove. The tied
  channels of the layer feeding it (a block of in/groups channels per group) are
  allowed; a group whose convolution groups end up tied to each other is not prunable.
- Add/Subtract/Multiply/Average/Maximum/Minimum unite the atoms position by position
  (an input of width 1 broadcasts and is ignored); Concatenate on the channel axis
  lays its inputs' atoms side by side (on another axis it unites them like Add).
- A MultiHeadAttention with several heads is a producer of one atom per head, tied to
  nothing: its heads form a group of their own (its tensors' channels stay opaque).
- Any other layer (normalization over other axes, softmax over channels, Permute,
  Lambda, MultiHeadAttention, keras.ops nodes, nested models, layers with weights we
  cannot slice) blocks the atoms it reads, and its output is fixed. Atoms that reach a
  model output are blocked too. (The rules are in `compressor.graph.channel_rules`.)

A group is a connected set of producers whose output channels were united; channel k
of the group is one union-find class. A group is prunable unless one of its atoms is
blocked. A layer called several times has one set of atoms, and the inputs of all its
calls are united, since its kernel is sliced once for all of them.

`analyze_channels` returns the groups together with every tensor's atoms, which
`compressor.surgery.channels` needs to slice the layers, and, for every layer with
weights that channel removal must leave whole, why (`ChannelAnalysis.blocked_layers`).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np

from compressor.graph.channel_rules import CHANNEL_SOFTMAX, PRODUCERS, activation_name, attention_heads, opaque_reason
from compressor.graph.flops import DEPTHWISE, MERGE
from compressor.graph.group_records import ChannelAnalysis, ChannelGroup, SlicedLayer, TensorCall
from compressor.graph.walk import require_graph

L = keras.layers

__all__ = ["ChannelAnalysis", "ChannelGroup", "SlicedLayer", "TensorCall", "analyze_channels", "channel_groups"]


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
        self.opaque: dict[str, str] = {}  # layer → "Type, why" of its first opaque call
        self.grouped: dict[str, list[int]] = {}  # grouped conv → one atom of each of its groups

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
            if attention_heads(layer) and layer.name not in self.producers:
                self.sliced[layer.name] = SlicedLayer(layer, None, self._produce(layer, layer.num_heads))
            return self._opaque(node, inputs, why)
        x, shape = inputs[0], tuple(node.inputs[0].shape)
        if getattr(layer, "groups", 1) > 1:
            return self._grouped(node, inputs)
        if isinstance(layer, PRODUCERS):
            self._record(layer, x)
            return [self._produce(layer, _width(node.outputs[0]))]
        if isinstance(layer, (L.Concatenate,) + MERGE):
            return [self._merge(layer, inputs, node)]
        if isinstance(layer, DEPTHWISE):
            self._record(layer, x)
            return [None if x is None else np.repeat(x, layer.depth_multiplier)]
        if isinstance(layer, (L.BatchNormalization, L.LayerNormalization, L.PReLU)):
            self._record(layer, x)
            return [x]
        if isinstance(layer, L.Reshape):
            self._record(layer, x)  # its target_shape names the channel count
        if isinstance(layer, (L.Flatten, L.Reshape)) and len(shape) > 2 and len(node.outputs[0].shape) == 2:
            # row-major flattening: output p·C + c is channel c at position p
            return [None if x is None else np.tile(x, math.prod(shape[1:-1]))]
        return [x]  # per-channel: the atoms pass through unchanged

    def _grouped(self, node: Any, inputs: list) -> list:
        """A grouped convolution: pass-through with one input channel per group, else whole groups tied."""
        layer, x = node.operation, inputs[0]
        width = _width(node.outputs[0])
        if x is None or width is None:
            return self._opaque(node, inputs, "a grouped convolution whose input width is unknown")
        self._record(layer, x)
        if len(x) == layer.groups:  # depthwise: output c·m + j reads input channel c alone
            return [np.repeat(x, width // layer.groups)]
        outputs = self._produce(layer, width)
        if layer.name not in self.grouped:
            for block_in, block_out in zip(np.split(x, layer.groups), np.split(outputs, layer.groups)):
                members = np.concatenate([block_in, block_out])
                self.uf.union(np.repeat(members[:1], len(members) - 1), members[1:])
            self.grouped[layer.name] = [int(atoms[0]) for atoms in np.split(outputs, layer.groups)]
        return [outputs]

    def _opaque(self, node: Any, inputs: list, why: str) -> list:
        layer = node.operation
        described = f"'{layer.name}' ({type(layer).__name__}), {why}"
        if isinstance(layer, L.Layer) and layer.weights:
            self.opaque.setdefault(layer.name, f"{type(layer).__name__}, {why}")
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
        grouper = _Grouper(self, roots, sliced)
        groups, classes = grouper.groups()
        return ChannelAnalysis(
            groups=tuple(groups),
            calls=tuple(self.calls),
            layers=MappingProxyType(sliced),
            roots=_frozen(roots),
            classes=MappingProxyType(classes),
            blocked_layers=MappingProxyType(grouper.blocked_layers(groups, classes)),
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

    def blocked_layers(self, groups: list[ChannelGroup], classes: Mapping[str, np.ndarray]) -> dict[str, str]:
        """Layer → why none of its channels can go, for the layers with weights, in graph order."""
        free = {int(root) for group in groups if group.prunable for root in classes[group.name].tolist()}
        held = {
            int(root): group.reason for group in groups if not group.prunable for root in classes[group.name].tolist()
        }
        blocked = self._reasons()
        out: dict[str, str] = {}
        for call in self.walker.calls:
            layer = call.operation
            name = getattr(layer, "name", None)
            if name in out or not isinstance(layer, L.Layer) or not layer.weights:
                continue
            sliced = self.sliced.get(name)
            atoms = [a for a in (sliced.input_atoms, sliced.output_atoms) if a is not None] if sliced else []
            roots = set(self.roots[np.concatenate(atoms)].tolist()) if atoms else set()
            if roots & free:
                continue
            if name in self.walker.opaque or sliced is None:
                if name in self.walker.opaque:
                    out[name] = self.walker.opaque[name]
                continue
            reasons = sorted(blocked[root] for root in roots if root in blocked)
            fallback = next((held[root] for root in roots if root in held), "it has no channel axis")
            out[name] = reasons[0][1] if reasons else fallback
        return out

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
        whole = {int(self.roots[atom]) for atoms in self.walker.grouped.values() for atom in atoms}
        indices, outputs, tied = {}, {}, None
        for name in producers:
            index = np.full(len(classes), -1, dtype=np.int64)
            channels = np.asarray([position[root] for root in self.roots[self.walker.producers[name]].tolist()])
            for i, (k, root) in enumerate(zip(channels.tolist(), classes[channels].tolist())):
                if index[k] < 0:
                    index[k] = i
                elif root not in whole:  # only the groups of a grouped convolution may tie channels
                    tied = tied or f"output channels of '{name}' are tied to each other"
            indices[name], outputs[name] = _frozen(index), _frozen(channels)
            heads = self.walker.grouped.get(name, [])  # one atom of each group of a grouped convolution
            if len(set(self.roots[heads].tolist())) < len(heads):
                kind = type(self.sliced[name].layer).__name__
                tied = tied or f"the groups of '{name}' ({kind}) are tied to each other"
        reasons = [blocked[root] for root in classes.tolist() if root in blocked]
        reason = min(reasons)[1] if reasons else tied
        consumers = tuple(n for n in inputs if n in self.walker.producers)
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
            output_indices=MappingProxyType(outputs),
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
