"""Channel counts aligned to the runtime's tile (`--channel-multiple`): which channels go, and that searches keep it."""

from __future__ import annotations

import numpy as np
import pytest


def _order(*entries):
    """(group, channel) pairs from (group, count) runs, channels numbered per group from 0."""
    order, seen = [], {}
    for name, count in entries:
        for _ in range(count):
            order.append((name, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1
    return order


def test_aligned_removals_keep_the_nearer_multiple_by_the_order():
    from compressor.search.channels import aligned_removals, removals_of

    # a: 40 channels, 5 go (35 kept, 3 over 32): 3 more go, the next of a's in the order.
    # b: 40, 10 go (30 kept, 14 over 16, 2 under 32): the last 2 of its removals stay.
    # c: 12 (a tile or less): left as it is.
    order = _order(("a", 5), ("b", 10), ("c", 3), ("a", 4), ("b", 1))
    count = 18
    sizes = {"a": 40, "b": 40, "c": 12}
    aligned = aligned_removals(order, count, sizes, 16)
    assert aligned == {"a": list(range(8)), "b": list(range(8)), "c": [0, 1, 2]}
    kept = {name: sizes[name] - len(aligned[name]) for name in sizes}
    assert kept == {"a": 32, "b": 32, "c": 9}
    # A multiple of 1 is the plain prefix.
    assert aligned_removals(order, count, sizes, 1) == removals_of(order, count)


def test_aligned_removals_go_the_other_way_when_the_order_does_not_allow_the_nearer_one():
    from compressor.search.channels import aligned_removals

    # a: 40, 5 go (35 kept): the nearer 32 needs 3 more, but its cap left only 1 in the order:
    # 48 needs 13 to stay of 5 removed, impossible too, so a keeps 35.
    # b: 24, 1 goes (23 kept, 7 over 16): 7 more go, none in the order; 32 is above its size: kept as is.
    # d: 40, 7 go (33 kept): 1 more would do, none left; up to 48: 15 would have to stay of 7. Kept as is.
    # e: 40, 13 go (27 kept, 11 over 16): the nearer multiple is 32, so 5 of its removals stay.
    order = _order(("a", 5), ("b", 1), ("d", 7), ("e", 13), ("a", 1))
    sizes = {"a": 40, "b": 24, "d": 40, "e": 40}
    aligned = aligned_removals(order, 26, sizes, 16)
    assert {name: sizes[name] - len(aligned.get(name, [])) for name in sizes} == {"a": 35, "b": 23, "d": 33, "e": 32}
    assert aligned["e"] == list(range(8))  # the 8 least important of e's removals


def test_prune_to_with_a_multiple_reaches_the_target_with_aligned_groups():
    import keras

    from compressor.graph.groups import channel_groups
    from compressor.search.channels import prune_to, removal_order
    from compressor.surgery.channels import prune_channels, pruned_cost

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(40, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(56, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(40, 3, padding="same", activation="relu", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(x))
    groups = channel_groups(model)
    rng = np.random.default_rng(0)
    scores = {group.name: rng.random(group.size) for group in groups if group.prunable}
    order = removal_order(groups, scores, 0.9)
    flops = pruned_cost(model, {}, groups)[1]
    for target in (0.5, 0.3):
        removals, (params, reached) = prune_to(model, groups, order, "flops", target * flops, multiple=16)
        assert reached <= target * flops
        pruned = prune_channels(model, removals, groups)
        widths = [pruned.get_layer(name).filters for name in ("c1", "c2", "c3")]
        assert all(width <= 16 or width % 16 == 0 for width in widths), widths
        assert (params, reached) == pruned_cost(model, removals, groups)
    plain, _ = prune_to(model, groups, order, "flops", 0.5 * flops)
    widths = [model.get_layer(name).filters - len(plain.get(name, [])) for name in ("c1", "c2", "c3")]
    assert any(width > 16 and width % 16 for width in widths), widths  # without a multiple, counts are any


def test_channel_search_settings_check_the_multiple():
    from compressor.errors import CompressorError
    from compressor.search.channel_search import ChannelSettings

    for value in (0, -16, 1.5, True):
        with pytest.raises(CompressorError, match="Invalid multiple"):
            ChannelSettings(multiple=value)
    assert ChannelSettings(multiple=8).multiple == 8


def test_compress_keeps_aligned_channel_counts_and_records_the_multiple(tmp_path):
    import keras

    import compressor
    from conftest import quadrants

    x, y = quadrants(192, seed=0)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Conv2D(40, 3, padding="same", activation="relu", name="c1")(inputs)
    h = keras.layers.Conv2D(40, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="predictions")(h))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x[:128], y[:128], epochs=1, batch_size=32, verbose=0)
    widths = {}
    for multiple in (1, 16):
        result = compressor.compress(model, data=(x[128:], y[128:]), method="fixed_params", compression_factor=0.5,
                                     budget_on="flops", techniques=("channels",), channel_multiple=multiple,
                                     export=("keras",), runs=1, warmup=0, out=tmp_path / f"m{multiple}")
        assert result.status == "ok" and result.report["options"]["channel_multiple"] == multiple
        widths[multiple] = [result.model.get_layer(name).filters for name in ("c1", "c2")]
    assert all(width <= 16 or width % 16 == 0 for width in widths[16]), widths
    assert widths[16] != widths[1], widths  # the plain search left a count off the multiple
