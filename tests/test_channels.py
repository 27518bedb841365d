"""Channel pruning rewrite (compressor.surgery.channels): exact slicing, cost, export, errors.

Exactness reference: pruning channel k of a group must give the same outputs as the
original model in which channel k is zero everywhere it lives. We zero it by zeroing
the producers' output columns and biases, the biases of depthwise convs on the way,
and beta and moving mean of BatchNormalizations on the way (then BN(0) = 0), in models
whose activations keep 0 at 0 (ReLU, swish; an SE sigmoid gate multiplies a zero).
Consumers then read zeros, so their removed rows contributed nothing. Tolerance 1e-5:
outputs are O(1) and the two models sum the same float32 terms in another order.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import _keras, build_depthwise, build_nested, build_sequential  # noqa: E402
from test_groups import build_residual as build_named_residual  # noqa: E402
from test_groups import build_se  # noqa: E402

ATOL = 1e-5


def _groups(model):
    from compressor.graph.groups import channel_groups

    return {group.name: group for group in channel_groups(model)}


def _prune(model, removals):
    from compressor.graph.groups import channel_groups
    from compressor.surgery.channels import prune_channels

    return prune_channels(model, removals, channel_groups(model))


def _randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics, so slicing them wrongly shows."""
    keras = _keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            positive = [v.name in ("gamma", "moving_variance") for v in layer.weights]
            shapes = [tuple(v.shape) for v in layer.weights]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, s) if p else rng.normal(0, 0.3, s) for p, s in zip(positive, shapes)]
            )
    return model


def _zeroed(model, removals):
    """A copy of `model` in which the removed group channels are zero everywhere."""
    keras = _keras()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    groups = _groups(model)
    for name, channels in removals.items():
        group = groups[name]
        for producer in group.producers:
            index = group.indices[producer][channels]
            index = index[index >= 0]
            layer = copy.get_layer(producer)
            # a transposed convolution's kernel is (..., filters, in_channels)
            axis = -2 if isinstance(layer, keras.layers.Conv2DTranspose) else -1
            _zero(layer, {"kernel": index, "pointwise_kernel": index, "bias": index}, axis)
        for layer_name, positions in group.input_indices.items():
            layer = copy.get_layer(layer_name)
            gone = np.flatnonzero(np.isin(positions, channels) & (positions >= 0))
            if isinstance(layer, keras.layers.BatchNormalization):
                _zero(layer, {"beta": gone, "moving_mean": gone})
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                multiple = layer.depth_multiplier
                _zero(layer, {"bias": (gone[:, None] * multiple + np.arange(multiple)).ravel()})
    return copy


def _zero(layer, positions, axis=-1):
    values = layer.get_weights()
    for i, variable in enumerate(layer.weights):
        if variable.name in positions:
            index = [slice(None)] * values[i].ndim
            index[axis if values[i].ndim > 1 else 0] = positions[variable.name]
            values[i][tuple(index)] = 0.0
    layer.set_weights(values)


def _inputs(model, n=4, seed=1):
    shape = model.inputs[0].shape[1:]
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype("float32")


def _assert_prunes_exactly(model, removals, logits=True):
    if logits:
        model = _logits(model)  # compare before a softmax can saturate or flatten differences
    x = _inputs(model)
    pruned = _prune(model, removals)
    reference = np.asarray(_zeroed(model, removals)(x))
    original = np.asarray(model(x))
    assert np.abs(reference - original).max() > 1e-3  # the removed channels mattered
    np.testing.assert_allclose(np.asarray(pruned(x)), reference, atol=ATOL, rtol=0)
    return pruned


# --- exactness ------------------------------------------------------------------------------------


def test_pruning_nothing_reproduces_the_model(any_model):
    x = _inputs(any_model)
    pruned = _prune(any_model, {})
    assert pruned is not any_model
    assert [layer.name for layer in pruned.layers] == [layer.name for layer in any_model.layers]
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(any_model(x)), atol=ATOL, rtol=0)


