"""K-FAC statistics, OBD scores and EigenDamage (`compressor.techniques.hessian`).

Tolerances: the statistics are summed in float64 from float32 activations and
gradients; the references below are computed independently (numpy float64, or
tf.nn in float32), so they agree to ~1e-7 relative: asserted at 1e-5. Rewritten
models run float32 through two or three layers instead of one, with outputs O(1):
atol 1e-4, as in test_lowrank.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from compressor.errors import CompressorError  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec  # noqa: E402
from compressor.surgery.rewrite import rewrite_model  # noqa: E402
from compressor.techniques.base import call_shapes, effective_kernel, kernel_of, layer_cost  # noqa: E402
from compressor.techniques.hessian import (  # noqa: E402
    DAMPING,
    EigenBasis,
    Hessian,
    eigen_decompose,
    eigendamage_allocate,
    hessian_cost,
)
from compressor.techniques.kfac import (  # noqa: E402
    KFactors,
    kfac_factors,
    kfac_filter_scores,
    kfac_layers,
    kfac_weight_scores,
)
from compressor.techniques.kfac import _tap_counts  # noqa: E402  (the private counts under test)
from compressor.techniques.kfac_recorder import _convolve  # noqa: E402
from conftest import build_nested  # noqa: E402

L = keras.layers
RTOL = 1e-5
ATOL = 1e-4


def dataset(x, y=None):
    return Dataset(np.asarray(x, np.float32), None if y is None else np.asarray(y, np.int64), "test")


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def outer_mean(rows):
    rows = np.asarray(rows, np.float64).reshape(-1, np.shape(rows)[-1])
    return rows.T @ rows / len(rows)


def randomize(model, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([(scale * rng.standard_normal(w.shape)).astype("float32") for w in layer.get_weights()])
    return model


# --- the factors ------------------------------------------------------------------------


def dense_model():
    inputs = keras.Input((5,))
    hidden = L.Dense(4, activation="tanh", name="hidden")(inputs)
    return randomize(keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(hidden)))


def test_dense_factors_match_per_example_gradients():
    model = dense_model()
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    # batch 16 does not divide 40: the last batch is partial.
    factors = kfac_factors(model, dataset(x, y), labels="true", samples=40, batch_size=16)

    (w1, b1), (w2, b2) = (model.get_layer(n).get_weights() for n in ("hidden", "out"))
    x = x.astype(np.float32).astype(np.float64)
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    g_out = probs - np.eye(3)[y]  # ∂(−log p_y)/∂logits, one row per example
    g_hidden = (g_out @ w2.T) * (1 - hidden**2)
    assert relative(factors["hidden"].a, outer_mean(x)) < RTOL
    assert relative(factors["out"].a, outer_mean(hidden)) < RTOL
    assert relative(factors["hidden"].g, outer_mean(g_hidden)) < RTOL
    assert relative(factors["out"].g, outer_mean(g_out)) < RTOL
    assert factors["out"].samples == 40


def conv_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 1, name="pointwise")(inputs)
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="strided")(x)
    x = L.Conv2D(2, 3, name="valid")(x)
    outputs = L.Dense(3, activation="softmax", name="out")(L.Flatten()(x))
    return randomize(keras.Model(inputs, outputs))


def tap_average(images, padding, stride):
    """E[a aᵀ] over examples, output positions and 3×3 taps, from explicit patches."""
    patches = tf.image.extract_patches(images, [1, 3, 3, 1], [1, stride, stride, 1], [1, 1, 1, 1], padding)
    return outer_mean(patches.numpy().reshape(-1, images.shape[-1]))


def test_conv_factors_match_patches_and_per_example_gradients():
    model = conv_model()
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 12)
    factors = kfac_factors(model, dataset(x, y), labels="true", batch_size=5)

    w = {layer.name: [tf.constant(v) for v in layer.get_weights()] for layer in model.layers if layer.weights}
    grads = {name: [] for name in w}
    acts = {name: [] for name in w}
    for n in range(len(x)):  # one example at a time, with tf.nn (not keras.ops)
        with tf.GradientTape(persistent=True) as tape:
            z = {}

            def watched(name, tensor):
                tape.watch(tensor)  # watched where made, so that the ops after it are recorded
                z[name] = tensor
                return tensor

            example = x[n : n + 1]
            pointwise = watched("pointwise", tf.nn.conv2d(example, w["pointwise"][0], 1, "VALID") + w["pointwise"][1])
            strided = watched("strided", tf.nn.conv2d(pointwise, w["strided"][0], 2, "SAME") + w["strided"][1])
            relu = tf.nn.relu(strided)
            valid = watched("valid", tf.nn.conv2d(relu, w["valid"][0], 1, "VALID") + w["valid"][1])
            flat = tf.reshape(valid, (1, -1))
            watched("out", flat @ w["out"][0] + w["out"][1])
            loss = -tf.nn.log_softmax(z["out"])[0, y[n]]
        for name in w:
            grads[name].append(tape.gradient(loss, z[name]).numpy().reshape(-1, w[name][0].shape[-1]))
        acts["pointwise"].append(x[n : n + 1])
        acts["strided"].append(z["pointwise"].numpy())
        acts["valid"].append(relu.numpy())
        acts["out"].append(flat.numpy())
    for name in w:  # G: per-example Σ over positions of g gᵀ, averaged over examples
        g_sum = sum(g.astype(np.float64).T @ g for g in grads[name]) / len(x)
        assert relative(factors[name].g, g_sum) < RTOL, name
    assert relative(factors["pointwise"].a, outer_mean(x)) < RTOL
    assert relative(factors["out"].a, outer_mean(np.concatenate(acts["out"]))) < RTOL
    # Padded taps read zeros and count in the average; stride 2 reads inputs unevenly.
    assert relative(factors["strided"].a, tap_average(np.concatenate(acts["strided"]), "SAME", 2)) < RTOL
    assert relative(factors["valid"].a, tap_average(np.concatenate(acts["valid"]), "VALID", 1)) < RTOL


def test_the_backward_pass_stops_at_the_first_target(monkeypatch):
    """No gradient of the first convolution's kernel (its input is the model's 1-channel images)."""
    from tensorflow.python.ops import gen_nn_ops  # what TensorFlow's Conv2D gradient calls

    filter_inputs = []
    original = gen_nn_ops.conv2d_backprop_filter

    def recorded(conv_input, *args, **kwargs):
        filter_inputs.append(tuple(conv_input.shape))
        return original(conv_input, *args, **kwargs)

    monkeypatch.setattr(gen_nn_ops, "conv2d_backprop_filter", recorded)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(3, 3, activation="relu", name="first")(inputs)
    x = L.Conv2D(4, 3, name="second")(x)
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax")(L.Flatten()(x))))
    factors = kfac_factors(model, dataset(np.random.default_rng(5).random((6, 8, 8, 1))), batch_size=6)
    assert set(factors) == {"first", "second", model.layers[-1].name}
    # The second convolution's input gradient is needed (for G of "first"); TensorFlow
    # computes its kernel's alongside. Nothing runs on the model's input.
    assert filter_inputs == [(6, 6, 6, 3)]


def test_causal_dilated_conv1d_averages_over_taps():
    inputs = keras.Input((10, 2))
    x = L.Conv1D(3, 3, dilation_rate=2, padding="causal", name="causal")(inputs)
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling1D()(x))))
    x = np.random.default_rng(3).standard_normal((8, 10, 2)).astype(np.float32)
    factors = kfac_factors(model, dataset(x), ["causal"])
    padded = np.pad(x.astype(np.float64), ((0, 0), (4, 0), (0, 0)))  # (k − 1) × dilation zeros on the left
    taps = [padded[:, p + 2 * j] for p in range(10) for j in range(3)]
    assert relative(factors["causal"].a, outer_mean(np.stack(taps, axis=1))) < RTOL


def reference_tap_counts(size, kernel, stride, dilation, padding):
    """Per-input reads and total (position, tap) pairs of a 1-d convolution, by loops.

    Pads explicitly as TensorFlow does ("same": total pad from ceil(size / stride)
    outputs, the odd one after; "causal": all before), then slides the dilated
    window over the padded axis.
    """
    span = (kernel - 1) * dilation + 1
    before, after = 0, 0
    if padding == "same":
        total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
        before, after = total // 2, total - total // 2
    elif padding == "causal":
        before = span - 1
    padded = [None] * before + list(range(size)) + [None] * after
    counts, pairs = [0] * size, 0
    for start in range(0, len(padded) - span + 1, stride):
        for tap in range(kernel):
            pairs += 1
            if padded[start + tap * dilation] is not None:
                counts[padded[start + tap * dilation]] += 1
    return np.array(counts, np.float64), pairs


def conv_layer(rank, kernel, stride, dilation, padding, data_format="channels_last"):
    conv = L.Conv1D if rank == 1 else L.Conv2D
    return conv(2, kernel, strides=stride, dilation_rate=dilation, padding=padding, data_format=data_format)


def geometry(kernel, stride, dilation, padding):
    """What `_tap_counts` reads of a layer. Keras refuses strides > 1 with dilation > 1;
    the counts are defined for them all the same, so they are tested with this stand-in."""
    return SimpleNamespace(kernel_size=kernel, strides=stride, dilation_rate=dilation, padding=padding)


def forward_tap_counts(layer, spatial):
    """The old TensorFlow count, forward only: conv(one-hot at q, all-ones kernel) summed is q's reads."""
    one_hot = np.eye(math.prod(spatial), dtype=np.float32).reshape(-1, *spatial, 1)
    out = _convolve(layer, tf.constant(one_hot), tf.ones((*layer.kernel_size, 1, 1)), "channels_last").numpy()
    counts = out.reshape(len(one_hot), -1).sum(axis=1).reshape(spatial)
    return counts, math.prod(out.shape[1:-1]) * math.prod(layer.kernel_size)


