"""Channel dependency groups (compressor.graph.groups) on hand-built graphs and reference models.

Every test model names its layers, so group names and members can be asserted
exactly (Keras' automatic names depend on what else the session built).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import _keras  # noqa: E402


def _by_name(groups):
    return {group.name: group for group in groups}


def _groups(model):
    from compressor.graph.groups import channel_groups

    return _by_name(channel_groups(model))


def _classifier(keras, x, activation=None):
    layers = keras.layers
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return layers.Dense(3, activation=activation, name="out")(x)


def build_residual():
    """stem → BN → ReLU, a two-conv branch added back, then a head conv and a classifier."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    y = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(x)
    y = layers.Conv2D(6, 3, padding="same", name="b")(y)
    x = layers.ReLU(name="add_relu")(layers.Add(name="add")([x, y]))
    x = layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="head")(x)
    return keras.Model(inputs, _classifier(keras, x, "softmax"), name="residual")


def test_residual_add_ties_both_producers_into_one_group():
    groups = _groups(build_residual())
    assert sorted(groups) == ["a", "head", "out", "stem"]
    stem = groups["stem"]
    assert stem.producers == ("stem", "b")
    assert stem.size == 6
    np.testing.assert_array_equal(stem.indices["stem"], np.arange(6))
    np.testing.assert_array_equal(stem.indices["b"], np.arange(6))  # Add is position-wise
    assert set(stem.consumers) == {"a", "head"}  # both read the tied channels
    assert stem.passthrough == ("stem_bn",)
    assert stem.prunable and stem.reason is None
    assert groups["a"].consumers == ("b",) and groups["a"].size == 4
    assert groups["head"].consumers == ("out",)


def test_classifier_group_is_blocked_by_the_model_output():
    keras = _keras()
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, _classifier(keras, x), name="logits")  # no softmax: the output is the reason
    out = _groups(model)["out"]
    assert not out.prunable
    assert out.reason == "it feeds the model output 'out'"
    assert _groups(model)["conv"].prunable


def test_softmax_classifier_names_the_model_output_first():
    out = _groups(build_residual())["out"]
    assert not out.prunable and "model output 'out'" in out.reason


def test_features_reaching_the_output_through_pooling_are_blocked():
    keras = _keras()
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x), name="features")
    conv = _groups(model)["conv"]
    assert not conv.prunable
    assert conv.reason == "it feeds the model output 'gap'"


def test_concatenate_on_channels_keeps_each_branch_a_group_with_offsets():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    a = layers.Conv2D(3, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(5, 1, name="b")(inputs)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.Conv2D(4, 3, name="c")(x)
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="concat"))
    assert groups["a"].producers == ("a",) and groups["b"].producers == ("b",)
    np.testing.assert_array_equal(groups["a"].input_indices["c"], [0, 1, 2, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(groups["b"].input_indices["c"], [-1, -1, -1, 0, 1, 2, 3, 4])


def test_concatenate_on_another_axis_ties_channels_like_add():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    x = layers.Concatenate(axis=1, name="stack")([a, b])  # (12, 6, 4): channel c of both is one channel
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="stacked"))
    assert groups["a"].producers == ("a", "b")
    assert "b" not in groups


def test_depthwise_between_two_convs_passes_channels_through():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(3, 1, name="c1")(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.Conv2D(4, 1, name="c2")(x)
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="dw"))
    c1 = groups["c1"]
    assert c1.consumers == ("c2",)
    assert set(c1.passthrough) == {"dw", "dw_bn"}
    np.testing.assert_array_equal(c1.input_indices["dw"], [0, 1, 2])
    # output c·m + j of the depthwise conv carries input channel c
    np.testing.assert_array_equal(c1.input_indices["c2"], [0, 0, 1, 1, 2, 2])
    assert "dw" not in groups  # a depthwise conv produces no channels of its own


def test_flatten_tiles_channels_over_positions():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((4, 4, 1), name="image")
    x = layers.Conv2D(2, 3, name="conv")(inputs)  # (2, 2, 2)
    x = layers.Flatten(name="flat")(x)
    outputs = layers.Dense(3, name="out")(layers.Dense(5, name="hidden")(x))
    groups = _groups(keras.Model(inputs, outputs, name="flat"))
    np.testing.assert_array_equal(groups["conv"].input_indices["hidden"], np.tile([0, 1], 4))
    assert groups["hidden"].consumers == ("out",)


