"""Channel removal through separable, depthwise, grouped and LayerNorm layers.

Three small models of the families edge models are built from: a mini-Xception
(SeparableConv2D blocks with residual 1×1 projections), a ResNeXt-style stage
(Conv2D(groups=4) between 1×1 convolutions, residual Add) and ConvNeXt-style blocks
(Conv2D(groups=C) 7×7, LayerNormalization, Dense MLP, residual Add).

Tolerances: removing a channel that carries only zeros must leave a float32 model's
outputs unchanged up to summation order (1e-5; a wrong slice moves them by ~1e-1).
Exported artifacts are verified at 1e-4, the default `atol` of every artifact (see
tests/test_export_layers.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import _keras, quadrants

ATOL = 1e-4
EXACT = 1e-5


def _head(keras, x):
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.layers.Dense(4, activation="softmax", name="predictions")(x)


def build_mini_xception():
    """Stem, two SeparableConv2D blocks with strided 1×1 residual projections, a separable head."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", name="stem")(inputs)))
    previous = x
    for size in (24, 32):
        x = L.SeparableConv2D(size, 3, padding="same", name=f"sep{size}a")(L.Activation("relu")(x))
        x = L.Activation("relu")(L.BatchNormalization()(x))
        x = L.SeparableConv2D(size, 3, padding="same", name=f"sep{size}b")(x)
        x = L.MaxPooling2D(3, strides=2, padding="same")(L.BatchNormalization()(x))
        x = L.Add()([x, L.Conv2D(size, 1, strides=2, padding="same", name=f"proj{size}")(previous)])
        previous = x
    x = L.Activation("relu")(L.BatchNormalization()(L.SeparableConv2D(48, 3, padding="same", name="sep_head")(x)))
    return keras.Model(inputs, _head(keras, x), name="mini_xception")


def build_resnext():
    """Two ResNeXt bottleneck blocks: 1×1 reduce, 3×3 Conv2D(groups=4), 1×1 expand, residual Add."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 3, strides=2, padding="same", name="stem")(inputs)))
    for b in range(2):
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 1, name=f"b{b}_reduce")(x)))
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 3, padding="same", groups=4, name=f"b{b}_grouped")(y)))
        x = L.ReLU()(L.Add()([x, L.BatchNormalization()(L.Conv2D(32, 1, name=f"b{b}_expand")(y))]))
    return keras.Model(inputs, _head(keras, x), name="resnext")


def build_convnext():
    """A patchify stem and two ConvNeXt blocks: 7×7 Conv2D(groups=C), LayerNorm, GELU MLP, residual."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.LayerNormalization(epsilon=1e-6, name="stem_ln")(L.Conv2D(16, 4, strides=4, name="stem")(inputs))
    for b in range(2):
        y = L.Conv2D(16, 7, padding="same", groups=16, name=f"b{b}_dw")(x)
        y = L.LayerNormalization(epsilon=1e-6, name=f"b{b}_ln")(y)
        y = L.Dense(16, name=f"b{b}_pw2")(L.Dense(64, activation="gelu", name=f"b{b}_pw1")(y))
        x = L.Add(name=f"b{b}_add")([x, y])
    x = L.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    return keras.Model(inputs, _head(keras, x), name="convnext")


