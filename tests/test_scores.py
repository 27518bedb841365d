"""Importance scores on constructed layers and tiny networks whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from conftest import build_depthwise, build_nested, build_residual, build_sequential  # noqa: E402

from compressor.errors import CompressorError, DataError, ModelLoadError  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402
from compressor.techniques import scores  # noqa: E402
from compressor.techniques.base import kernel_name, round_half_up  # noqa: E402

layers = keras.layers


# --- builders ---------------------------------------------------------------------------


def two_dense(hidden=5, inputs=4, classes=3, seed=0):
    """Dense(hidden) → Dense(classes, softmax), with signed weights and non-zero biases."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs,)),
            layers.Dense(hidden, activation="relu", name="hidden"),
            layers.Dense(classes, activation="softmax", name="out"),
        ]
    )
    model.get_layer("hidden").set_weights([rng.normal(size=(inputs, hidden)), rng.normal(size=hidden)])
    model.get_layer("out").set_weights([rng.normal(size=(hidden, classes)), rng.normal(size=classes)])
    return model


def mixed_kinds():
    """Depthwise (multiplier 2), transposed, separable, plain conv and Dense in one chain."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(inputs)
    x = layers.Conv2DTranspose(3, 2, name="tconv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.SeparableConv2D(5, 3, activation="relu", name="sep")(x)
    x = layers.Conv2D(4, 1, name="pw")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def set_kernel(layer, kernel):
    weights = layer.get_weights()
    index = [w.name for w in layer.weights].index(kernel_name(layer))
    weights[index] = np.asarray(kernel, dtype=np.float32)
    layer.set_weights(weights)


def tape_snip(model, x, y):
    """|g ⊙ w| of a two_dense model, computed directly on the logits (reference)."""
    w1, b1, w2, b2 = (tf.constant(v) for v in model.get_weights())
    with tf.GradientTape() as tape:
        tape.watch([w1, w2])
        hidden = tf.nn.relu(x @ w1 + b1)
        logits = hidden @ w2 + b2
        labels = tf.argmax(logits, axis=-1) if y is None else y
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss = tf.reduce_mean(losses)
    g1, g2 = tape.gradient(loss, [w1, w2])
    return np.abs(g1.numpy() * w1.numpy()), np.abs(g2.numpy() * w2.numpy())


def snip_data(n=48, features=4, classes=3, labelled=True, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[:, 0] = 0.0  # a feature that is always off: its weights can not matter to the loss
    y = rng.integers(0, classes, size=n) if labelled else None
    return Dataset(x, y, "test")


# --- criteria and layer selection -------------------------------------------------------


def test_unknown_criterion_names_the_choices():
    model = two_dense()
    expected = r"Invalid criterion\. Expected one of \('magnitude', 'snip'.*\)\. Received: criterion='l3'"
    with pytest.raises(CompressorError, match=expected):
        scores.weight_scores(model, "l3")
    with pytest.raises(CompressorError, match="Invalid criterion"):
        scores.filter_scores(model, "l3")


def test_layers_picks_and_orders_the_named_layers():
    model = build_residual()
    found = scores.scored_layers(model)
    names = list(found)
    kinds = [type(layer).__name__ for layer in found.values()]
    assert kinds == ["Conv2D"] * 4 + ["Dense"]  # BN, ReLU, Add, pooling have no kernel
    picked = scores.weight_scores(model, "magnitude", layers=[names[3], names[0]])
    assert list(picked) == [names[3], names[0]]
    assert list(scores.weight_scores(model, "magnitude", layers=names[1])) == [names[1]]


def test_layers_rejects_unknown_and_unweighted_names():
    model = build_residual()
    with pytest.raises(CompressorError, match=r"Invalid layers\..*Received: layers=\['nope'\]"):
        scores.weight_scores(model, "magnitude", layers=["nope"])
    bn = next(layer.name for layer in model.layers if isinstance(layer, layers.BatchNormalization))
    expected = r"convolution or Dense layers with a kernel.*Received: layers=\['" + bn
    with pytest.raises(CompressorError, match=expected):
        scores.filter_scores(model, "magnitude", layers=[bn])


def test_nested_models_use_qualified_names_for_every_criterion():
    model = build_nested()
    data = Dataset(np.random.default_rng(0).random((8, 10, 10, 2), dtype=np.float32), None, "test")
    backbone = model.get_layer("backbone").layers
    inner = next(layer.name for layer in backbone if isinstance(layer, layers.Conv2D))
    for criterion in ("magnitude", "snip", "synflow", "fpgm"):
        result = scores.filter_scores(model, criterion, data)
        assert list(result)[0] == f"backbone/{inner}"
        assert result[f"backbone/{inner}"].shape == (4,)
        assert all(np.all(np.isfinite(v)) and np.all(v >= 0) for v in result.values())


# --- magnitude --------------------------------------------------------------------------


def test_magnitude_of_a_hand_set_dense_kernel():
    model = two_dense()
    kernel = np.array([[3.0, -4.0, 0.0, 1.0, 0.0], [0.0, 0.0, -2.0, 1.0, 0.0]] * 2)
    set_kernel(model.get_layer("hidden"), kernel)
    weights = scores.weight_scores(model, "magnitude", layers=["hidden"])["hidden"]
    np.testing.assert_array_equal(weights, np.abs(kernel))
    # Columns (units): L2 norms (3,0,0,0)x2 → 3√2; (-4,0,-4,0) → 4√2; L1 sums the magnitudes.
    l2 = scores.filter_scores(model, "magnitude", layers=["hidden"])["hidden"]
    l1 = scores.filter_scores(model, "magnitude", layers=["hidden"], norm=1)["hidden"]
    np.testing.assert_allclose(l2, [3 * np.sqrt(2), 4 * np.sqrt(2), 2 * np.sqrt(2), 2.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(l1, [6.0, 8.0, 4.0, 4.0, 0.0], rtol=1e-12)


def test_invalid_norm_raises():
    with pytest.raises(CompressorError, match=r"Invalid norm\. Expected one of \(1, 2\)\. Received: norm=3"):
        scores.filter_scores(two_dense(), "magnitude", norm=3)


def test_magnitude_filters_follow_each_layer_kinds_output_axis():
    model = mixed_kinds()
    # Depthwise (3,3,C=2,m=2): output channel c*2+j has every tap equal to value[c, j].
    value = np.array([[1.0, 4.0], [2.0, 3.0]])
    set_kernel(model.get_layer("dw"), np.broadcast_to(value, (3, 3, 2, 2)))
    # Transposed (2,2,out=3,in=4): output channel o has every weight equal to -(o + 1).
    set_kernel(model.get_layer("tconv"), -np.broadcast_to(np.arange(1.0, 4.0)[:, None], (2, 2, 3, 4)))
    # Separable: the pointwise kernel (1,1,3,5) scores; filter o = 5 - o.
    set_kernel(model.get_layer("sep"), np.broadcast_to(5.0 - np.arange(5.0), (1, 1, 3, 5)))
    result = scores.filter_scores(model, "magnitude", layers=["dw", "tconv", "sep"])
    np.testing.assert_allclose(result["dw"], 3.0 * np.array([1.0, 4.0, 2.0, 3.0]), rtol=1e-12)
    np.testing.assert_allclose(result["tconv"], 4.0 * np.arange(1.0, 4.0), rtol=1e-12)
    np.testing.assert_allclose(result["sep"], np.sqrt(3.0) * (5.0 - np.arange(5.0)), rtol=1e-12)
    assert scores.weight_scores(model, "magnitude", layers=["sep"])["sep"].shape == (1, 1, 3, 5)


# --- FPGM -------------------------------------------------------------------------------


def fpgm_layer():
    """A conv whose 8 filters are c ± d_k (k < 3), c itself (index 5), and c + 10·d_3 (index 2).

    d_k are orthonormal, so c lies at the geometric median of the others (sum of
    distances 6·1 + 10 = 16, against ≥ 18.7 for c ± d_k) and c + 10·d_3 is the outlier.
    """
    rng = np.random.default_rng(3)
    center = rng.normal(size=18)
    d = np.linalg.qr(rng.normal(size=(18, 4)))[0].T
    filters = np.stack(  # (8, 3*3*2)
        [center + d[0], center - d[0], center + 10 * d[3], center + d[1]]
        + [center - d[1], center, center + d[2], center - d[2]]
    )
    kernel = np.moveaxis(filters.reshape(8, 3, 3, 2), 0, -1)  # Keras layout (3, 3, 2, 8)
    model = keras.Sequential([keras.Input((5, 5, 2)), layers.Conv2D(8, 3, name="conv")])
    set_kernel(model.get_layer("conv"), kernel)
    return model, kernel


def test_fpgm_ranks_the_median_filter_lowest_and_the_outlier_highest():
    model, kernel = fpgm_layer()
    result = scores.filter_scores(model, "fpgm")["conv"]
    order = np.argsort(result)
    assert order[0] == 5 and order[-1] == 2
    np.testing.assert_allclose(result[5], 16.0, rtol=1e-5)  # float32 kernel: ~1e-7 relative per weight
    # The bug this guards against: flattening without moving the output axis first mixes
    # filters, and would not find the constructed median.
    assert np.argmin(scores.fpgm_scores(kernel.reshape(8, -1))) != 5


def test_fpgm_has_no_weight_scores():
    model, _ = fpgm_layer()
    with pytest.raises(CompressorError, match="fpgm scores whole filters"):
        scores.weight_scores(model, "fpgm")


# --- SNIP -------------------------------------------------------------------------------


@pytest.mark.parametrize("labelled", [True, False])
def test_snip_matches_a_direct_gradient_on_the_logits(labelled):
    model = two_dense()
    data = snip_data(labelled=labelled)
    expected = tape_snip(model, data.x, data.y)
    got = scores.weight_scores(model, "snip", data, batch_size=20)  # 3 uneven batches
    for name, reference in zip(("hidden", "out"), expected):
        # float32 gradients summed in another order: agree to ~1e-7 relative.
        np.testing.assert_allclose(got[name], reference, rtol=1e-6, atol=1e-6 * reference.max())
    assert np.all(got["hidden"][0] == 0.0)  # the always-zero feature's weights
    assert np.all(got["hidden"][1:].sum(axis=0) > 0)


def test_snip_takes_the_loss_before_a_saturated_softmax():
    model = two_dense()
    kernel = model.get_layer("out").get_weights()[0]
    set_kernel(model.get_layer("out"), 60.0 * kernel)  # logit gaps ≫ 17: float32 probabilities hit 0 and 1
    data = snip_data()
    probabilities = np.asarray(model(data.x))
    assert np.mean(probabilities[np.arange(len(data)), data.y] < 1e-7) > 0.2  # clipped in a probability loss
    expected = tape_snip(model, data.x, data.y)
    got = scores.weight_scores(model, "snip", data)
    for name, reference in zip(("hidden", "out"), expected):
        np.testing.assert_allclose(got[name], reference, rtol=1e-5, atol=1e-6 * reference.max())


def test_snip_scores_frozen_layers_and_leaves_the_model_alone():
    model = two_dense()
    model.get_layer("hidden").trainable = False
    before = [w.copy() for w in model.get_weights()]
    got = scores.filter_scores(model, "snip", snip_data())
    expected = tape_snip(model, snip_data().x, snip_data().y)
    np.testing.assert_allclose(got["hidden"], expected[0].sum(axis=0), rtol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.get_layer("out").get_config()["activation"] == "softmax"


def test_snip_draws_samples_with_the_seed():
    model = two_dense()
    data = snip_data(n=40)
    first = scores.weight_scores(model, "snip", data, samples=10, seed=1)["out"]
    again = scores.weight_scores(model, "snip", data, samples=10, seed=1)["out"]
    other = scores.weight_scores(model, "snip", data, samples=10, seed=2)["out"]
    everything = scores.weight_scores(model, "snip", data, samples=1000)["out"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_allclose(everything, tape_snip(model, data.x, data.y)[1], rtol=1e-5)


def test_data_criteria_need_data():
    model = two_dense()
    with pytest.raises(CompressorError, match="snip needs data"):
        scores.weight_scores(model, "snip")
    with pytest.raises(CompressorError, match="hessian needs data"):
        scores.weight_scores(model, "hessian")
    with pytest.raises(CompressorError, match="hessian needs data"):
        scores.filter_scores(model, "hessian")
    with pytest.raises(DataError, match="empty"):
        scores.weight_scores(model, "snip", Dataset(np.zeros((0, 4), np.float32), None, "empty.npz"))


def test_snip_rejects_data_that_does_not_fit():
    model = two_dense()
    with pytest.raises(DataError, match="samples of shape"):
        scores.weight_scores(model, "snip", Dataset(np.zeros((4, 5), np.float32), None, "x"))
    with pytest.raises(DataError, match="label 7.*3 classes"):
        scores.weight_scores(model, "snip", Dataset(np.zeros((4, 4), np.float32), np.arange(4) + 4, "x"))
    expected = r"Invalid samples\. Expected a positive integer\. Received: samples=0"
    with pytest.raises(CompressorError, match=expected):
        scores.weight_scores(model, "snip", snip_data(), samples=0)
    with pytest.raises(CompressorError, match="Invalid batch_size"):
        scores.filter_scores(model, "snip", snip_data(), batch_size=0)


def test_snip_needs_one_input_and_a_classifier_output():
    a, b = keras.Input((4,)), keras.Input((4,))
    two_inputs = keras.Model([a, b], layers.Dense(3, activation="softmax")(layers.Add()([a, b])))
    with pytest.raises(CompressorError, match="one input and one output"):
        scores.weight_scores(two_inputs, "snip", snip_data())
    inputs = keras.Input((6, 4))
    per_step = keras.Model(inputs, layers.Dense(3, activation="softmax")(inputs))
    with pytest.raises(CompressorError, match="classifier output"):
        scores.weight_scores(per_step, "snip", Dataset(np.zeros((2, 6, 4), np.float32), None, "x"))


# --- SynFlow ----------------------------------------------------------------------------


def test_synflow_has_the_closed_form_of_a_two_layer_net():
    model = two_dense()
    w1, _, w2, _ = (np.abs(w.astype(np.float64)) for w in model.get_weights())
    # R = 1ᵀ|W1||W2|1 (biases 0, activations and softmax removed): ∂R/∂W1[i,j] is row j
    # of |W2| summed, ∂R/∂W2[j,k] is column j of |W1| summed.
    expected_hidden = w1 * w2.sum(axis=1)[None, :]
    expected_out = w1.sum(axis=0)[:, None] * w2
    got = scores.weight_scores(model, "synflow")
    np.testing.assert_allclose(got["hidden"], expected_hidden, rtol=1e-12)  # float64 throughout
    np.testing.assert_allclose(got["out"], expected_out, rtol=1e-12)
    per_filter = scores.filter_scores(model, "synflow")["out"]
    np.testing.assert_allclose(per_filter, expected_out.sum(axis=0), rtol=1e-12)


def test_synflow_gives_a_dead_path_zero_scores():
    model = two_dense()
    kernel = model.get_layer("out").get_weights()[0]
    kernel[2] = 0.0  # hidden unit 2 feeds nothing
    set_kernel(model.get_layer("out"), kernel)
    got = scores.weight_scores(model, "synflow")["hidden"]
    assert np.all(got[:, 2] == 0.0)
    assert np.all(np.delete(got, 2, axis=1) > 0)


def with_ops():
    """keras.ops operations and Dropout in the graph, between two weighted layers."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.ops.mean(x * 0.5, axis=(1, 2))
    outputs = layers.Dense(3, activation="softmax")(layers.Dropout(0.3)(x))
    return keras.Model(inputs, outputs)


