"""The channel search: ordering channels, pruning to a cost, tracking removals across steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


def _group(name, size, producers=None, prunable=True):
    producers = producers or (name,)
    return SimpleNamespace(
        name=name, size=size, producers=producers, prunable=prunable, reason=None if prunable else "blocked",
        indices={p: np.arange(size) for p in producers},
    )


def test_removal_order_is_global_least_important_first_within_caps():
    from compressor.search.channels import removal_order

    groups = [_group("a", 4), _group("b", 4)]
    scores = {"a": np.array([0.1, 2.0, 0.3, 1.6]), "b": np.array([0.2, 0.05, 1.0, 2.75])}
    # Cap 0.5: at most 2 of 4 channels per group.
    assert removal_order(groups, scores, 0.5) == [("b", 1), ("a", 0), ("b", 0), ("a", 2)]
    # Cap 0.9 of 4 is 3; a group always keeps one channel.
    order = removal_order(groups, scores, 0.99)
    assert sum(1 for name, _ in order if name == "a") == 3
    # Caps count what earlier steps removed: "a" had 6 channels, 2 went already; half of 6 leaves 1 more.
    order = removal_order(groups, scores, 0.5, original_sizes={"a": 6, "b": 4})
    assert [name for name, _ in order].count("a") == 1 and [name for name, _ in order].count("b") == 2
    order = removal_order(groups, scores, 0.5, original_sizes={"a": 12, "b": 4})  # 8 of 12 gone: cap 6 - 8 < 0
    assert [name for name, _ in order].count("a") == 0


def test_removals_of_takes_a_prefix_sorted_per_group():
    from compressor.search.channels import removals_of

    order = [("b", 3), ("a", 0), ("b", 1)]
    assert removals_of(order, 3) == {"a": [0], "b": [1, 3]}
    assert removals_of(order, 0) == {}


def test_tracker_maps_removals_of_later_steps_back_to_original_channels():
    from compressor.search.channel_search import RemovalTracker

    tracker = RemovalTracker([_group("a", 6)])
    tracker.remove([_group("a", 6)], {"a": [1, 4]})  # original 1, 4 go; 0, 2, 3, 5 remain
    tracker.remove([_group("a", 4)], {"a": [2]})  # position 2 of what remains is original 3
    (removal,) = tracker.original_removals("magnitude")
    assert removal.remove == (1, 3, 4) and removal.size == 6


def test_settings_are_validated():
    from compressor.errors import CompressorError
    from compressor.search.channel_search import ChannelSettings

    with pytest.raises(CompressorError, match="Invalid criterion"):
        ChannelSettings(criterion="random")
    with pytest.raises(CompressorError, match="Invalid max_fraction"):
        ChannelSettings(max_fraction=1.0)
    with pytest.raises(CompressorError, match="Invalid step"):
        ChannelSettings(step=0.0)
