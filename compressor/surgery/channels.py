"""Remove channels from a Keras graph model: narrower layers with sliced weights.

`prune_channels(model, {"conv1": [3, 7]})` removes channels 3 and 7 of the dependency
group named "conv1" (see `compressor.graph.groups`) everywhere they live:

- producers get fewer filters/units: kernel output axis and bias sliced;
- consumers read fewer channels: kernel input axis sliced (after a Flatten, the rows
  of every spatial position; in a SeparableConvND, the depthwise kernel and the
  pointwise rows of each depth multiple);
- per-channel layers are sliced along: BatchNormalization gamma/beta/statistics,
  LayerNormalization gamma/beta, DepthwiseConvND kernel and bias, PReLU alpha, and a
  Reshape's `target_shape`;
- a grouped ConvND loses whole groups: the filters of the removed groups go (kernel
  output axis and bias), its per-group input axis stays, and `groups` drops by the
  number of groups removed (the channel analysis ties each group's input channels to
  its filters, so a removal always takes whole groups);
- a MultiHeadAttention loses whole heads: their query, key and value projections and
  their rows of the output projection (`num_heads` drops; widths stay).

The model is cloned with `keras.models.clone_model` (`compressor.graph.clone`), each
layer built from its (updated) config under its own name, so the result is a plain
Keras model that saves to `.keras` and converts to TFLite; the original is left
untouched. Nested models are copied whole (channel analysis treats them as opaque, so
their channels never change).

`pruned_cost` gives the (params, FLOPs) the pruned model would have, without building
it, so a search can try many removals quickly.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np

from compressor.graph.channel_rules import HEAD_AXES, weight_key
from compressor.graph.clone import clone_graph, copy_layer
from compressor.graph.cost import model_cost
from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, SEPARABLE, layer_flops
from compressor.graph.groups import ChannelAnalysis, ChannelGroup, TensorCall, analyze_channels
from compressor.surgery.plan import PlanError

_EXAMPLES = 5  # group names quoted in an error message

Removals = Mapping[str, Sequence[int]]


def prune_channels(
    model: keras.Model, removals: Removals, groups: Optional[Sequence[ChannelGroup]] = None
) -> keras.Model:
    """A copy of `model` without the given channels.

    Args:
        model: A Functional model or a built Sequential model; left unchanged.
        removals: Group name → indices (0 .. size-1) of the group channels to remove.
            Groups not named keep all their channels.
        groups: The groups the removals were chosen on (`channel_groups(model)`);
            each must be a group of `model` as it is now. The analysis itself is
            recomputed either way (milliseconds), since slicing needs every tensor.

    Returns:
        A new model of the same kind and layer names, with narrower layers.

    Raises:
        PlanError: A group is unknown or cannot be pruned (the reason is given), an
            index is out of range, repeated or not an integer, a removal would remove
            every channel of its group, or `groups` belong to another model.
        ModelLoadError: The model has no layer graph, or a layer cannot be rebuilt
            from its config.
    """
    analysis = _analysis(model, groups)
    removed = analysis.removed_atoms(checked_removals(model, analysis.groups, removals))
    return _Cloner(_slices(analysis, removed)).clone(model)


def pruned_cost(
    model: keras.Model, removals: Removals, groups: Optional[Sequence[ChannelGroup]] = None
) -> tuple[int, int]:
    """The parameters and FLOPs `prune_channels(model, removals)` would have, without building it.

    Counts follow `compressor.graph.cost.model_cost` (FLOPs at batch 1, 2 per
    multiply-accumulate), and equal `model_cost` of the pruned model.

    Args:
        model: A Functional model or a built Sequential model.
        removals: Group name → group channel indices to remove.
        groups: The model's groups, as for `prune_channels`.

    Returns:
        (params, flops) of the pruned model.

    Raises:
        PlanError: As `prune_channels`.
        ModelLoadError: The model has no layer graph.
    """
    analysis = _analysis(model, groups)
    removed = analysis.removed_atoms(checked_removals(model, analysis.groups, removals))
    slices = _slices(analysis, removed)
    base = model_cost(model)
    params = base.params + sum(s.params_change() for s in slices.values() if s.changed)
    flops = base.flops + sum(_flops_change(call, removed, slices) for call in analysis.calls)
    return int(params), int(flops)


def checked_removals(
    model: keras.Model, groups: Sequence[ChannelGroup], removals: Removals
) -> dict[str, tuple[int, ...]]:
    """Validate removals against a model's groups.

    Args:
        model: The model (for messages).
        groups: Its channel groups.
        removals: Group name → group channel indices to remove.

    Returns:
        Group name → sorted distinct indices, for the groups that lose channels.

    Raises:
        PlanError: An unknown or unprunable group, bad indices, or every channel of a group.
    """
    if not isinstance(removals, Mapping):
        raise PlanError(
            "Invalid channel removals. Expected a mapping of group name to channel indices. "
            f"Received: removals={type(removals).__name__}"
        )
    by_name = {group.name: group for group in groups}
    checked = {}
    for name, channels in removals.items():
        group = by_name.get(name)
        if group is None:
            raise PlanError(
                f"unknown channel group {name!r} in model '{model.name}'. "
                f"Expected a group name such as {_examples(groups)}"
            )
        indices = _indices(group, channels)
        if not indices:
            continue
        if not group.prunable:
            raise PlanError(f"channel group {name!r} of model '{model.name}' cannot be pruned: {group.reason}")
        if len(indices) >= group.size:
            raise PlanError(
                f"removing all {group.size} channels of group {name!r} would cut the model apart; keep at least one"
            )
        checked[name] = indices
    return checked


def _examples(groups: Sequence[ChannelGroup]) -> str:
    names = [repr(g.name) for g in groups if g.prunable][:_EXAMPLES]
    return ", ".join(names) if names else "(none: no group of this model can be pruned)"


def _indices(group: ChannelGroup, channels: Any) -> tuple[int, ...]:
    try:
        if isinstance(channels, (str, bytes)) or any(isinstance(i, (bool, np.bool_)) for i in channels):
            raise TypeError
        values = [operator.index(i) for i in channels]
    except TypeError:
        values = None
    if values is None or len(set(values)) != len(values) or any(not 0 <= i < group.size for i in values):
        raise PlanError(
            f"Invalid channel indices for group {group.name!r}. Expected distinct integers in "
            f"[0, {group.size}). Received: {_shown(channels)}"
        )
    return tuple(sorted(values))


def _shown(channels: Any) -> str:
    if isinstance(channels, (str, bytes)):
        return repr(channels)
    try:
        return repr([i.item() if isinstance(i, np.generic) else i for i in channels])
    except TypeError:
        return repr(channels)


def _analysis(model: keras.Model, groups: Optional[Sequence[ChannelGroup]]) -> ChannelAnalysis:
    analysis = analyze_channels(model)
    if groups is not None:
        known = set(analysis.groups)
        stale = [group.name for group in groups if group not in known]
        if stale:
            raise PlanError(
                f"channel group(s) {', '.join(map(repr, stale[:_EXAMPLES]))} do not match model '{model.name}' "
                "as it is now; compute its groups with channel_groups(model)"
            )
    return analysis


# --- slicing ---------------------------------------------------------------------------

L = keras.layers
_PRODUCERS = CONV + CONV_TRANSPOSE + SEPARABLE + (L.Dense,)


@dataclass(frozen=True)
class _Slice:
    """Which input and output channels of one layer stay (None: the axis is not sliced)."""

    layer: Any
    input_keep: Optional[np.ndarray]
    output_keep: Optional[np.ndarray]

    @property
    def changed(self) -> bool:
        return any(keep is not None and not keep.all() for keep in (self.input_keep, self.output_keep))

    def config(self) -> dict:
        """The layer's config, narrowed to the kept channels."""
        config = self.layer.get_config()
        if self.output_keep is None:
            return config
        width = int(self.output_keep.sum())
        if getattr(self.layer, "groups", 1) > 1:
            config["groups"] = _kept_groups(self.layer, self.input_keep, self.output_keep)
        if isinstance(self.layer, L.MultiHeadAttention):
            config["num_heads"] = width
        elif isinstance(self.layer, L.Dense):
            config["units"] = width
        elif isinstance(self.layer, _PRODUCERS):
            config["filters"] = width
        elif isinstance(self.layer, L.Reshape) and config["target_shape"][-1] != -1:
            config["target_shape"] = (*config["target_shape"][:-1], width)
        return config

    def weights(self) -> list[np.ndarray]:
        """The layer's weights (in `get_weights()` order) with removed channels sliced out."""
        axes = _weight_axes(self.layer, self.input_keep, self.output_keep)
        out = []
        for variable, value in zip(self.layer.weights, self.layer.get_weights()):
            for axis, keep in _axes_of(axes, variable).items():
                if keep is not None and value.shape[axis] == len(keep):
                    value = np.compress(keep, value, axis=axis)
            out.append(value)
        return out

    def params_change(self) -> int:
        """Kept minus original scalars in the layer's weights."""
        axes = _weight_axes(self.layer, self.input_keep, self.output_keep)
        change = 0
        for variable in self.layer.weights:
            shape = [int(d) for d in variable.shape]
            before = math.prod(shape)
            for axis, keep in _axes_of(axes, variable).items():
                if keep is not None and shape[axis] == len(keep):
                    shape[axis] = int(keep.sum())
            change += math.prod(shape) - before
        return change