def test_synflow_conserves_the_flow_through_every_layer_of_a_chain():
    # In a chain every path crosses each layer once, so each layer's scores sum to R
    # (Tanaka et al., theorem 1). Holds through BN, pooling, depthwise and separable
    # convolutions, keras.ops in the graph, and ReLU6 (which, kept, would cap the
    # growing activations).
    for model in (build_sequential(), build_depthwise(), mixed_kinds(), with_ops()):
        totals = np.array([s.sum() for s in scores.weight_scores(model, "synflow").values()])
        assert totals.min() > 0
        np.testing.assert_allclose(totals, totals[0], rtol=1e-9)  # float64: rounding only


def test_synflow_is_not_stopped_by_a_capped_relu():
    inputs = keras.Input((4,))
    x = layers.Dense(8, name="big")(inputs)
    x = layers.ReLU(6.0)(x)
    outputs = layers.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs)
    set_kernel(model.get_layer("big"), np.full((4, 8), 5.0))  # pre-activations 20 > 6 on ones
    got = scores.weight_scores(model, "synflow")
    assert got["big"].sum() > 0
    np.testing.assert_allclose(got["big"].sum(), got["out"].sum(), rtol=1e-12)


def test_synflow_leaves_the_model_unchanged():
    model = build_depthwise()
    x = np.random.default_rng(0).random((2, 16, 16, 4), dtype=np.float32)
    before, out_before = [w.copy() for w in model.get_weights()], np.asarray(model(x))
    scores.weight_scores(model, "synflow")
    scores.synflow_masks(model, 0.5, iterations=2)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    np.testing.assert_array_equal(np.asarray(model(x)), out_before)
    assert model.weights[0].dtype == "float32"