def build_se(dense: bool):
    """A squeeze-excitation block: GAP → (Dense or Reshape+Conv) → sigmoid gate × feature map."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="feat")(inputs)
    s = layers.GlobalAveragePooling2D(name="squeeze")(x)
    if dense:
        s = layers.Dense(2, activation="relu", name="se_reduce")(s)
        s = layers.Dense(4, activation="sigmoid", name="se_expand")(s)
        s = layers.Reshape((1, 1, 4), name="se_reshape")(s)
    else:
        s = layers.Reshape((1, 1, 4), name="se_reshape")(s)
        s = layers.Conv2D(2, 1, activation="relu", name="se_reduce")(s)
        s = layers.Conv2D(4, 1, activation="sigmoid", name="se_expand")(s)
    x = layers.Multiply(name="excite")([x, s])
    x = layers.Conv2D(3, 1, name="proj")(x)
    return keras.Model(inputs, _classifier(keras, x), name="se")


@pytest.mark.parametrize("dense", [False, True], ids=["conv", "dense"])
def test_squeeze_excitation_multiply_joins_the_gate_to_the_feature_map(dense):
    groups = _groups(build_se(dense))
    feat = groups["feat"]
    assert feat.producers == ("feat", "se_expand")
    assert set(feat.consumers) == {"se_reduce", "proj"}
    assert "se_reshape" in feat.passthrough
    assert feat.prunable
    assert groups["se_reduce"].consumers == ("se_expand",)


def test_layer_normalization_over_channels_passes_them_through():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, name="a")(inputs)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.Conv2D(4, 3, name="b")(x)
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="ln"))
    assert groups["a"].prunable and groups["a"].passthrough == ("ln",) and groups["a"].consumers == ("b",)
    assert groups["b"].prunable


def test_add_with_an_opaque_output_blocks_the_producer():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 4), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    y = layers.LayerNormalization(axis=(1, 2), name="ln")(inputs)  # over positions: opaque
    x = layers.Add(name="add")([x, y])
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="mixed"))
    assert not groups["a"].prunable
    assert groups["a"].reason.startswith("its channels are tied to the output of 'ln' (LayerNormalization)")


def test_adding_the_model_input_blocks_the_producer():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Add(name="add")([inputs, layers.Conv2D(2, 3, padding="same", name="a")(inputs)])
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="input_residual"))
    assert groups["a"].reason == "its channels are tied to those of the model input 'image'"


@pytest.mark.parametrize(
    "make, reason",
    [
        (
            lambda L: L.LayerNormalization(axis=(1, 2), name="blocker"),
            "'blocker' (LayerNormalization), normalizing over axes [1, 2]",
        ),
        (lambda L: L.Activation("softmax", name="blocker"), "'blocker' (Activation), a softmax across channels"),
        (lambda L: L.Permute((3, 1, 2), name="blocker"), "'blocker' (Permute), which channel pruning cannot"),
        (lambda L: L.Reshape((6, 12, 2), name="blocker"), "'blocker' (Reshape), a reshape that moves the channel axis"),
        (lambda L: L.Rescaling([1.0, 2.0, 3.0, 4.0], name="blocker"), "'blocker' (Rescaling), with a per-channel"),
    ],
    ids=["spatial_layer_norm", "softmax", "permute", "reshape", "rescaling"],
)
def test_opaque_layers_block_their_inputs_with_a_reason(make, reason):
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = make(layers)(x)
    x = layers.Conv2D(3, 1, name="b")(x)
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="opaque"))
    assert not groups["a"].prunable
    assert groups["a"].reason.startswith(f"it feeds {reason}")


def test_transparent_layers_pass_channels_through():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    for layer in (
        layers.ZeroPadding2D(1), layers.MaxPooling2D(), layers.UpSampling2D(), layers.Cropping2D(1),
        layers.Activation("swish"), layers.LeakyReLU(), layers.ELU(), layers.Dropout(0.1),
        layers.SpatialDropout2D(0.1), layers.GaussianNoise(0.1), layers.Rescaling(0.5, offset=1.0),
        layers.AveragePooling2D(2), layers.PReLU(shared_axes=[1, 2], name="prelu"),
    ):  # fmt: skip
        x = layer(x)
    x = layers.Conv2D(3, 1, name="b")(x)
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="transparent"))
    a = groups["a"]
    assert a.prunable and a.consumers == ("b",) and a.passthrough == ("prelu",)


def test_shared_layer_has_one_set_of_channels_and_ties_its_inputs():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    shared = layers.Conv2D(3, 1, name="shared")
    x = layers.Concatenate(name="cat")([shared(a), shared(b)])
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="shared"))
    # one kernel reads a and b: their channels are sliced together
    assert groups["a"].producers == ("a", "b")
    shared_group = groups["shared"]
    assert shared_group.producers == ("shared",) and shared_group.size == 3
    assert "shared" in groups["a"].consumers


def test_nested_model_is_opaque():
    keras = _keras()
    layers = keras.layers
    inner = keras.Sequential(
        [keras.Input((6, 6, 4)), layers.Conv2D(3, 1, name="inner_conv")], name="backbone"
    )
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="pre")(inputs)
    x = layers.Conv2D(2, 1, name="post")(inner(x))
    groups = _groups(keras.Model(inputs, _classifier(keras, x), name="outer"))
    assert "inner_conv" not in groups and "backbone/inner_conv" not in groups
    assert groups["pre"].reason == "it feeds 'backbone' (Sequential), a nested model, which channel pruning keeps whole"
    assert groups["post"].prunable


def test_sequential_model_is_analysed():
    keras = _keras()
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(4, 3, name="conv"),
            layers.MaxPooling2D(name="pool"),
            layers.Flatten(name="flat"),
            layers.Dense(6, activation="relu", name="hidden"),
            layers.Dense(2, name="out"),
        ],
        name="seq",
    )
    groups = _groups(model)
    assert list(groups) == ["conv", "hidden", "out"]
    np.testing.assert_array_equal(groups["conv"].input_indices["hidden"], np.tile(np.arange(4), 9))


def test_groups_are_frozen_hashable_and_read_only():
    from compressor.graph.groups import channel_groups

    groups = channel_groups(build_residual())
    assert set(groups) == set(channel_groups(build_residual()))  # equal by structure, hashable
    with pytest.raises(ValueError):
        groups[0].indices["stem"][0] = 3
    with pytest.raises(TypeError):
        groups[0].indices["x"] = np.zeros(1)


def test_model_without_a_graph_is_refused():
    from compressor.errors import ModelLoadError
    from compressor.graph.groups import channel_groups

    keras = _keras()

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ModelLoadError, match="has no layer graph"):
        channel_groups(Subclassed())


# --- reference architectures ----------------------------------------------------------------


def test_resnet_cifar_stage_groups_include_the_projection_shortcut():
    from compressor.models.zoo import resnet_cifar

    groups = _groups(resnet_cifar(20, width=4, input_shape=(8, 8, 1)))
    assert len(groups) == 13  # 3 stage groups + 9 first convs of blocks + the classifier
    stage1 = ("stem_conv", "stage1_block1_conv2", "stage1_block2_conv2", "stage1_block3_conv2")
    assert groups["stem_conv"].producers == stage1
    stage2 = groups["stage2_block1_conv2"]
    assert set(stage2.producers) == {
        "stage2_block1_shortcut_conv", "stage2_block1_conv2", "stage2_block2_conv2", "stage2_block3_conv2"
    }  # fmt: skip
    assert stage2.size == 8
    assert "stage2_block1_shortcut_bn" in stage2.passthrough
    assert [name for name, group in groups.items() if not group.prunable] == ["predictions"]


@pytest.mark.parametrize("builder", ["mobilenet_style", "temporal_cnn", "vgg_style"])
def test_zoo_models_have_prunable_groups(builder):
    from compressor.models import zoo

    model = getattr(zoo, builder)()
    groups = _groups(model)
    assert [name for name, group in groups.items() if not group.prunable] == ["predictions"]
    assert len(groups) >= 4
    for group in groups.values():
        for name, index in group.indices.items():
            assert sorted(index[index >= 0].tolist()) == list(range(model.get_layer(name).output.shape[-1]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expected",
    [("ResNet50", 38), ("MobileNetV2", 26), ("DenseNet121", 121), ("EfficientNetB0", 41)],
)
def test_keras_applications_groups(name, expected):
    keras = _keras()
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    groups = _groups(model)
    # one group per producer chain: residual stages tie their convs; only the classifier is blocked
    assert len(groups) == expected
    assert [n for n, group in groups.items() if not group.prunable] == ["predictions"]
    if name == "ResNet50":
        assert len(groups["conv4_block1_0_conv"].producers) == 7  # shortcut + 6 blocks' last convs
    if name == "EfficientNetB0":
        assert groups["stem_conv"].producers == ("stem_conv", "block1a_se_expand")  # SE gate × features
