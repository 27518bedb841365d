"""Sparsity masks and the masking technique (`compressor.techniques.sparsity`).

Masks are checked on constructed kernels whose right answer is known by design;
the n:m mask also against tfmot's `generate_m_by_n_mask`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec  # noqa: E402
from compressor.techniques.base import (  # noqa: E402
    call_shapes,
    edit_cost,
    kept_count,
    layer_cost,
    reconstruction_error,
)
from compressor.techniques.sparsity import Sparsity, mask  # noqa: E402

L = keras.layers


def called(layer, input_shape, seed=0):
    layer(keras.Input(input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def random_kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- masks ------------------------------------------------------------------------------


def test_unstructured_keeps_the_largest_magnitudes():
    weights = np.array([[0.1, -0.9, 0.3], [-0.5, 0.2, 0.8]])
    keep = mask(weights, SparsitySpec(0.5))  # round(0.5 * 6) = 3: |-0.9|, 0.8, |-0.5|
    np.testing.assert_array_equal(keep, [[False, True, False], [True, False, True]])


def test_ties_go_to_the_lower_index():
    keep = mask(np.ones((2, 4)), SparsitySpec(0.25))
    np.testing.assert_array_equal(keep, [[True, True, False, False], [False] * 4])
    keep = mask(np.ones((3, 3, 4, 2)), SparsitySpec(0.5, "n:m", n=2, m=4))
    assert keep[..., :2, :].all() and not keep[..., 2:, :].any()


def test_filter_keeps_the_filters_with_the_largest_norms():
    kernel = random_kernel((3, 3, 4, 6))
    scale = np.array([1.0, 5.0, 0.5, 3.0, 0.1, 4.0])  # norms rank filters 1, 5, 3 first
    keep = mask(kernel * scale, SparsitySpec(0.5, "filter"))
    assert np.array_equal(keep.all(axis=(0, 1, 2)), keep.any(axis=(0, 1, 2)))  # whole filters
    np.testing.assert_array_equal(np.flatnonzero(keep.all(axis=(0, 1, 2))), [1, 3, 5])


def test_channel_keeps_the_input_channels_with_the_largest_norms():
    kernel = random_kernel((3, 3, 5, 4))
    scale = np.array([0.1, 2.0, 0.2, 3.0, 1.0])[:, None]
    keep = mask(kernel * scale, SparsitySpec(0.4, "channel"))  # round(2.0) channels: 3, 1
    np.testing.assert_array_equal(np.flatnonzero(keep.all(axis=(0, 1, 3))), [1, 3])
    assert keep.sum() == 2 * 3 * 3 * 4


def test_block_keeps_the_strongest_blocks():
    weights = np.full((8, 6), 0.01)
    weights[2:4, 3:6] = 1.0  # block (1, 1) of the 4x2 grid of 2x3 blocks
    weights[6:8, 0:3] = -2.0  # block (3, 0)
    keep = mask(weights, SparsitySpec(0.25, "block", block_size=(2, 3)))  # 2 of 8 blocks
    np.testing.assert_array_equal(keep, np.abs(weights) > 0.5)
    with pytest.raises(PlanError, match=r"block size 3x3 does not divide .*in=8, out=6"):
        mask(weights, SparsitySpec(0.25, "block", block_size=(3, 3)))


def test_n_of_m_keeps_exactly_n_per_group_and_agrees_with_tfmot():
    kernel = random_kernel((3, 3, 8, 5))
    keep = mask(kernel, SparsitySpec(0.5, "n:m", n=2, m=4))
    assert (keep.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2).all()
    kept_by_magnitude = np.sort(np.abs(kernel).reshape(3, 3, 2, 4, 5), axis=3)[..., 2:, :]
    np.testing.assert_array_equal(
        np.sort(np.where(keep, np.abs(kernel), 0).reshape(3, 3, 2, 4, 5), axis=3)[..., 2:, :], kept_by_magnitude
    )
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_utils import generate_m_by_n_mask

    dense = random_kernel((16, 6), seed=1)
    # tfmot groups along the last axis and counts zeros: (2, 4) = 2 zeros of every 4.
    expected = np.asarray(generate_m_by_n_mask(dense.T, (2, 4))).T.astype(bool)
    np.testing.assert_array_equal(mask(dense, SparsitySpec(0.5, "n:m", n=2, m=4)), expected)
    with pytest.raises(PlanError, match="divisible by m. Received: in_channels=7"):
        mask(random_kernel((7, 4)), SparsitySpec(0.5, "n:m", n=2, m=4))


def test_scores_replace_magnitudes():
    weights = np.array([[1.0, 2.0, 3.0, 4.0]])
    keep = mask(weights, SparsitySpec(0.5), scores=-np.abs(weights))
    np.testing.assert_array_equal(keep, [[True, True, False, False]])
    with pytest.raises(PlanError, match="shaped like the weights"):
        mask(weights, SparsitySpec(0.5), scores=np.ones(4))


@pytest.mark.parametrize(
    "spec",
    [
        SparsitySpec(0.3),
        SparsitySpec(0.0),
        SparsitySpec(1.0),
        SparsitySpec(0.3, "filter"),
        SparsitySpec(0.3, "channel"),
        SparsitySpec(0.3, "block", block_size=(2, 4)),
        SparsitySpec(0.75, "n:m", n=3, m=4),
    ],
    ids=lambda spec: f"{spec.structure}-{spec.density}",
)
def test_mask_keeps_exactly_kept_count(spec):
    kernel = random_kernel((3, 3, 8, 12))
    assert mask(kernel, spec).sum() == kept_count(kernel.shape, spec)


# --- the technique ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: L.Conv2D(8, 3, activation="relu", name="conv"), (8, 8, 4)),
        (lambda: L.Dense(8, name="dense"), (12,)),
        (lambda: L.Conv1D(8, 3, name="conv1d"), (10, 4)),
        (lambda: L.Conv2DTranspose(8, 3, name="deconv"), (5, 5, 4)),
    ],
)
def test_build_clones_the_layer_with_a_masked_kernel(make, shape):
    layer = called(make(), shape)
    spec = SparsitySpec(0.5, "n:m", n=1, m=2)
    replacement = Sparsity().build(layer, LayerEdit(layer.name, "sparsity", sparsity=spec))
    (piece,) = replacement.chain
    assert replacement.branch is None and replacement.activation is None
    assert piece.layer.name == layer.name and piece.layer.get_config() == layer.get_config()
    kernel, bias = piece.weights
    np.testing.assert_array_equal(bias, layer.bias.numpy())
    assert np.count_nonzero(kernel) == kernel.size // 2
    np.testing.assert_array_equal(kernel[kernel != 0], layer.kernel.numpy()[kernel != 0])
    assert reconstruction_error(layer, LayerEdit(layer.name, "sparsity", sparsity=spec), replacement) == pytest.approx(
        replacement.notes["reconstruction_error"], abs=1e-6
    )


def test_depthwise_filter_sparsity_drops_whole_output_channels():
    layer = called(L.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 3))
    replacement = Sparsity().build(layer, LayerEdit(layer.name, "sparsity", sparsity=SparsitySpec(0.5, "filter")))
    kernel, bias = replacement.chain[0].weights
    per_output = np.abs(kernel).reshape(9, 6).sum(axis=0)  # output channel c*2 + m
    assert np.count_nonzero(per_output) == 3
    inputs = keras.Input((8, 8, 3))
    clone = replacement.chain[0].layer
    model = keras.Model(inputs, clone(inputs))
    clone.set_weights(replacement.chain[0].weights)
    out = np.asarray(model(np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32)))
    dropped = per_output == 0
    np.testing.assert_allclose(out[..., dropped], np.broadcast_to(bias[dropped], out[..., dropped].shape))
    with pytest.raises(PlanError, match="does not apply to depthwise"):
        Sparsity().options(layer, SparsitySpec(0.5, "n:m", n=2, m=4))


def test_separable_masks_the_pointwise_kernel_only():
    layer = called(L.SeparableConv2D(8, 3, padding="same"), (6, 6, 4))
    edit = LayerEdit(layer.name, "sparsity", sparsity=SparsitySpec(0.25))
    depthwise, pointwise, bias = Sparsity().build(layer, edit).chain[0].weights
    np.testing.assert_array_equal(depthwise, layer.depthwise_kernel.numpy())
    assert np.count_nonzero(pointwise) == 8  # round(0.25 * 32)
    np.testing.assert_array_equal(bias, layer.bias.numpy())


def test_edit_cost_against_hand_arithmetic():
    # Conv2D 3x3 2->4 on 6x6: 4x4x4 out (16 positions), kernel 72 + bias 4.
    # Keeping 36 weights: 36 + 4 params; 2*16*36 + 64 (bias) FLOPs.
    conv = called(L.Conv2D(4, 3), (6, 6, 2))
    assert edit_cost(conv, LayerEdit(conv.name, "sparsity", sparsity=SparsitySpec(0.5))) == (40, 1216)
    # Depthwise 3x3 x2 on 8x8x3: 6x6x6 out (36 positions), kernel 54 + bias 6. Filter
    # sparsity 0.5 keeps 3 of 6 output channels (27 weights): 33 params; 2*36*27 + 216.
    depthwise = called(L.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 3))
    edit = LayerEdit(depthwise.name, "sparsity", sparsity=SparsitySpec(0.5, "filter"))
    assert edit_cost(depthwise, edit) == (33, 2160)
    # Separable 3x3 4->8 'same' on 6x6, no bias: depthwise 36 dense, pointwise 32 at
    # 2:4 keeps 16: 52 params; 2*36*4*9 + 2*36*16 FLOPs.
    separable = called(L.SeparableConv2D(8, 3, padding="same", use_bias=False), (6, 6, 4))
    edit = LayerEdit(separable.name, "sparsity", sparsity=SparsitySpec(0.5, "n:m", n=2, m=4))
    assert edit_cost(separable, edit) == (52, 2592 + 1152)
    # Conv2DTranspose 3x3 4->8 on 5x5: each of 25 input positions scatters the kernel
    # (288 weights); keeping 144: 144 + 8 params; 2*25*144 + 7*7*8 (bias) FLOPs.
    deconv = called(L.Conv2DTranspose(8, 3), (5, 5, 4))
    assert edit_cost(deconv, LayerEdit(deconv.name, "sparsity", sparsity=SparsitySpec(0.5))) == (152, 7200 + 392)


def test_options_list_densities_from_light_to_heavy():
    layer = called(L.Conv2D(16, 3, padding="same"), (8, 8, 8))
    shapes = call_shapes(layer)
    params, flops = layer_cost(layer, *shapes)
    edits = Sparsity().options(layer)
    # Lighter masks than 0.7 are not offered: the artifact would store them dense.
    assert [edit.sparsity.density for edit in edits] == [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert all(p < params and f < flops for p, f in (edit_cost(layer, edit, *shapes) for edit in edits))
    (nm,) = Sparsity().options(layer, SparsitySpec(1.0, "n:m", n=2, m=4))
    assert nm.sparsity == SparsitySpec(0.5, "n:m", n=2, m=4)
    # 4 weights: 0.7 keeps 3, 0.6/0.5/0.4 keep 2 and 0.3/0.2 keep 1 (each listed
    # once); 0.1 keeps none (not offered).
    small = called(L.Dense(2), (2,))
    assert [edit.sparsity.density for edit in Sparsity().options(small)] == [0.7, 0.6, 0.3]


def test_check_gives_reasons():
    assert Sparsity().check(called(L.Conv2D(8, 3, groups=2), (6, 6, 4))) is None
    assert Sparsity().check(called(L.Embedding(10, 4), (3,))) == "has no kernel to mask"
    assert "not LSTM" in Sparsity().check(called(L.LSTM(4), (5, 3)))