def test_synflow_per_filter_sums_each_filters_weights():
    model = mixed_kinds()
    weights = scores.weight_scores(model, "synflow")
    filters = scores.filter_scores(model, "synflow")
    dw = weights["dw"]  # (3,3,C,m): output channel c*m + j
    np.testing.assert_allclose(filters["dw"], dw.sum(axis=(0, 1)).reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(filters["tconv"], weights["tconv"].sum(axis=(0, 1, 3)), rtol=1e-12)
    np.testing.assert_allclose(filters["pw"], weights["pw"].sum(axis=(0, 1, 2)), rtol=1e-12)


class Apply(layers.Layer):
    """A custom layer taking a function: Keras can not write its config, so it can not be copied."""

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        self.function = function

    def call(self, x):
        return self.function(x)


def test_a_layer_that_can_not_be_copied_is_named():
    inputs = keras.Input((4,))
    twice = Apply(lambda x: 2 * x, name="twice")
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(twice(inputs)))
    with pytest.raises(ModelLoadError, match="cannot copy layer 'twice' \\(Apply\\)"):
        scores.weight_scores(model, "synflow")
    assert scores.weight_scores(model, "magnitude")  # copying is only needed for gradients


def test_synflow_overflow_raises():
    # Nine layers of weights 1e38 (near float32's largest): R ≈ 1e342 > float64's 1.8e308.
    model = keras.Sequential([keras.Input((2,))] + [layers.Dense(2) for _ in range(9)])
    for layer in model.layers:
        set_kernel(layer, np.full((2, 2), 1e38))
    with pytest.raises(CompressorError, match="synflow overflowed float64"):
        scores.weight_scores(model, "synflow")