@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_tap_counts_match_loops_over_positions_and_taps(padding, stride, dilation):
    for size in range(1, 12):
        for kernel in range(1, 6):
            if padding == "valid" and size < (kernel - 1) * dilation + 1:
                continue  # no output: Keras refuses the shape
            counts, pairs = _tap_counts(geometry((kernel,), (stride,), (dilation,), padding), (size,))
            expected, expected_pairs = reference_tap_counts(size, kernel, stride, dilation, padding)
            assert counts.dtype == np.float64 and counts.shape == (size,)
            np.testing.assert_array_equal(counts, expected, err_msg=f"{size=} {kernel=}")
            assert pairs == expected_pairs, (size, kernel)


@pytest.mark.parametrize(
    "spatial, kernel, stride, dilation, padding",
    [
        ((7, 9), (3, 2), (2, 1), (1, 2), "same"),
        ((8, 5), (1, 3), (2, 3), (1, 1), "valid"),
        ((6, 6), (3, 3), (1, 1), (2, 2), "valid"),
        ((5, 8), (2, 4), (3, 2), (2, 1), "same"),
    ],
)
def test_two_d_tap_counts_are_the_outer_product_of_the_axes(spatial, kernel, stride, dilation, padding):
    counts, pairs = _tap_counts(geometry(kernel, stride, dilation, padding), spatial)
    rows, row_pairs = reference_tap_counts(spatial[0], kernel[0], stride[0], dilation[0], padding)
    cols, col_pairs = reference_tap_counts(spatial[1], kernel[1], stride[1], dilation[1], padding)
    np.testing.assert_array_equal(counts, np.outer(rows, cols))
    assert pairs == row_pairs * col_pairs