def _axes_of(axes: Mapping[str, dict[int, Any]], variable: Any) -> dict[int, Any]:
    return axes.get(variable.name) or axes.get(weight_key(variable), {})


def _weight_axes(layer: Any, input_keep: Any, output_keep: Any) -> dict[str, dict[int, Any]]:
    """Weight name (or "sublayer/name") → {axis: kept channels along it} for a layer's weights."""
    if isinstance(layer, L.MultiHeadAttention):  # output atoms: its heads
        return {key: {axis: output_keep} for key, axis in HEAD_AXES.items()}
    if isinstance(layer, SEPARABLE):
        rows = None if input_keep is None else np.repeat(input_keep, layer.depth_multiplier)
        return {
            "depthwise_kernel": {-2: input_keep},
            "pointwise_kernel": {-2: rows, -1: output_keep},
            "bias": {0: output_keep},
        }
    if isinstance(layer, CONV_TRANSPOSE):  # kernel (..., filters, in_channels)
        return {"kernel": {-1: input_keep, -2: output_keep}, "bias": {0: output_keep}}
    if isinstance(layer, CONV + (L.Dense,)):
        return {"kernel": {-2: input_keep, -1: output_keep}, "bias": {0: output_keep}}
    if isinstance(layer, DEPTHWISE):  # kernel (..., channels, multiplier); bias over channels × multiplier
        return {"kernel": {-2: input_keep}, "bias": {0: output_keep}}
    if getattr(layer, "groups", 1) > 1:  # kernel (..., in_channels / groups, filters): whole groups go
        return {"kernel": {-1: output_keep}, "bias": {0: output_keep}}
    if isinstance(layer, L.BatchNormalization):
        return {name: {0: input_keep} for name in ("gamma", "beta", "moving_mean", "moving_variance")}
    if isinstance(layer, L.LayerNormalization):
        return {"gamma": {0: input_keep}, "beta": {0: input_keep}}
    if isinstance(layer, L.PReLU):  # alpha shared over channels (last dim 1) is left whole
        return {"alpha": {-1: input_keep}}
    return {}