# --- SynFlow masks ----------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5, 0.13, 0.01])
def test_synflow_masks_keep_the_requested_density(density):
    model = build_sequential()
    masks = scores.synflow_masks(model, density, iterations=4)
    total = sum(m.size for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round_half_up(density * total)
    assert {k: m.shape for k, m in masks.items()} == {
        k: v.shape for k, v in scores.weight_scores(model, "magnitude").items()
    }


def test_one_round_of_synflow_masks_is_the_global_top_of_the_scores():
    model = build_residual()
    masks = scores.synflow_masks(model, 0.3, iterations=1)
    flat = np.concatenate([s.ravel() for s in scores.weight_scores(model, "synflow").values()])
    kept = np.concatenate([m.ravel() for m in masks.values()])
    assert flat[kept].min() >= flat[~kept].max()


def scaled_chain():
    """Dense 8→32→32→4 whose first layer is 10⁴ times larger than the others."""
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [keras.Input((8,)), layers.Dense(32, name="a"), layers.Dense(32, name="b"), layers.Dense(4, name="c")]
    )
    for name, shape, scale in (("a", (8, 32), 100.0), ("b", (32, 32), 0.01), ("c", (32, 4), 0.01)):
        set_kernel(model.get_layer(name), scale * rng.uniform(-1, 1, size=shape))
    return model