@pytest.mark.parametrize(
    "rank, spatial, kernel, stride, dilation, padding",
    [
        (1, (13,), 3, 1, 2, "causal"),
        (1, (11,), 2, 3, 1, "causal"),
        (1, (10,), 4, 3, 1, "same"),
        (2, (9, 7), 3, 2, 1, "same"),
        (2, (8, 8), 1, 2, 1, "valid"),
        (2, (7, 6), 3, 1, 2, "same"),
    ],
)
def test_tap_counts_agree_with_tensorflow_convolutions(rank, spatial, kernel, stride, dilation, padding):
    layer = conv_layer(rank, kernel, stride, dilation, padding)
    counts, pairs = _tap_counts(layer, spatial)
    expected, expected_pairs = forward_tap_counts(layer, spatial)
    np.testing.assert_array_equal(counts, expected)  # small integers: exact in float32
    assert pairs == expected_pairs
    if rank == 2:  # the counts are over the spatial shape, whatever the layer's data format
        channels_first = conv_layer(rank, kernel, stride, dilation, padding, "channels_first")
        np.testing.assert_array_equal(_tap_counts(channels_first, spatial)[0], counts)


def test_factors_follow_nested_models_under_qualified_names():
    nested = randomize(build_nested())
    backbone = nested.get_layer("backbone")
    conv, head = backbone.layers[0], nested.layers[-1]
    inputs = keras.Input((10, 10, 2))
    flat_conv = L.Conv2D(4, 3, activation="relu", name="conv")
    flat_head = L.Dense(3, activation="softmax", name="head")
    flat = keras.Model(inputs, flat_head(L.GlobalAveragePooling2D()(flat_conv(inputs))))
    flat_conv.set_weights(conv.get_weights())
    flat_head.set_weights(head.get_weights())
    x = np.random.default_rng(4).random((16, 10, 10, 2))

    got = kfac_factors(nested, dataset(x), seed=7)
    want = kfac_factors(flat, dataset(x), seed=7)
    assert set(got) == {f"backbone/{conv.name}", head.name}
    for name, other in ((f"backbone/{conv.name}", "conv"), (head.name, "head")):
        assert relative(got[name].a, want[other].a) < RTOL
        assert relative(got[name].g, want[other].g) < RTOL