def _kept_groups(layer: Any, input_keep: Optional[np.ndarray], output_keep: np.ndarray) -> int:
    """The groups a grouped convolution keeps; raises PlanError unless whole groups go, on both sides."""
    groups = layer.groups
    kept_out = output_keep.reshape(groups, -1)
    kept_in = kept_out[:, :1] if input_keep is None else input_keep.reshape(groups, -1)
    whole = (kept_out.all(1) | ~kept_out.any(1)) & (kept_in.all(1) | ~kept_in.any(1))
    if not whole.all() or not (kept_in[:, 0] == kept_out[:, 0]).all() or not kept_out.any():
        raise PlanError(f"channel removal would split or empty the groups of '{layer.name}' ({type(layer).__name__})")
    return int(kept_out[:, 0].sum())


def _slices(analysis: ChannelAnalysis, removed: np.ndarray) -> dict[str, _Slice]:
    return {
        name: _Slice(layer.layer, _keep(layer.input_atoms, removed), _keep(layer.output_atoms, removed))
        for name, layer in analysis.layers.items()
    }


def _keep(atoms: Optional[np.ndarray], removed: np.ndarray) -> Optional[np.ndarray]:
    return None if atoms is None else ~removed[atoms]


# --- cost --------------------------------------------------------------------------------