def test_residual_pruning_matches_zeroed_channels():
    model = _randomize_batchnorm(build_named_residual())
    pruned = _assert_prunes_exactly(model, {"stem": [1, 4], "a": [0], "head": [2, 3]})
    assert pruned.get_layer("stem").kernel.shape == (3, 3, 3, 4)
    assert pruned.get_layer("b").kernel.shape == (3, 3, 3, 4)  # a lost one of 4, stem group two of 6
    assert pruned.get_layer("stem_bn").gamma.shape == (4,)
    assert pruned.get_layer("head").kernel.shape == (3, 3, 4, 3)
    assert pruned.get_layer("out").kernel.shape == (3, 3)


def _logits(model):
    """The model with its last Dense layer made linear (a copy with the same weights)."""
    keras = _keras()
    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or last.get_config()["activation"] == "linear":
        return model
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    head = keras.layers.Dense(last.units, name=last.name)
    logits = keras.Model(copy.input, head(copy.layers[-1].input), name=model.name)
    head.set_weights(last.get_weights())
    return logits


def test_concatenate_pruning_removes_the_branch_rows():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    a = layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(5, 1, activation="relu", name="b")(inputs)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.Conv2D(4, 3, name="c")(x)
    outputs = layers.Dense(3, name="out")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, outputs, name="concat")
    pruned = _assert_prunes_exactly(model, {"b": [1, 4], "a": [0]})
    kernel = model.get_layer("c").get_weights()[0]
    # b's channels 1 and 4 sit at offsets 3 + 1 and 3 + 4 of c's input; a's 0 at 0
    np.testing.assert_array_equal(pruned.get_layer("c").get_weights()[0], np.delete(kernel, [0, 4, 7], axis=2))
    bias = model.get_layer("b").get_weights()[1]
    np.testing.assert_array_equal(pruned.get_layer("b").get_weights()[1], np.delete(bias, [1, 4]))


def test_depthwise_pruning_shrinks_the_depthwise_conv_and_the_next_conv():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(3, 1, activation="relu", name="c1")(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(6.0, name="dw_relu")(x)
    x = layers.Conv2D(4, 1, name="c2")(x)
    outputs = layers.Dense(3, name="out")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = _randomize_batchnorm(keras.Model(inputs, outputs, name="dw"))
    pruned = _assert_prunes_exactly(model, {"c1": [1]})
    dw_kernel, dw_bias = model.get_layer("dw").get_weights()
    new_kernel, new_bias = pruned.get_layer("dw").get_weights()
    np.testing.assert_array_equal(new_kernel, np.delete(dw_kernel, [1], axis=2))
    np.testing.assert_array_equal(new_bias, np.delete(dw_bias, [2, 3]))  # outputs c·m + j of channel 1
    c2_kernel = model.get_layer("c2").get_weights()[0]
    np.testing.assert_array_equal(pruned.get_layer("c2").get_weights()[0], np.delete(c2_kernel, [2, 3], axis=2))
    assert pruned.get_layer("dw_bn").moving_mean.shape == (4,)


def test_flatten_dense_pruning_removes_every_spatial_copy():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((4, 4, 1), name="image")
    x = layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)  # (2, 2, 3): 4 positions
    x = layers.Flatten(name="flat")(x)
    outputs = layers.Dense(2, name="out")(layers.Dense(5, activation="relu", name="hidden")(x))
    model = keras.Model(inputs, outputs, name="flat")
    pruned = _assert_prunes_exactly(model, {"conv": [1], "hidden": [0, 3]})
    rows = [p * 3 + 1 for p in range(4)]  # channel 1 at each position p: row p·C + c
    kernel = model.get_layer("hidden").get_weights()[0]
    expected = np.delete(np.delete(kernel, rows, axis=0), [0, 3], axis=1)
    np.testing.assert_array_equal(pruned.get_layer("hidden").get_weights()[0], expected)
    assert pruned.get_layer("out").kernel.shape == (3, 2)