def test_sampled_labels_give_the_models_own_fisher():
    inputs = keras.Input((4,))
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(inputs)), scale=1.0)
    x = np.random.default_rng(5).standard_normal((3000, 4)).astype(np.float32)
    g = kfac_factors(model, dataset(x), samples=3000, batch_size=1000).get("out").g
    probs = model.predict(x, verbose=0).astype(np.float64)
    # For softmax logits, E_y~p[(p − e_y)(p − e_y)ᵀ] = diag(p) − p pᵀ. Entries are
    # ≤ 0.25 with per-sample spread ≤ 0.5, so 3000 draws leave ~0.01: atol 0.03.
    expected = np.mean([np.diag(p) - np.outer(p, p) for p in probs], axis=0)
    np.testing.assert_allclose(g, expected, atol=0.03)
    again = kfac_factors(model, dataset(x), samples=3000, batch_size=1000)["out"].g
    other = kfac_factors(model, dataset(x), samples=3000, batch_size=1000, seed=1)["out"].g
    np.testing.assert_array_equal(g, again)
    assert not np.array_equal(g, other)


def test_probability_and_logit_outputs_give_the_same_factors():
    """A separate Softmax layer is undone to its logits; a linear output is taken as logits."""
    inputs = keras.Input((5,))
    hidden = L.Dense(4, activation="tanh", name="hidden")
    head = L.Dense(3, name="out")
    logits = head(hidden(inputs))
    with_softmax = keras.Model(inputs, L.Softmax()(logits))
    linear = keras.Model(inputs, logits)
    randomize(with_softmax)
    x = np.random.default_rng(6).standard_normal((20, 5))
    a = kfac_factors(with_softmax, dataset(x))
    b = kfac_factors(linear, dataset(x))
    for name in ("hidden", "out"):
        assert relative(a[name].g, b[name].g) < RTOL


def test_true_labels_need_labels_and_valid_options():
    model = dense_model()
    x = np.zeros((4, 5))
    with pytest.raises(CompressorError, match="labels='true' needs labels"):
        kfac_factors(model, dataset(x), labels="true")
    with pytest.raises(CompressorError, match="Invalid K-FAC labels"):
        kfac_factors(model, dataset(x, [0, 1, 2, 0]), labels="empirical")
    with pytest.raises(CompressorError, match="class indices below 3"):
        kfac_factors(model, dataset(x, [0, 1, 2, 3]), labels="true")
    with pytest.raises(CompressorError, match="samples >= 1"):
        kfac_factors(model, dataset(x), samples=0)
    with pytest.raises(CompressorError, match="no samples"):
        kfac_factors(model, dataset(np.zeros((0, 5))))


