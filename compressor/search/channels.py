"""Which channels of a model's dependency groups matter least: scores, a removal order, a cut to a cost.

Removing channels is where real speed comes from: every runtime runs a narrower
layer faster, while zeros in a kernel only shrink the file. These are the steps on the
dependency groups of `compressor.graph.groups` (channels that must go together) that
the channel search (`compressor.search.channel_search`) repeats, and that a script can
run by hand (`examples/prune_channels.py`):

1. Score. Each producer's filter scores (`compressor.techniques.scores.filter_scores`
   with the chosen criterion) are divided by their mean, so layers of different scale
   compare; a group channel's score is the mean over the group's producers (of the
   mean over its filters, where a channel holds several: a whole group of a grouped
   convolution). The heads of a MultiHeadAttention are scored by the L2 norm of their
   query, key, value and output weights, whatever the criterion; under "hessian", the
   producers K-FAC cannot take (grouped and separable convolutions, layers shared by
   several calls) are scored by "magnitude", which their mean-normalization makes
   comparable.
2. Order. All channels of prunable groups, least important first; a group loses at
   most `max_fraction` of its channels and always keeps one.
3. Prune to a cost. Bisection on how many channels of that order go, until the pruned
   model's params or FLOPs fall to the target (`compressor.surgery.channels.pruned_cost`).
   With a channel multiple m > 1, each group left wider than m keeps a multiple of m
   (`aligned_removals`): runtimes compute output channels in tiles (XNNPACK's float
   convolutions on AVX-512 cost about twice as much at 17 or 33 channels as at 16 or 32:
   `benchmarks/channel_tiles.md`), so the channels above a multiple cost as much as a
   whole tile and buy little accuracy for it. Groups of m channels or fewer are left as
   they are: below one tile, latency falls with every channel.

Across steps, `RemovalTracker` keeps each producer's original output indices still
present, so the removals of every step can be given as channels of the original groups.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np

from compressor.io.data import Dataset
from compressor.surgery.plan import ChannelRemoval

__all__ = ["RemovalTracker", "aligned_removals", "group_scores", "prune_to", "removal_order", "removals_of"]


def group_scores(
    model: keras.Model, groups: Sequence[Any], criterion: str, data: Optional[Dataset], seed: int = 0
) -> dict[str, np.ndarray]:
    """Importance of each channel of each prunable group (higher: keep), about 1 on average.

    Raises:
        CompressorError: The criterion needs data and none was given.
    """
    from compressor.techniques.scores import filter_scores

    prunable = [group for group in groups if group.prunable]
    producers = sorted({name for group in prunable for name in group.producers})
    if not producers:
        return {}
    heads = {name: _head_norms(model.get_layer(name)) for name in producers if _has_heads(model, name)}
    plain = _magnitude_only(model, [name for name in producers if name not in heads], criterion)
    filters = [name for name in producers if name not in heads and name not in plain]
    scores = {**(filter_scores(model, criterion, data, layers=filters, seed=seed) if filters else {}), **heads}
    scores.update(filter_scores(model, "magnitude", layers=plain) if plain else {})
    out = {}
    for group in prunable:
        total, counted = np.zeros(group.size), np.zeros(group.size)
        for name in group.producers:
            score = np.asarray(scores[name], dtype=np.float64)
            channels = np.asarray(group.output_indices[name])
            mean = float(score.mean()) if score.size else 0.0
            sums = np.bincount(channels, weights=score / (mean if mean > 0 else 1.0), minlength=group.size)
            filters = np.bincount(channels, minlength=group.size)
            present = filters > 0
            total[present] += sums[present] / filters[present]
            counted[present] += 1
        out[group.name] = total / np.maximum(counted, 1)
    return out


def _magnitude_only(model: keras.Model, producers: Sequence[str], criterion: str) -> list[str]:
    """The producers `criterion` cannot score, which are scored by magnitude: K-FAC's unsupported layers."""
    if criterion != "hessian":
        return []
    from compressor.techniques.kfac import kfac_layers

    supported, _ = kfac_layers(model)
    return [name for name in producers if name not in supported]


def _has_heads(model: keras.Model, name: str) -> bool:
    return isinstance(model.get_layer(name), keras.layers.MultiHeadAttention)


def _head_norms(layer: Any) -> np.ndarray:
    """L2 norm of each head's weights in a MultiHeadAttention (query, key, value, output)."""
    from compressor.graph.channel_rules import HEAD_AXES, weight_key

    parts = [
        np.moveaxis(np.asarray(weight, dtype=np.float64), HEAD_AXES[weight_key(weight)], 0).reshape(layer.num_heads, -1)
        for weight in layer.weights
        if weight_key(weight) in HEAD_AXES
    ]
    return np.sqrt(np.sum(np.concatenate(parts, axis=1) ** 2, axis=1))