def build_encoder():
    """Patches of the image as 16 tokens: a transformer encoder block (4-head attention, LayerNorm, GELU MLP)."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.Reshape((16, 48), name="tokens")(L.Conv2D(48, 4, strides=4, name="patches")(inputs))
    x = L.Dense(16, name="embed")(x)
    x = L.LayerNormalization(name="ln1")(L.Add()([x, L.MultiHeadAttention(4, 8, name="mha")(x, x)]))
    mlp = L.Dense(16, name="pw2")(L.Dense(64, activation="gelu", name="pw1")(x))
    x = L.LayerNormalization(name="ln2")(L.Add()([x, mlp]))
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, L.Dense(4, activation="softmax", name="predictions")(x), name="encoder")


MODELS = {"mini_xception": build_mini_xception, "resnext": build_resnext, "convnext": build_convnext,
          "encoder": build_encoder}


def _groups(model):
    from compressor.graph.groups import channel_groups

    return {group.name: group for group in channel_groups(model)}


def _outputs(model, x):
    return np.asarray(model(x, training=False))


def _zero_filters(layer, keep):
    """Zero the filters (last kernel axis, bias) of `layer` where `keep` is False."""
    weights = layer.get_weights()
    for i, value in enumerate(weights):
        if value.shape[-1] == len(keep):
            weights[i] = value * keep
    layer.set_weights(weights)


# --- groups ------------------------------------------------------------------------------


def test_separable_convs_are_producers_and_consumers_of_their_groups():
    groups = _groups(build_mini_xception())
    assert groups["sep24b"].producers == ("sep24b", "proj24")  # tied by the residual Add
    assert set(groups["sep24b"].consumers) == {"sep32a", "proj32"}
    assert groups["sep24a"].consumers == ("sep24b",) and groups["sep24a"].size == 24
    assert [name for name, group in groups.items() if not group.prunable] == ["predictions"]


def test_grouped_convolution_channels_are_its_groups():
    groups = _groups(build_resnext())
    block = groups["b0_reduce"]
    assert block.prunable and block.size == 4  # one channel per group of b0_grouped
    assert block.producers == ("b0_reduce", "b0_grouped")
    for name in block.producers:  # 8 input channels and 8 filters per group, in order
        np.testing.assert_array_equal(block.output_indices[name], np.repeat(np.arange(4), 8))
    np.testing.assert_array_equal(block.indices["b0_grouped"], np.arange(4) * 8)
    assert "b0_expand" in block.consumers
    assert groups["stem"].producers == ("stem", "b0_expand", "b1_expand")


def test_depthwise_grouped_convolution_and_layer_norm_pass_channels_through():
    groups = _groups(build_convnext())
    stem = groups["stem"]
    assert stem.prunable and stem.size == 16
    assert stem.producers == ("stem", "b0_pw2", "b1_pw2")
    assert {"stem_ln", "b0_dw", "b0_ln", "b1_dw", "b1_ln", "head_ln"} <= set(stem.passthrough)
    assert groups["b0_pw1"].prunable and groups["b0_pw1"].consumers == ("b0_pw2",)


def test_groups_tied_to_each_other_cannot_be_pruned():
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((6, 6, 4), name="image")
    a = L.Conv2D(2, 1, name="a")(inputs)
    x = L.Concatenate(name="twice")([a, a])  # both groups of 'grouped' read the same channels
    x = L.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)
    group = _groups(keras.Model(inputs, _head(keras, x), name="tied"))["a"]
    assert not group.prunable
    assert group.reason == "the groups of 'grouped' (Conv2D) are tied to each other"


def test_layer_normalization_over_other_axes_still_blocks():
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = L.LayerNormalization(axis=(1, 2, 3), name="ln")(L.Conv2D(4, 3, name="a")(inputs))
    model = keras.Model(inputs, _head(keras, L.Conv2D(3, 1, name="b")(x)), name="ln_all")
    groups = _groups(model)
    assert not groups["a"].prunable
    assert groups["a"].reason == (
        "it feeds 'ln' (LayerNormalization), normalizing over axes [1, 2, 3], not the channel axis alone"
    )


def test_blocked_layers_say_why_per_layer():
    from compressor.graph.groups import analyze_channels

    keras = _keras()
    L = keras.layers
    inputs = keras.Input((8, 16), name="tokens")
    x = L.MultiHeadAttention(1, 8, name="mha")(inputs, inputs)  # one head: nothing to remove
    x = L.LayerNormalization(name="ln")(L.Add(name="residual")([inputs, x]))
    x = L.Dense(16, name="pw2")(L.Dense(32, activation="gelu", name="pw1")(x))
    x = L.Dense(4, activation="softmax", name="predictions")(L.GlobalAveragePooling1D(name="gap")(x))
    blocked = dict(analyze_channels(keras.Model(inputs, x, name="encoder")).blocked_layers)
    assert blocked == {
        "mha": "MultiHeadAttention, which channel pruning cannot see through",
        "ln": "its channels are tied to those of the model input 'tokens'",
    }  # pw1's units can go; pw2 and the classifier read them, so none of these is whole


def test_a_grouped_convolution_group_is_scored_ordered_and_tracked_whole():
    from compressor.search.channel_search import RemovalTracker
    from compressor.search.channels import group_scores, removal_order

    model = build_resnext()
    in_group = np.repeat(np.arange(4), 8)
    _zero_filters(model.get_layer("b0_reduce"), in_group != 2)
    _zero_filters(model.get_layer("b0_grouped"), in_group != 2)
    groups = list(_groups(model).values())
    scores = group_scores(model, groups, "magnitude", None)
    assert scores["b0_reduce"].shape == (4,) and scores["b0_reduce"][2] == 0.0
    assert np.delete(scores["b0_reduce"], 2).min() > 0
    assert removal_order(groups, scores, 0.9)[0] == ("b0_reduce", 2)  # the all-zero group goes first
    tracker = RemovalTracker(groups)
    tracker.remove(groups, {"b0_reduce": [2]})
    for name in ("b0_reduce", "b0_grouped"):  # all 8 filters of group 2 gone from both producers
        np.testing.assert_array_equal(tracker.kept[name], np.flatnonzero(in_group != 2))
    (removal,) = tracker.original_removals("magnitude")
    assert (removal.group, removal.remove, removal.size) == ("b0_reduce", (2,), 4)


def test_hessian_scores_what_k_fac_cannot_take_by_magnitude():
    from compressor.io.data import Dataset
    from compressor.search.channels import group_scores

    x, y = quadrants(32, seed=0)
    data = Dataset(x, y, "arrays")
    model = build_mini_xception()
    groups = list(_groups(model).values())
    hessian, magnitude = group_scores(model, groups, "hessian", data), group_scores(model, groups, "magnitude", None)
    np.testing.assert_allclose(hessian["sep24a"], magnitude["sep24a"])  # a SeparableConv2D alone: magnitude
    assert not np.allclose(hessian["stem"], magnitude["stem"])  # a Conv2D alone: K-FAC
    resnext = build_resnext()  # b0_reduce (K-FAC) with b0_grouped (magnitude), one score per group
    scores = group_scores(resnext, list(_groups(resnext).values()), "hessian", data)
    assert scores["b0_reduce"].shape == (4,) and np.all(np.isfinite(scores["b0_reduce"]))


def test_channel_search_reports_why_each_layer_kept_its_channels():
    from compressor.report import render_markdown
    from compressor.search.budgets import Budget
    from compressor.search.channel_search import ChannelSettings, search_channels

    keras = _keras()
    L = keras.layers
    inputs = keras.Input((8, 16), name="tokens")
    x = L.LayerNormalization(name="ln")(L.Add()([inputs, L.MultiHeadAttention(1, 8, name="mha")(inputs, inputs)]))
    x = L.Dense(16, name="pw2")(L.Dense(64, activation="gelu", name="pw1")(x))
    x = L.Dense(4, activation="softmax", name="predictions")(L.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, x, name="encoder")
    result = search_channels(model, Budget("params", 0.8), ChannelSettings())
    assert result.params < model.count_params()  # the MLP's hidden units went
    entry = result.to_dict()
    assert [row["layer"] for row in entry["layers_blocked"]] == ["mha", "ln"]
    assert entry["layers_blocked"][0]["reason"] == "MultiHeadAttention, which channel pruning cannot see through"
    text = render_markdown({"schema": 1, "status": "ok", "channels": entry})
    assert "- `mha`: MultiHeadAttention, which channel pruning cannot see through" in text
    assert "- `ln`: its channels are tied to those of the model input 'tokens'" in text


# --- exact removal -----------------------------------------------------------------------


def test_attention_heads_are_a_group_and_a_head_without_output_weights_goes_exactly():
    from compressor.graph.cost import model_cost
    from compressor.surgery.channels import prune_channels, pruned_cost

    model = build_encoder()
    heads = _groups(model)["mha"]
    assert heads.prunable and heads.size == 4 and heads.producers == ("mha",) and not heads.consumers
    mha = model.get_layer("mha")
    weights = mha.get_weights()
    weights[6][2] = 0.0  # attention_output/kernel (heads, dim, d_model): head 2 adds nothing
    mha.set_weights(weights)
    pruned = prune_channels(model, {"mha": [2]})
    narrow = pruned.get_layer("mha")
    assert narrow.num_heads == 3 and tuple(narrow.weights[0].shape) == (16, 3, 8)
    np.testing.assert_array_equal(np.asarray(narrow.weights[6]), np.delete(weights[6], 2, axis=0))
    assert pruned.count_params() == model.count_params() - 3 * (16 * 8 + 8) - 8 * 16  # q, k, v and output weights
    assert pruned_cost(model, {"mha": [2]}) == (model_cost(pruned).params, model_cost(pruned).flops)
    x = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    np.testing.assert_allclose(_outputs(pruned, x), _outputs(model, x), atol=EXACT)


def test_separable_narrowing_of_a_zero_channel_is_exact():
    from compressor.surgery.channels import prune_channels

    keras = _keras()
    L = keras.layers
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.SeparableConv2D(6, 3, padding="same", activation="relu", name="a")(L.Conv2D(5, 3, name="stem")(inputs))
    x = L.SeparableConv2D(7, 3, padding="same", depth_multiplier=2, name="b")(x)
    model = keras.Model(inputs, _head(keras, x), name="separable")
    keep = np.array([True, False, True, True, False, True])
    _zero_filters(model.get_layer("a"), keep)  # channels 1 and 4 of 'a' are zero everywhere
    pruned = prune_channels(model, {"a": [1, 4]})
    b, narrow = model.get_layer("b"), pruned.get_layer("b")
    assert pruned.get_layer("a").filters == 4
    assert narrow.depthwise_kernel.shape == (3, 3, 4, 2) and narrow.pointwise_kernel.shape == (1, 1, 8, 7)
    np.testing.assert_array_equal(np.asarray(narrow.depthwise_kernel), np.asarray(b.depthwise_kernel)[:, :, keep])
    x = np.random.default_rng(0).random((4, 10, 10, 3), dtype=np.float32)
    np.testing.assert_allclose(_outputs(pruned, x), _outputs(model, x), atol=EXACT)


def test_removing_a_zero_group_of_a_grouped_convolution_is_exact():
    from compressor.surgery.channels import prune_channels, pruned_cost
    from compressor.graph.cost import model_cost

    model = build_resnext()
    in_group = np.repeat(np.arange(4), 8)
    _zero_filters(model.get_layer("b0_reduce"), in_group != 2)
    _zero_filters(model.get_layer("b0_grouped"), in_group != 2)
    bn = [layer for layer in model.layers if layer.name.startswith("batch_normalization")]
    for layer in bn[1:3]:  # the BatchNorms after b0_reduce and b0_grouped keep zeros zero
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma, np.zeros_like(beta), np.zeros_like(mean), variance])
    pruned = prune_channels(model, {"b0_reduce": [2]})
    grouped = pruned.get_layer("b0_grouped")
    assert (grouped.groups, grouped.filters, pruned.get_layer("b0_reduce").filters) == (3, 24, 24)
    assert grouped.kernel.shape == (3, 3, 8, 24)  # each kept group as wide as before
    assert pruned_cost(model, {"b0_reduce": [2]}) == (model_cost(pruned).params, model_cost(pruned).flops)
    x = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
    np.testing.assert_allclose(_outputs(pruned, x), _outputs(model, x), atol=EXACT)


def test_depthwise_grouped_convolution_and_layer_norm_are_sliced():
    from compressor.surgery.channels import prune_channels

    model = build_convnext()
    pruned = prune_channels(model, {"stem": [0, 5, 9]})
    keep = np.ones(16, dtype=bool)
    keep[[0, 5, 9]] = False
    dw = pruned.get_layer("b0_dw")
    assert (dw.groups, dw.filters, dw.kernel.shape) == (13, 13, (7, 7, 1, 13))
    np.testing.assert_array_equal(np.asarray(dw.kernel), np.asarray(model.get_layer("b0_dw").kernel)[..., keep])
    for name in ("stem_ln", "b1_ln", "head_ln"):
        for before, after in zip(model.get_layer(name).get_weights(), pruned.get_layer(name).get_weights()):
            np.testing.assert_array_equal(after, before[keep])
    assert pruned.get_layer("b1_pw2").units == 13 and pruned.get_layer("b1_pw1").kernel.shape == (13, 64)
    assert np.all(np.isfinite(_outputs(pruned, np.ones((1, 16, 16, 3), dtype=np.float32))))


# --- compress and export -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quadrant_data():
    x, y = quadrants(192, seed=0)
    return (x[:128], y[:128]), (x[128:], y[128:])


def _trained(build, train):
    keras = _keras()
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(*train, epochs=2, batch_size=32, verbose=0)  # a few steps: real, non-random weights
    return model


@pytest.mark.parametrize("family", MODELS)
def test_compress_channels_then_export_within_tolerance(tmp_path, quadrant_data, family):
    import compressor

    train, val = quadrant_data
    model = _trained(MODELS[family], train)
    result = compressor.compress(model, data=val, method="fixed_params", compression_factor=0.5,
                                 techniques=("channels",), export=("tflite", "onnx"), runs=1, warmup=0,
                                 out=tmp_path / "out")
    report = result.report
    assert result.status == "ok" and report["budget"]["achieved"] <= 0.5 + 1e-9
    assert result.model.count_params() <= 0.5 * model.count_params()
    assert report["channels"]["channels_removed"] > 0
    # every layer with weights could lose channels, but where attention reads the residual stream
    blocked = [row["layer"] for row in report["channels"]["layers_blocked"]]
    assert blocked == (["ln1", "ln2", "predictions"] if family == "encoder" else [])
    if family == "encoder":  # whole heads went, and the narrower attention exported within tolerance
        assert result.model.get_layer("mha").num_heads < 4
    assert [a["format"] for a in report["artifacts"]] == ["tflite", "onnx"]
    for artifact in report["artifacts"]:
        assert artifact["max_abs_diff"] <= ATOL, artifact


def test_channels_with_per_layer_techniques_go_on_when_no_group_can_be_pruned(tmp_path):
    # A Bidirectional LSTM and its output layer: no channel group channel removal can narrow. Alone,
    # channels refuses such a model in one line; with per-layer techniques they go on and report.
    import compressor
    from families import build_bidirectional

    lines = []
    result = compressor.compress(build_bidirectional(), out=tmp_path / "out", method="fixed_params",
                                 compression_factor=0.5, techniques=("channels", "tucker"), export=("tflite",),
                                 runs=3, log=lines.append)
    report = result.report
    assert report["status"] == "ok" and report["channels"] is None  # a report, no channel stage
    assert report["compressed"]["params"] <= 0.5 * report["baseline"]["params"]  # the per-layer search ran
    (wrapper,) = [row for row in report["layers"] if row["name"].startswith("bidirectional")]
    assert wrapper["technique"] == "svd"
    assert any("no channel group of the model can be pruned" in line for line in lines), lines
    assert (tmp_path / "out" / "report.json").exists()