def test_samples_caps_the_examples_used():
    x = np.random.default_rng(8).standard_normal((40, 5))
    factors = kfac_factors(dense_model(), dataset(x), samples=10)
    assert factors["out"].samples == 10


def test_models_and_layers_it_cannot_handle_are_refused():
    inputs = keras.Input((4,))
    regression = keras.Model(inputs, L.Dense(1)(inputs))
    with pytest.raises(CompressorError, match="classifier output"):
        kfac_factors(regression, dataset(np.zeros((2, 4))))
    shared = L.Dense(4, name="shared")
    grouped = L.Conv1D(4, 1, groups=2, name="grouped")
    seq = keras.Input((3, 4))
    x = L.Flatten()(grouped(shared(shared(seq))))
    model = keras.Model(seq, L.Dense(3, activation="softmax", name="out")(x))
    layers, skipped = kfac_layers(model)
    assert list(layers) == ["out"]
    assert "called 2 times" in skipped["shared"] and "groups=2" in skipped["grouped"]
    with pytest.raises(CompressorError, match="shared layers"):
        kfac_factors(model, dataset(np.zeros((2, 3, 4))), ["shared"])
    with pytest.raises(CompressorError, match="no Dense, Conv1D or Conv2D layer named 'flatten_x'"):
        kfac_factors(model, dataset(np.zeros((2, 3, 4))), ["flatten_x"])


def test_factors_scale_like_the_exact_fisher_diagonal():
    """G summed over positions makes A_ii·G_jj the Fisher diagonal of a weight in every layer.

    On i.i.d. inputs the positions of a conv layer are nearly independent, so the sum
    of the exact empirical Fisher diagonal matches Σ A_ii G_jj within tens of percent
    per layer (0.6 and 1.0 here); averaging G instead would be off by the conv's
    36 positions.
    """
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(L.GlobalAveragePooling2D()(x))))
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((48, 8, 8, 2)).astype(np.float32), rng.integers(0, 3, 48)
    factors = kfac_factors(model, dataset(x, y), labels="true")
    loss = keras.losses.SparseCategoricalCrossentropy()
    for name in ("conv", "out"):
        kernel = model.get_layer(name).kernel
        exact = 0.0
        for n in range(len(x)):
            with tf.GradientTape() as tape:
                value = loss(y[n : n + 1], model(x[n : n + 1]))
            exact += float(tf.reduce_sum(tape.gradient(value, kernel) ** 2)) / len(x)
        taps = math.prod(kernel.shape[:-2])
        estimate = taps * np.diag(factors[name].a).sum() * np.diag(factors[name].g).sum()
        assert 1 / 3 < estimate / exact < 3.0, (name, estimate / exact)


# --- OBD scores ---------------------------------------------------------------------------


def test_weight_and_filter_scores():
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, name="conv")
    model = randomize(keras.Model(inputs, L.Dense(2, activation="softmax")(L.Flatten()(conv(inputs)))))
    kernel, bias = conv.get_weights()
    kernel[..., 2] = 0.0
    conv.set_weights([kernel, bias])
    rng = np.random.default_rng(10)
    diagonal = KFactors(a=np.diag(rng.random(3) + 0.1), g=np.diag(rng.random(4) + 0.1), samples=1)
    weights = kfac_weight_scores(model, {"conv": diagonal})["conv"]
    filters = kfac_filter_scores(model, {"conv": diagonal})["conv"]
    assert weights.shape == kernel.shape
    # With a diagonal A, a filter's score is the sum of its weights' scores.
    np.testing.assert_allclose(filters, weights.sum(axis=(0, 1, 2)), rtol=1e-12)

    data = rng.standard_normal((10, 6, 6, 3))
    scores = kfac_filter_scores(model, kfac_factors(model, dataset(data)))["conv"]
    assert scores[2] == 0.0 and np.argmin(scores) == 2 and np.all(np.delete(scores, 2) > 0)