def removal_order(
    groups: Sequence[Any],
    scores: Mapping[str, np.ndarray],
    max_fraction: float,
    original_sizes: Optional[Mapping[str, int]] = None,
) -> list[tuple[str, int]]:
    """(group, channel) pairs, least important first, within each group's cap.

    A group may lose at most `max_fraction` of its original size (`original_sizes`,
    default: its size now) counting what earlier steps removed, and keeps one channel.
    Ties go to the group earlier in graph order, then the lower channel index, so the
    order is deterministic.
    """
    position = {group.name: i for i, group in enumerate(groups)}
    entries = [
        (float(score), position[name], channel, name)
        for name, values in scores.items()
        for channel, score in enumerate(values)
    ]
    entries.sort()
    original = dict(original_sizes or {})
    caps = {}
    for group in groups:
        size = original.get(group.name, group.size)
        caps[group.name] = min(int(math.floor(max_fraction * size)) - (size - group.size), group.size - 1)
    taken: dict[str, int] = {}
    order = []
    for _, _, channel, name in entries:
        if taken.get(name, 0) < caps.get(name, 0):
            taken[name] = taken.get(name, 0) + 1
            order.append((name, channel))
    return order


def removals_of(order: Sequence[tuple[str, int]], count: int) -> dict[str, list[int]]:
    """The first `count` entries of an order, as group → sorted channel indices."""
    out: dict[str, list[int]] = {}
    for name, channel in order[:count]:
        out.setdefault(name, []).append(channel)
    return {name: sorted(channels) for name, channels in out.items()}


def aligned_removals(order: Sequence[tuple[str, int]], count: int, sizes: Mapping[str, int],
                     multiple: int) -> dict[str, list[int]]:
    """The first `count` entries of `order`, each group's share moved so that it keeps a multiple of `multiple`.

    A group that would keep k > `multiple` channels, k not a multiple, keeps the nearer
    multiple: fewer channels (its next entries in `order` go too) when k is at most half a
    tile above one, more (its last removals stay) otherwise; whichever way `order` (a
    group's cap) does not allow, the other. A group that keeps `multiple` or fewer is left
    as it is, as is every group when `multiple` is 1.
    """
    chosen: dict[str, list[int]] = {}
    for name, channel in order[:count]:
        chosen.setdefault(name, []).append(channel)
    if multiple <= 1:
        return {name: sorted(channels) for name, channels in chosen.items()}
    rest: dict[str, list[int]] = {}
    for name, channel in order[count:]:
        rest.setdefault(name, []).append(channel)
    for name, size in sizes.items():
        removed = chosen.get(name, [])
        kept = size - len(removed)
        over = kept % multiple
        if kept <= multiple or not over:
            continue
        down_ok, up_ok = len(rest.get(name, [])) >= over, len(removed) >= multiple - over
        if down_ok and (over <= multiple // 2 or not up_ok):
            chosen[name] = removed + rest[name][:over]
        elif up_ok:
            chosen[name] = removed[: len(removed) - (multiple - over)]
    return {name: sorted(channels) for name, channels in chosen.items() if channels}


def prune_to(
    model: keras.Model, groups: Sequence[Any], order: Sequence[tuple[str, int]], kind: str, target: float,
    multiple: int = 1,
) -> tuple[dict[str, list[int]], tuple[int, int]]:
    """The fewest channels of `order` whose removal brings the `kind` cost to at most `target`.

    With `multiple` > 1 the removals of each count are aligned first (`aligned_removals`).

    Returns:
        (removals, (params, flops) after them). When even the whole order does not reach
        the target, all of it.
    """
    from compressor.surgery.channels import pruned_cost

    sizes = {group.name: group.size for group in groups if group.prunable}

    def removals(count: int) -> dict[str, list[int]]:
        return aligned_removals(order, count, sizes, multiple)

    def cost(count: int) -> tuple[int, int]:
        return pruned_cost(model, removals(count), groups)

    def value(c: tuple[int, int]) -> int:
        return c[0] if kind == "params" else c[1]

    low, high = 0, len(order)
    high_cost = cost(high)
    if value(high_cost) > target:
        return removals(high), high_cost
    found = high_cost
    while high - low > 1:
        middle = (low + high) // 2
        middle_cost = cost(middle)
        if value(middle_cost) <= target:
            high, found = middle, middle_cost
        else:
            low = middle
    return removals(high), found


class RemovalTracker:
    """Each producer's original output indices still present, across progressive steps."""

    def __init__(self, groups: Sequence[Any]) -> None:
        self.groups = list(groups)
        self.kept: dict[str, np.ndarray] = {}
        for group in groups:
            for name in group.producers:
                self.kept.setdefault(name, np.arange(len(group.output_indices[name])))

    def remove(self, groups: Sequence[Any], removals: Mapping[str, Sequence[int]]) -> None:
        """Record removals given as channel indices of the CURRENT model's groups."""
        by_name = {group.name: group for group in groups}
        for name, channels in removals.items():
            group = by_name[name]
            for producer in group.producers:
                index = np.flatnonzero(np.isin(group.output_indices[producer], list(channels)))
                self.kept[producer] = np.delete(self.kept[producer], index)

    def original_removals(self, criterion: str) -> tuple[ChannelRemoval, ...]:
        """The removals, as channels of the original groups."""
        out = []
        for group in self.groups:
            if not group.prunable:
                continue
            first = group.name if group.name in group.producers else group.producers[0]
            index, kept = np.asarray(group.indices[first]), set(self.kept[first].tolist())
            gone = [k for k in range(group.size) if index[k] >= 0 and index[k] not in kept]
            if gone:
                out.append(ChannelRemoval(group.name, group.size, tuple(gone), criterion))
        return tuple(out)