@pytest.mark.parametrize("dense", [False, True], ids=["conv", "dense"])
def test_squeeze_excitation_pruning_slices_gate_and_reshape(dense):
    model = build_se(dense)
    pruned = _assert_prunes_exactly(model, {"feat": [0, 2], "se_reduce": [1]})
    assert pruned.get_layer("se_reshape").target_shape == (1, 1, 2)
    assert pruned.get_layer("se_expand").kernel.shape[-2:] == (1, 2)
    assert pruned.get_layer("proj").kernel.shape == (1, 1, 2, 3)


def test_separable_and_transposed_convolutions_are_sliced():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same", activation="relu", name="sep")(x)
    x = layers.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu", name="up")(x)
    x = layers.Conv1D(2, 3, name="c1d")(layers.Reshape((12 * 12, 3), name="seq")(x))
    outputs = layers.Dense(2, name="out")(layers.GlobalAveragePooling1D(name="gap")(x))
    model = keras.Model(inputs, outputs, name="sep")
    pruned = _assert_prunes_exactly(model, {"c1": [3], "sep": [0, 1], "up": [2]})
    assert pruned.get_layer("sep").depthwise_kernel.shape == (3, 3, 3, 2)
    assert pruned.get_layer("sep").pointwise_kernel.shape == (1, 1, 6, 3)
    assert pruned.get_layer("up").kernel.shape == (3, 3, 2, 3)  # (..., filters, in_channels)
    assert pruned.get_layer("seq").target_shape == (144, 2)
    assert pruned.get_layer("c1d").kernel.shape == (3, 2, 2)


def test_prelu_alpha_is_sliced():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((5, 5, 2), name="image")
    x = layers.PReLU(name="prelu")(layers.Conv2D(4, 3, name="conv")(inputs))
    outputs = layers.Dense(2, name="out")(layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs, name="prelu")
    model.get_layer("prelu").set_weights([np.full((3, 3, 4), 0.25, dtype="float32")])
    pruned = _assert_prunes_exactly(model, {"conv": [2]})
    assert pruned.get_layer("prelu").alpha.shape == (3, 3, 3)


def test_shared_layer_is_pruned_once_for_all_its_calls():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((6, 6, 2), name="image")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(4, 1, activation="relu", name="b")(inputs)
    shared = layers.Conv2D(3, 1, activation="relu", name="shared")
    x = layers.Concatenate(name="cat")([shared(a), shared(b)])
    outputs = layers.Dense(2, name="out")(layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, outputs, name="shared")
    pruned = _assert_prunes_exactly(model, {"a": [1], "shared": [0]})
    assert pruned.get_layer("shared").kernel.shape == (1, 1, 3, 2)
    assert pruned.get_layer("out").kernel.shape == (4, 2)  # both calls' outputs lost channel 0


def test_sequential_stays_sequential():
    keras = _keras()
    model = build_sequential()
    conv = next(layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    pruned = _assert_prunes_exactly(model, {conv: [0, 5]}, logits=False)
    assert isinstance(pruned, keras.Sequential)
    assert pruned.layers[0].filters == 6


def test_nested_model_is_copied_whole():
    model = build_nested()
    pruned = _prune(model, {})
    x = _inputs(model)
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(model(x)), atol=ATOL, rtol=0)
    assert pruned.get_layer("backbone") is not model.get_layer("backbone")


def test_depthwise_and_separable_fixture_prunes_exactly():
    model = _randomize_batchnorm(build_depthwise())
    conv = next(name for name, group in _groups(model).items() if group.prunable and group.consumers)
    _assert_prunes_exactly(model, {conv: [0, 3]})


def test_original_model_is_untouched():
    model = build_named_residual()
    before = [w.copy() for w in model.get_weights()]
    pruned = _prune(model, {"stem": [0]})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.get_layer("stem").filters == 6 and pruned.get_layer("stem").filters == 5
    assert not {id(v) for v in model.weights} & {id(v) for v in pruned.weights}


# --- zoo models, cost, artifacts ------------------------------------------------------------------


def _quarter(groups):
    """~25% of every prunable group's channels, spread over the group."""
    return {g.name: list(range(1, g.size, 4)) for g in groups.values() if g.prunable and g.size >= 4}