def test_scores_refuse_factors_that_do_not_fit():
    model = dense_model()
    wrong = KFactors(a=np.eye(3), g=np.eye(3), samples=1)
    with pytest.raises(CompressorError, match="3 input and 3 output channels"):
        kfac_weight_scores(model, {"hidden": wrong})
    with pytest.raises(CompressorError, match="not in model"):
        kfac_filter_scores(model, {"missing": wrong})


# --- eigenbases -------------------------------------------------------------------------


def test_eigen_decompose_rotates_back_to_the_kernel():
    model = conv_model()
    x = np.random.default_rng(11).standard_normal((16, 6, 6, 2))
    layer = model.get_layer("strided")
    basis = eigen_decompose(layer, kfac_factors(model, dataset(x), ["strided"])["strided"])
    kernel = kernel_of(layer).astype(np.float64)
    back = np.einsum("ia,...ab,jb->...ij", basis.q_a, basis.rotate(kernel), basis.q_g)
    assert relative(back, kernel) < RTOL
    np.testing.assert_allclose(basis.q_a.T @ basis.q_a, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(basis.q_g.T @ basis.q_g, np.eye(4), atol=1e-10)
    assert np.all(np.diff(basis.in_importance) <= 0) and np.all(np.diff(basis.out_importance) <= 0)
    importance = basis.importance(kernel)
    np.testing.assert_allclose(basis.in_importance, importance.sum(axis=1), rtol=1e-12)
    assert basis.lambda_a.min() >= DAMPING * basis.lambda_a.max()


def test_a_direction_without_variance_has_no_importance_and_goes_first():
    inputs = keras.Input((4,))
    hidden = L.Dense(3, activation="tanh", name="hidden")(inputs)
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax")(hidden)), scale=1.0)
    rng = np.random.default_rng(12)
    u = rng.standard_normal((64, 1))
    x = np.hstack([u, -u, rng.standard_normal((64, 2))])  # nothing varies along (1, 1, 0, 0)
    layer = model.get_layer("hidden")
    basis = eigen_decompose(layer, kfac_factors(model, dataset(x), ["hidden"])["hidden"])
    dead = np.array([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)
    assert abs(basis.q_a[:, -1] @ dead) > 1 - 1e-6
    # Zero up to the damping floor (DAMPING of the largest eigenvalue).
    assert basis.in_importance[-1] <= 10 * DAMPING * basis.in_importance[0]
    assert eigendamage_allocate(model, {"hidden": basis}, 1 / 7) == {"hidden": (3, 3)}


# --- allocation ---------------------------------------------------------------------------


def fake_basis(in_importance, out_importance):
    """A basis with given importances (identity eigenvectors, unit eigenvalues)."""
    n_in, n_out = len(in_importance), len(out_importance)
    importances = np.asarray(in_importance, float), np.asarray(out_importance, float)
    return EigenBasis(np.eye(n_in), np.ones(n_in), np.eye(n_out), np.ones(n_out), *importances)


def two_dense_model():
    inputs = keras.Input((4,))
    x = L.Dense(4, name="a")(inputs)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="b")(x))


def test_allocation_uses_one_global_threshold_within_caps():
    model = two_dense_model()
    small = [4e-3, 3e-3, 2e-3, 1e-3]
    bases = {"a": fake_basis(small, small), "b": fake_basis([9, 8, 7, 6], [9, 8, 7])}
    # 3 of 15 directions: the three least important, all in "a".
    assert eigendamage_allocate(model, bases, 0.2) == {"a": (2, 3), "b": (4, 3)}
    # 8 wanted; caps of half a side: "a" gives 2 + 2, "b" 2 + 1: only 7 can go.
    assert eigendamage_allocate(model, bases, 0.5, max_per_layer=0.5) == {"a": (2, 2), "b": (2, 2)}
    # Never all of a side, even with no cap.
    assert eigendamage_allocate(model, bases, 0.99, max_per_layer=1.0) == {"a": (1, 1), "b": (1, 1)}
    assert eigendamage_allocate(model, bases, 0.0) == {"a": (4, 4), "b": (4, 3)}


