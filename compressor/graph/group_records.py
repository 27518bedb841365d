"""The records of a channel analysis (`compressor.graph.groups`): groups, sliced layers, calls.

Plain frozen data: the analysis builds them, channel surgery and the channel search
read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        name: Stable id: the name of the group's first producer in graph order.
        size: Number of group channels k = 0 .. size-1.
        producers: Layers whose output channels belong to the group, in graph order.
        consumers: Layers whose kernel input axis is sliced when a group channel goes.
        passthrough: Per-channel layers sliced along (BatchNormalization,
            LayerNormalization, DepthwiseConvND and ConvND with one input channel per
            group, PReLU with per-channel alpha, Reshape keeping the channel axis).
        indices: Producer name → int array (size,): that producer's (first) output
            index of group channel k, -1 when channel k is not among its outputs.
        prunable: False when some of the channels cannot go (see `reason`).
        reason: Why the group must stay whole, naming the layer; None when prunable.
        input_indices: Consumer or pass-through layer name → int array over that
            layer's input channel axis: the group channel at each position, -1 where
            the position belongs to another group or cannot be removed.
        output_indices: Producer name → int array over that producer's output
            channel axis: the group channel at each position. Several positions hold
            the same channel when they go together (the input channels of one group of
            a grouped convolution, and that group's filters).
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
    output_indices: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


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
        blocked_layers: Layer name → why channel removal leaves it whole, for every
            top-level layer with weights none of whose channels can go, in graph order.
    """

    groups: tuple[ChannelGroup, ...]
    calls: tuple[TensorCall, ...]
    layers: Mapping[str, SlicedLayer]
    roots: np.ndarray
    classes: Mapping[str, np.ndarray]
    blocked_layers: Mapping[str, str] = field(default_factory=dict)

    def removed_atoms(self, removals: Mapping[str, Sequence[int]]) -> np.ndarray:
        """Bool array over atoms: True for atoms of the removed group channels.

        Args:
            removals: Group name → group channel indices (already validated).
        """
        gone = [self.classes[name][list(channels)] for name, channels in removals.items() if len(channels)]
        if not gone:
            return np.zeros(len(self.roots), dtype=bool)
        return np.isin(self.roots, np.concatenate(gone))