@pytest.mark.parametrize("builder", ["resnet_cifar", "mobilenet_style", "temporal_cnn", "vgg_style"])
def test_zoo_models_prune_exactly(builder):
    from compressor.models import zoo

    small = {
        "resnet_cifar": dict(depth=20, width=4, input_shape=(8, 8, 1)),
        "mobilenet_style": dict(input_shape=(8, 8, 1), alpha=0.25, blocks=((16, 1), (16, 2))),
        "temporal_cnn": dict(input_shape=(16, 2), filters=(8, 8, 8, 8)),
        "vgg_style": dict(input_shape=(8, 8, 1), widths=(4, 8), dense_units=8, batch_norm=True),
    }[builder]
    model = _randomize_batchnorm(getattr(zoo, builder)(**small))
    _assert_prunes_exactly(model, _quarter(_groups(model)))


def test_pruned_cost_equals_the_cost_of_the_pruned_model():
    from compressor.graph.cost import model_cost
    from compressor.models.zoo import resnet_cifar
    from compressor.surgery.channels import pruned_cost

    for model in (resnet_cifar(20, width=4, input_shape=(8, 8, 1)), build_se(True), build_depthwise()):
        groups = _groups(model)
        removals = _quarter(groups) or {next(n for n, g in groups.items() if g.prunable): [0]}
        cost = model_cost(_prune(model, removals))
        assert pruned_cost(model, removals, list(groups.values())) == (cost.params, cost.flops)
        assert pruned_cost(model, {}) == (model_cost(model).params, model_cost(model).flops)
        assert cost.params < model.count_params()


def test_pruned_model_saves_reloads_and_converts_to_tflite(tmp_path):
    import keras

    from compressor.bench.runtime import open_artifact
    from compressor.export.writers import export_tflite

    model = _randomize_batchnorm(build_named_residual())
    pruned = _prune(model, {"stem": [0, 5], "head": [1]})
    x = _inputs(model, n=2)
    expected = np.asarray(pruned(x))
    pruned.save(tmp_path / "pruned.keras")
    reloaded = keras.models.load_model(tmp_path / "pruned.keras")
    np.testing.assert_allclose(np.asarray(reloaded(x)), expected, atol=ATOL, rtol=0)
    runner = open_artifact(export_tflite(pruned, tmp_path / "pruned.tflite"))
    # softmax outputs; LiteRT's float kernels reorder sums, 1e-5 bounds it at this size
    np.testing.assert_allclose(runner.predict(x), expected, atol=ATOL, rtol=0)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "removals, message",
    [
        ({"nope": [0]}, r"unknown channel group 'nope' in model 'residual'. Expected a group name such as 'stem'"),
        ({"out": [0]}, r"channel group 'out' of model 'residual' cannot be pruned: it feeds the model output 'out'"),
        ({"a": [0, 1, 2, 3]}, r"removing all 4 channels of group 'a' would cut the model apart; keep at least one"),
        ({"a": [4]}, r"Invalid channel indices for group 'a'. Expected distinct integers in \[0, 4\). Received: \[4\]"),
        ({"a": [-1]}, r"Received: \[-1\]"),
        ({"a": [1, 1]}, r"Received: \[1, 1\]"),
        ({"a": [0.5]}, r"Received: \[0.5\]"),
        ({"a": [True]}, r"Received: \[True\]"),
        ({"a": "01"}, r"Received: '01'"),
        ({"a": 2}, r"Received: 2"),
        ([("a", [0])], r"Invalid channel removals. Expected a mapping .* Received: removals=list"),
    ],
    ids=[
        "unknown", "blocked", "all", "range", "negative", "duplicate", "float", "bool", "string", "scalar",
        "not_mapping",
    ],  # fmt: skip
)
def test_bad_removals_raise_plan_errors(removals, message):
    from compressor.surgery.channels import prune_channels, pruned_cost
    from compressor.surgery.plan import PlanError

    model = build_named_residual()
    with pytest.raises(PlanError, match=message):
        prune_channels(model, removals)
    with pytest.raises(PlanError, match=message):
        pruned_cost(model, removals)