def test_allocation_guards():
    model = two_dense_model()
    bases = {"a": fake_basis([1, 1, 1, 1], [1, 1, 1, 1])}
    with pytest.raises(CompressorError, match="Invalid fraction"):
        eigendamage_allocate(model, bases, 1.0)
    with pytest.raises(CompressorError, match="Invalid max_per_layer"):
        eigendamage_allocate(model, bases, 0.5, max_per_layer=0.0)
    with pytest.raises(CompressorError, match="not in model"):
        eigendamage_allocate(model, {"nope": bases["a"]}, 0.5)


# --- the technique ------------------------------------------------------------------------


def model_2d():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="spatial")(inputs)
    x = L.Conv2D(5, 1, strides=2, activation="relu", name="pointwise")(x)
    x = L.Dense(4, activation="tanh", name="dense")(L.Flatten()(x))
    return randomize(keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)))


def model_1d():
    inputs = keras.Input((12, 3))
    x = L.Conv1D(6, 3, dilation_rate=2, padding="causal", activation="relu", name="spatial")(inputs)
    x = L.Conv1D(5, 1, activation="relu", name="pointwise")(x)
    x = L.GlobalAveragePooling1D()(x)
    return randomize(keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x)))


def bases_of(model, n=16, seed=13, x=None):
    """Eigenbases of all of the model's layers, from `x` or random inputs in [0, 1)."""
    x = np.random.default_rng(seed).random((n, *model.inputs[0].shape[1:])) if x is None else x
    layers, _ = kfac_layers(model)
    return {name: eigen_decompose(layers[name], f) for name, f in kfac_factors(model, dataset(x)).items()}


@pytest.mark.parametrize("build", [model_2d, model_1d])
def test_full_ranks_reproduce_the_model(build):
    model = build()
    bases = bases_of(model)
    technique = Hessian(bases)
    replacements = {}
    for name, basis in bases.items():
        edit = LayerEdit(layer=name, technique="hessian", ranks=(len(basis.lambda_a), len(basis.lambda_g)))
        replacements[name] = technique.build(model.get_layer(name), edit)
        assert replacements[name].notes["reconstruction_error"] < 1e-6
    rewritten = rewrite_model(model, replacements)
    x = np.random.default_rng(14).random((4, *model.inputs[0].shape[1:])).astype(np.float32)
    np.testing.assert_allclose(rewritten(x), model(x), atol=ATOL)
    assert len(replacements["spatial"].chain) == 3 and len(replacements["pointwise"].chain) == 2


@pytest.mark.parametrize("build", [model_2d, model_1d])
@pytest.mark.parametrize("ranks", [(2, 4), (3, 2)])
def test_truncated_chain_keeps_the_leading_directions(build, ranks):
    model = build()
    bases = bases_of(model)
    for name in ("spatial", "pointwise"):
        layer, basis = model.get_layer(name), bases[name]
        edit = LayerEdit(layer=name, technique="hessian", ranks=ranks)
        replacement = Hessian(bases).build(layer, edit)
        core = basis.rotate(kernel_of(layer))[..., : ranks[0], : ranks[1]]
        want = np.einsum("ia,...ab,jb->...ij", basis.q_a[:, : ranks[0]], core, basis.q_g[:, : ranks[1]])
        assert relative(effective_kernel(layer, replacement), want) < RTOL
        # hessian_cost counts exactly the weights the built layers hold.
        held = sum(int(np.prod(np.shape(w))) for piece in replacement.chain for w in piece.weights)
        assert hessian_cost(layer, edit)[0] == held


def test_options_lower_cost_and_name_the_qualified_layer():
    inputs = keras.Input((10, 10, 16))
    conv = L.Conv2D(32, 3, name="conv")
    model = randomize(keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(conv(inputs)))))
    # Bases keyed by a qualified name (a layer inside a nested model) find the layer by its own name.
    technique = Hessian({"outer/conv": bases_of(model)["conv"]})
    options = technique.options(conv)
    assert options and all(edit.technique == "hessian" and edit.layer == "outer/conv" for edit in options)
    costs = [hessian_cost(conv, edit) for edit in options]
    params, flops = layer_cost(conv, *call_shapes(conv))
    assert all(p < params and f < flops for p, f in costs)
    assert costs == sorted(costs, reverse=True)
    assert technique.check(conv) is None


