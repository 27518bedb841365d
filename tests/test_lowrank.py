"""Low-rank techniques (`compressor.techniques.lowrank`), their costs and the registry.

Parity: replacements are wired by hand into small Functional models and compared
with the original layer on random inputs in [0, 1). Weights are random normal, so
outputs are O(10); float32 arithmetic through two or three layers instead of one
differs by ~1e-6 relative, hence atol 1e-4.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.graph.cost import model_cost  # noqa: E402
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec  # noqa: E402
from compressor.techniques.base import (  # noqa: E402
    call_shapes,
    edit_cost,
    effective_kernel,
    kept_count,
    layer_cost,
    reconstruction_error,
)
from compressor.techniques.lowrank import SVD, Tucker  # noqa: E402
from compressor.techniques.registry import DEFAULT_REGISTRY as TECHNIQUES  # noqa: E402
from compressor.techniques.registry import technique_for  # noqa: E402
from compressor.techniques.sparsity import Sparsity  # noqa: E402

L = keras.layers
ATOL = 1e-4


def called(layer, input_shape, seed=0):
    """`layer` called on an Input of `input_shape`, with random normal weights."""
    layer(keras.Input(input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def wire(x, replacement):
    """Apply a replacement as the rewriter does: chain, + branch, then activation."""
    y = x
    for piece in replacement.chain:
        y = piece.layer(y)
    if replacement.branch is not None:
        y = L.Add()([y, replacement.branch.layer(x)])
    if replacement.activation is not None:
        y = L.Activation(replacement.activation)(y)
    return y


def replacement_model(input_shape, replacement):
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, wire(inputs, replacement))
    for piece in replacement.chain + ([replacement.branch] if replacement.branch else []):
        piece.layer.set_weights(piece.weights)
    return model


def outputs_of(layer_or_model, input_shape, seed=1):
    x = np.random.default_rng(seed).random((2, *input_shape), dtype=np.float32)
    return np.asarray(layer_or_model(x))


# --- parity at full rank ----------------------------------------------------------------

TUCKER_CASES = {
    "stride2_same_relu": (lambda: L.Conv2D(5, 3, strides=2, padding="same", activation="relu"), (9, 9, 3)),
    "dilated_valid": (lambda: L.Conv2D(5, 3, dilation_rate=2), (11, 11, 3)),
    "rect_same_no_bias": (lambda: L.Conv2D(6, (3, 2), padding="same", use_bias=False), (8, 8, 4)),
}


@pytest.mark.parametrize("case", sorted(TUCKER_CASES))
def test_tucker_full_rank_reproduces_the_conv(case):
    make, shape = TUCKER_CASES[case]
    layer = called(make(), shape)
    edit = LayerEdit(layer.name, "tucker", ranks=(shape[-1], layer.filters))
    replacement = Tucker().build(layer, edit)
    assert [p.layer.name for p in replacement.chain] == [f"{layer.name}_tucker_{s}" for s in ("in", "core", "out")]
    rebuilt = replacement_model(shape, replacement)
    np.testing.assert_allclose(outputs_of(rebuilt, shape), outputs_of(layer, shape), atol=ATOL)


SVD_CASES = {
    "dense_relu": (lambda: L.Dense(4, activation="relu"), (6,)),
    "dense_sequence": (lambda: L.Dense(7), (5, 6)),
    "conv2d_1x1_stride2": (lambda: L.Conv2D(6, 1, strides=2), (8, 8, 4)),
    "conv1d_k3_stride2": (lambda: L.Conv1D(5, 3, strides=2, padding="same", activation="tanh"), (12, 4)),
    "conv1d_k3_causal_dilated": (lambda: L.Conv1D(5, 3, dilation_rate=2, padding="causal"), (12, 4)),
}


@pytest.mark.parametrize("case", sorted(SVD_CASES))
def test_svd_full_rank_reproduces_the_layer(case):
    make, shape = SVD_CASES[case]
    layer = called(make(), shape)
    kernel = layer.kernel.shape
    edit = LayerEdit(layer.name, "svd", rank=min(int(np.prod(kernel[:-1])), kernel[-1]))
    replacement = SVD().build(layer, edit)
    assert [p.layer.name for p in replacement.chain] == [f"{layer.name}_svd_in", f"{layer.name}_svd_out"]
    rebuilt = replacement_model(shape, replacement)
    np.testing.assert_allclose(outputs_of(rebuilt, shape), outputs_of(layer, shape), atol=ATOL)


@pytest.mark.parametrize(
    "make, shape, edit",
    [
        (lambda: L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), (9, 9, 6), ("tucker", (3, 2))),
        (lambda: L.Conv1D(6, 3, padding="causal", activation="relu"), (10, 4), ("svd", 2)),
        (lambda: L.Dense(6, activation="relu"), (8,), ("svd", 2)),
    ],
    ids=["tucker_conv2d", "svd_conv1d_causal", "svd_dense"],
)
def test_hybrid_keeps_the_bias_and_moves_the_activation(make, shape, edit):
    layer = called(make(), shape)
    technique, rank = edit
    ranks = {"ranks": rank} if technique == "tucker" else {"rank": rank}
    residual = SparsitySpec(0.2)
    replacement = TECHNIQUES[technique].build(layer, LayerEdit(layer.name, technique, residual=residual, **ranks))
    last, branch = replacement.chain[-1], replacement.branch
    assert last.layer.use_bias and np.array_equal(last.weights[-1], layer.bias.numpy())
    assert last.layer.get_config()["activation"] == "linear" and replacement.activation == "relu"
    assert branch.layer.name == f"{layer.name}_residual" and not branch.layer.use_bias
    config, original = branch.layer.get_config(), layer.get_config()
    for key in ("kernel_size", "strides", "padding", "dilation_rate"):
        assert config.get(key) == original.get(key)
    assert np.count_nonzero(branch.weights[0]) == kept_count(layer.kernel.shape, residual)
    # The wired layers compute the original layer with the effective kernel Ŵ.
    reference = called(make(), shape)
    reference.set_weights([effective_kernel(layer, replacement).astype("float32"), layer.bias.numpy()])
    np.testing.assert_allclose(
        outputs_of(replacement_model(shape, replacement), shape), outputs_of(reference, shape), atol=ATOL
    )


def test_builds_are_deterministic_and_keep_the_dtype_policy():
    layer = called(L.Conv2D(8, 3, padding="same", dtype="mixed_float16"), (6, 6, 5))
    edit = LayerEdit(layer.name, "tucker", ranks=(3, 4), residual=SparsitySpec(0.1))
    first, second = Tucker().build(layer, edit), Tucker().build(layer, edit)
    for a, b in zip(first.chain + [first.branch], second.chain + [second.branch]):
        assert a.layer.dtype_policy.name == "mixed_float16"
        for wa, wb in zip(a.weights, b.weights):
            np.testing.assert_array_equal(wa, wb)


# --- reconstruction error ---------------------------------------------------------------


def test_error_falls_strictly_as_rank_rises():
    conv = called(L.Conv2D(8, 3), (6, 6, 8))
    tucker = [reconstruction_error(conv, LayerEdit(conv.name, "tucker", ranks=(r, r))) for r in range(1, 9)]
    assert all(a > b for a, b in zip(tucker, tucker[1:])), tucker
    assert tucker[-1] < 1e-6  # full rank: exact up to float32 weights
    dense = called(L.Dense(8), (12,))
    svd = [reconstruction_error(dense, LayerEdit(dense.name, "svd", rank=r)) for r in range(1, 9)]
    assert all(a > b for a, b in zip(svd, svd[1:])), svd
    assert svd[-1] < 1e-6


@pytest.mark.parametrize(
    "residual",
    [SparsitySpec(0.1), SparsitySpec(0.25, "filter"), SparsitySpec(0.5, "n:m", n=2, m=4)],
    ids=["unstructured", "filter", "2:4"],
)
def test_hybrid_error_is_lower_and_the_residual_has_the_pattern(residual):
    conv = called(L.Conv2D(8, 3, padding="same"), (6, 6, 8))
    plain = LayerEdit(conv.name, "tucker", ranks=(3, 3))
    hybrid = LayerEdit(conv.name, "tucker", ranks=(3, 3), residual=residual)
    replacement = Tucker().build(conv, hybrid)
    assert reconstruction_error(conv, hybrid, replacement) < reconstruction_error(conv, plain) - 0.01
    assert replacement.notes["reconstruction_error"] == pytest.approx(
        reconstruction_error(conv, hybrid, replacement), abs=1e-6
    )
    sparse = replacement.branch.weights[0]
    assert np.count_nonzero(sparse) == kept_count(sparse.shape, residual)
    if residual.structure == "filter":
        assert np.count_nonzero(np.abs(sparse).sum(axis=(0, 1, 2))) == 2  # 0.25 of 8 filters
    if residual.structure == "n:m":
        per_group = np.count_nonzero(sparse.reshape(3, 3, 2, 4, 8), axis=3)
        assert (per_group == 2).all()


# --- costs ------------------------------------------------------------------------------


def test_edit_cost_against_hand_arithmetic():
    # Conv2D 3x3, 6 -> 8, stride 2 'same', relu, on 16x16: output 8x8x8 (512 elements).
    conv = called(L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), (16, 16, 6))
    # Tucker (3, 4): in 1x1 6->3 at 16x16 (256 positions); core 3x3 3->4 and out 1x1
    # 4->8 at 8x8 (64 positions); + bias and relu on 512 outputs.
    params = 6 * 3 + 9 * 3 * 4 + 4 * 8 + 8
    flops = 2 * 256 * 6 * 3 + 2 * 64 * 9 * 3 * 4 + 2 * 64 * 4 * 8 + 512 + 512
    assert edit_cost(conv, LayerEdit(conv.name, "tucker", ranks=(3, 4))) == (params, flops) == (166, 28160)
    # + a residual keeping round(0.1 * 432) = 43 weights: 43 params, 2*64*43 FLOPs, 512 for the Add.
    hybrid = LayerEdit(conv.name, "tucker", ranks=(3, 4), residual=SparsitySpec(0.1))
    assert edit_cost(conv, hybrid) == (166 + 43, 28160 + 2 * 64 * 43 + 512)
    # Dense 10 -> 4 with bias, rank 2: 10*2 + 2*4 + 4 params; 2*(20 + 8) + 4 FLOPs.
    dense = called(L.Dense(4), (10,))
    assert edit_cost(dense, LayerEdit(dense.name, "svd", rank=2)) == (32, 60)
    # Conv1D k3, 4 -> 8 on length 20 (18 outputs), rank 2: (3*4 + 8)*2 + 8 params;
    # 2*18*(12 + 8)*2 + 144 (bias) FLOPs.
    conv1d = called(L.Conv1D(8, 3), (20, 4))
    assert edit_cost(conv1d, LayerEdit(conv1d.name, "svd", rank=2)) == (48, 1584)


@pytest.mark.parametrize(
    "make, shape, edit",
    [
        (lambda: L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), (16, 16, 6), ("tucker", (3, 4))),
        (lambda: L.Conv2D(8, 3, dilation_rate=2, use_bias=False), (12, 12, 6), ("tucker", (2, 5))),
        (lambda: L.Conv2D(8, 1, strides=2, activation="relu"), (9, 9, 6), ("svd", 3)),
        (lambda: L.Conv1D(8, 5, padding="same"), (20, 4), ("svd", 2)),
        (lambda: L.Dense(6, activation="relu"), (4, 10), ("svd", 2)),
    ],
)
def test_edit_cost_matches_the_graph_cost_of_the_built_layers(make, shape, edit):
    layer = called(make(), shape)
    technique, rank = edit
    edit = LayerEdit(layer.name, technique, **({"ranks": rank} if technique == "tucker" else {"rank": rank}))
    cost = model_cost(replacement_model(shape, TECHNIQUES[technique].build(layer, edit)))
    assert edit_cost(layer, edit) == (cost.params, cost.flops)


def test_options_lower_params_and_flops_from_light_to_heavy():
    cases = [
        (Tucker(), called(L.Conv2D(32, 3, padding="same"), (8, 8, 16)), None),
        (Tucker(), called(L.Conv2D(16, 3, strides=2), (9, 9, 3)), None),  # a stem: R1 <= 3
        (Tucker(), called(L.Conv2D(16, 3, padding="same"), (8, 8, 16)), SparsitySpec(1.0, "block", block_size=(4, 4))),
        (SVD(), called(L.Dense(24), (32,)), None),
        (SVD(), called(L.Conv1D(16, 3), (10, 8)), SparsitySpec(1.0, "n:m", n=1, m=4)),
    ]
    for technique, layer, residual in cases:
        edits = technique.options(layer, residual)
        assert edits, layer.name
        shapes = call_shapes(layer)
        params, flops = layer_cost(layer, *shapes)
        costs = [edit_cost(layer, edit, *shapes) for edit in edits]
        assert all(p < params and f < flops for p, f in costs)
        assert costs == sorted(costs, reverse=True)
        assert all((edit.residual is not None) == (residual is not None) for edit in edits)
        assert len({edit.to_dict().__repr__() for edit in edits}) == len(edits)
        for edit in edits:
            assert min(edit.ranks or (edit.rank,)) >= 1


def test_check_gives_reasons():
    assert Tucker().check(called(L.Conv2D(8, 3, groups=2), (6, 6, 4))) == "grouped convolution (groups=2)"
    assert SVD().check(called(L.Conv2D(8, 1, groups=4), (6, 6, 4))) == "grouped convolution (groups=4)"
    norm = called(L.BatchNormalization(), (6, 6, 4))
    assert Tucker().check(norm) == SVD().check(norm) == "has no kernel to factorize"
    assert Sparsity().check(norm) == "has no kernel to mask"
    assert Tucker().check(called(L.Conv2D(8, 1), (6, 6, 4))) == "kernel is 1x1: use svd"
    assert SVD().check(called(L.Conv2D(8, (3, 1)), (6, 6, 4))) == "kernel is 3x1: use tucker"
    assert "use svd" in Tucker().check(called(L.Dense(8), (4,)))
    assert "DepthwiseConv2D" in Tucker().check(called(L.DepthwiseConv2D(3), (6, 6, 4)))
    # Tiny layers: rank 1 already costs as much as the layer.
    assert SVD().check(called(L.Dense(1), (2,))) == "factorizing cannot lower its cost"
    assert Tucker().check(called(L.Conv2D(1, 3), (6, 6, 1))) == "factorizing cannot lower its cost"
    assert Tucker().check(called(L.Conv2D(8, 3), (6, 6, 4))) is None


def test_build_refuses_edits_that_do_not_fit():
    conv = called(L.Conv2D(8, 3), (6, 6, 4))
    with pytest.raises(PlanError, match=r"at most its channels \(in=4, out=8\)"):
        Tucker().build(conv, LayerEdit(conv.name, "tucker", ranks=(5, 8)))
    with pytest.raises(PlanError, match="kernel is 3x3: use tucker"):
        SVD().build(conv, LayerEdit(conv.name, "svd", rank=2))
    dense = called(L.Dense(6), (10,))
    with pytest.raises(PlanError, match="at most min"):
        SVD().build(dense, LayerEdit(dense.name, "svd", rank=7))
    with pytest.raises(PlanError, match="does not divide"):
        SVD().build(dense, LayerEdit(dense.name, "svd", rank=2, residual=SparsitySpec(0.5, "block", block_size=(4, 4))))


# --- registry ---------------------------------------------------------------------------


def test_technique_for_maps_user_names_to_layers():
    conv = called(L.Conv2D(16, 3), (8, 8, 8))
    pointwise = called(L.Conv2D(16, 1), (8, 8, 8))
    dense = called(L.Dense(16), (32,))
    depthwise = called(L.DepthwiseConv2D(3), (8, 8, 8))
    norm = called(L.BatchNormalization(), (8, 8, 8))
    choice = technique_for(conv, {"tucker"})
    assert (choice.technique.name, choice.residual) == ("tucker", False)
    assert technique_for(conv, {"tucker", "sparsity"}).residual is True
    assert technique_for(pointwise, {"tucker"}).technique.name == "svd"
    assert technique_for(dense, ["tucker", "sparsity"]).technique.name == "svd"
    assert technique_for(conv, {"sparsity"}).technique.name == "sparsity"
    assert technique_for(depthwise, {"tucker", "sparsity"}).technique.name == "sparsity"
    skipped = technique_for(depthwise, {"tucker"})
    assert skipped.technique is None and "DepthwiseConv2D" in skipped.reason
    assert technique_for(conv, {"svd"}).reason == "kernel is 3x3: use tucker"
    assert technique_for(norm, {"tucker", "sparsity"}).reason == "has no kernel to factorize"
    with pytest.raises(PlanError, match="Expected auto or some of"):
        technique_for(conv, {"tuker"})


def test_free_spatial_dimensions_are_costed_at_the_nominal_size():
    layer = called(L.Conv2D(8, 3, strides=2, padding="same"), (None, None, 4))
    assert call_shapes(layer) == ((1, 32, 32, 4), (1, 16, 16, 8))
    edit = LayerEdit(layer.name, "tucker", ranks=(2, 4))
    assert edit_cost(layer, edit) == edit_cost(layer, edit, (None, 32, 32, 4), (None, 16, 16, 8))
    assert Tucker().options(layer)