def test_numpy_indices_and_empty_removals_are_accepted():
    model = build_named_residual()
    pruned = _prune(model, {"a": np.array([3, 0]), "out": []})  # nothing removed from a blocked group is fine
    assert pruned.get_layer("a").filters == 2


def test_groups_of_another_model_are_refused():
    from compressor.graph.groups import channel_groups
    from compressor.surgery.channels import prune_channels
    from compressor.surgery.plan import PlanError

    keras = _keras()
    model = build_named_residual()
    other = keras.Model(model.inputs, model.get_layer("add_relu").output, name="trunk")  # 'stem' group blocked there
    with pytest.raises(PlanError, match=r"channel group\(s\) 'stem'.* do not match model 'residual'"):
        prune_channels(model, {"a": [0]}, channel_groups(other))


def test_layer_that_cannot_be_rebuilt_is_reported():
    from compressor.errors import ModelLoadError

    keras = _keras()

    class Scale(keras.layers.Layer):  # a function argument: no config Keras can rebuild it from
        def __init__(self, function, **kwargs):
            super().__init__(**kwargs)
            self.function = function

        def call(self, x):
            return self.function(x)

    inputs = keras.Input((4,), name="features")
    outputs = keras.layers.Dense(2, name="out")(Scale(lambda x: 2.0 * x, name="scale")(inputs))
    with pytest.raises(ModelLoadError, match=r"cannot rebuild layer 'scale' \(Scale\) from its config"):
        _prune(keras.Model(inputs, outputs, name="custom"), {})


def test_model_without_a_graph_is_refused():
    from compressor.errors import ModelLoadError
    from compressor.surgery.channels import prune_channels

    keras = _keras()

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ModelLoadError, match="has no layer graph"):
        prune_channels(Subclassed(), {})


# --- keras.applications -------------------------------------------------------------------------------


def _expected_kernel_widths(model, groups, removals):
    """Layer name → (kernel input axis, kernel output axis) widths expected after the removals."""
    widths = {}
    for layer in model.layers:
        if not hasattr(layer, "kernel"):
            continue
        kept_in, kept_out = layer.kernel.shape[-2:]
        for group in groups.values():
            gone = removals.get(group.name, [])
            if layer.name in group.indices:  # a producer loses output channels
                kept_out -= int(np.count_nonzero(group.indices[layer.name][gone] >= 0))
            if layer.name in group.input_indices:  # a consumer, or a depthwise conv's channel axis
                kept_in -= int(np.count_nonzero(np.isin(group.input_indices[layer.name], gone)))
        widths[layer.name] = (kept_in, kept_out)
    return widths


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_keras_applications_prune_and_convert(tmp_path, name):
    from compressor.bench.runtime import open_artifact
    from compressor.export.writers import export_tflite

    keras = _keras()
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    groups = _groups(model)
    assert sum(g.prunable for g in groups.values()) >= 25
    removals = _quarter(groups)
    pruned = _prune(model, removals)
    assert pruned.count_params() < 0.7 * model.count_params()
    expected = _expected_kernel_widths(model, groups, removals)
    assert {name: tuple(pruned.get_layer(name).kernel.shape[-2:]) for name in expected} == expected
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
    outputs = np.asarray(pruned(x))
    assert outputs.shape == np.asarray(model(x)).shape
    runner = open_artifact(export_tflite(pruned, tmp_path / f"{name}.tflite"))
    # softmax outputs; LiteRT reorders float32 sums over up to 2048 channels: 1e-4
    np.testing.assert_allclose(runner.predict(x), outputs, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DenseNet121", "EfficientNetB0"])
def test_keras_applications_prune_and_run(name):
    keras = _keras()
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    groups = _groups(model)
    pruned = _prune(model, _quarter(groups))
    assert pruned.count_params() < 0.8 * model.count_params()
    x = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype("float32")
    out = np.asarray(pruned(x))
    assert out.shape == (1, 10) and np.all(np.isfinite(out))