def test_technique_guards():
    model = model_2d()
    bases = bases_of(model)
    technique = Hessian(bases)
    spatial, dense = model.get_layer("spatial"), model.get_layer("dense")
    assert Hessian({}).check(spatial) == "no K-FAC statistics for this layer"
    assert "not DepthwiseConv2D" in technique.check(_called(L.DepthwiseConv2D(3), (6, 6, 2)))
    assert "basis is for" in Hessian({"spatial": bases["dense"]}).check(spatial)
    tiny = _called(L.Dense(2, name="tiny"), (2,))  # rank 1 costs (2 + 2) + 2 bias = its 2·2 + 2
    assert Hessian({"tiny": fake_basis([1, 1], [1, 1])}).check(tiny) == "factorizing cannot lower its cost"
    with pytest.raises(PlanError, match="no sparse residual"):
        technique.options(spatial, SparsitySpec(0.1))
    with pytest.raises(PlanError, match="builds hessian edits"):
        technique.build(spatial, LayerEdit(layer="spatial", technique="tucker", ranks=(2, 2)))
    with pytest.raises(PlanError, match="at most its channels"):
        technique.build(spatial, LayerEdit(layer="spatial", technique="hessian", ranks=(4, 2)))
    with pytest.raises(PlanError, match="no K-FAC statistics"):
        Hessian({}).build(dense, LayerEdit(layer="dense", technique="hessian", ranks=(2, 2)))


def _called(layer, shape):
    layer(keras.Input(shape))
    return layer


# --- end to end -----------------------------------------------------------------------------


def stripes(n, seed):
    """8×8 images of 4 classes: horizontal, vertical or diagonal stripes, or plain noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    rows, cols = np.mgrid[0:8, 0:8]
    phase = rng.integers(0, 4, n)[:, None, None]
    waves = [np.sin((lines + phase) * np.pi / 2) for lines in (rows, cols, rows + cols)]
    x = 0.5 * rng.standard_normal((n, 8, 8))
    for label in range(3):
        x[y == label] += waves[label][y == label]
    return x[..., None].astype(np.float32), y


def reordered(basis, order_in, order_out):
    """The basis with its directions in another order (build keeps the first ones)."""
    inputs = basis.q_a[:, order_in], basis.lambda_a[order_in]
    outputs = basis.q_g[:, order_out], basis.lambda_g[order_out]
    return EigenBasis(*inputs, *outputs, basis.in_importance[order_in], basis.out_importance[order_out])


@pytest.mark.slow  # trains a small model (~10 s)
def test_kfac_order_prunes_better_than_reverse_or_random_order():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(12, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.Conv2D(12, 3, padding="same", activation="relu", name="c2")(x)
    x = L.Dense(12, activation="relu", name="d1")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="out")(x))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x_train, y_train = stripes(768, seed=0)
    model.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)
    x_test, y_test = stripes(512, seed=1)

    def accuracy(bases, ranks):
        technique = Hessian(bases)
        edits = {
            n: technique.build(model.get_layer(n), LayerEdit(layer=n, technique="hessian", ranks=r))
            for n, r in ranks.items()
        }
        return float((rewrite_model(model, edits).predict(x_test, verbose=0).argmax(1) == y_test).mean())

    base = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert base > 0.9  # trained: the comparison means something
    bases = bases_of(model, x=stripes(256, seed=2)[0])
    ranks = eigendamage_allocate(model, bases, 0.3)
    kfac = accuracy(bases, ranks)
    # The same ranks, keeping the least important directions, or random ones.
    flipped = {n: reordered(b, slice(None, None, -1), slice(None, None, -1)) for n, b in bases.items()}
    rng = np.random.default_rng(3)
    shuffles = [
        {n: reordered(b, rng.permutation(len(b.lambda_a)), rng.permutation(len(b.lambda_g))) for n, b in bases.items()}
        for _ in range(3)
    ]
    randoms = [accuracy(shuffled, ranks) for shuffled in shuffles]
    assert base - kfac < base - accuracy(flipped, ranks)
    assert base - kfac < base - np.mean(randoms)