def _flops_change(call: TensorCall, removed: np.ndarray, slices: Mapping[str, _Slice]) -> int:
    """FLOPs of one call after pruning minus before."""
    if isinstance(call.operation, keras.Model):
        return 0  # nested models are opaque: their channels never change
    inputs = [_narrowed(shape, atoms, removed) for shape, atoms in zip(call.input_shapes, call.input_atoms)]
    outputs = [_narrowed(shape, atoms, removed) for shape, atoms in zip(call.output_shapes, call.output_atoms)]
    layer_slice = slices.get(getattr(call.operation, "name", None))
    narrowed = layer_slice is not None and layer_slice.layer is call.operation and layer_slice.changed
    if not narrowed and inputs == list(call.input_shapes) and outputs == list(call.output_shapes):
        return 0
    operation = call.operation.__class__.from_config(layer_slice.config()) if narrowed else call.operation
    before = layer_flops(call.operation, call.input_shapes, call.output_shapes)
    return layer_flops(operation, inputs, outputs) - before


def _narrowed(shape: tuple, atoms: Optional[np.ndarray], removed: np.ndarray) -> tuple:
    if atoms is None:
        return shape
    return (*shape[:-1], int(len(atoms) - removed[atoms].sum()))


# --- cloning -----------------------------------------------------------------------------


class _Cloner:
    """Clones a model layer by layer from narrowed configs, then gives each copy its sliced weights."""

    def __init__(self, slices: Mapping[str, _Slice]) -> None:
        self.slices = slices
        self.copies: list[tuple[Any, Any]] = []  # (original, copy) of layers and nested models

    def clone(self, model: keras.Model) -> keras.Model:
        clone = clone_graph(model, self._copy, purpose="channel pruning")
        for original, copy in self.copies:
            copy.set_weights(self._weights(original))
        return clone

    def _copy(self, operation: Any) -> Any:
        if isinstance(operation, keras.Model):  # copied whole: its channels never change
            copy = clone_graph(operation, lambda layer: copy_layer(layer, failure="cannot rebuild"))
        else:
            copy = copy_layer(operation, lambda: self._config(operation), failure="cannot rebuild")
        if isinstance(operation, keras.layers.Layer):
            self.copies.append((operation, copy))
        return copy

    def _slice(self, operation: Any) -> Optional[_Slice]:
        found = self.slices.get(operation.name)
        return found if found is not None and found.layer is operation else None

    def _config(self, operation: Any) -> dict:
        found = self._slice(operation)
        return found.config() if found is not None else operation.get_config()

    def _weights(self, original: Any) -> list[np.ndarray]:
        found = self._slice(original)
        return found.weights() if found is not None else original.get_weights()