def test_synflow_masks_avoid_the_layer_collapse_of_global_magnitude():
    model = scaled_chain()
    magnitude = scores.weight_scores(model, "magnitude")
    flat = np.concatenate([s.ravel() for s in magnitude.values()])
    threshold = np.sort(flat)[-round_half_up(0.1 * flat.size)]
    assert not np.any(magnitude["b"] >= threshold)  # one-shot magnitude cuts layer b entirely
    masks = scores.synflow_masks(model, 0.1, iterations=10)
    assert all(m.any() for m in masks.values())
    # And the kept weights still connect the input to the output.
    paths = masks["a"].astype(float) @ masks["b"].astype(float) @ masks["c"].astype(float)
    assert paths.sum() > 0


def test_synflow_masks_prune_only_the_named_layers():
    model = scaled_chain()
    masks = scores.synflow_masks(model, 0.25, layers=["c", "b"], iterations=3)
    assert list(masks) == ["c", "b"]
    assert sum(int(m.sum()) for m in masks.values()) == round_half_up(0.25 * (128 + 1024))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"Invalid density\. Expected a number in \(0, 1\]\. Received: density=0\.0"),
        ({"density": 1.5}, "Invalid density"),
        ({"density": 0.5, "iterations": 0}, r"Invalid iterations\. Expected a positive integer"),
    ],
)
def test_synflow_masks_validate_their_arguments(kwargs, message):
    with pytest.raises(CompressorError, match=message):
        scores.synflow_masks(two_dense(), **kwargs)
