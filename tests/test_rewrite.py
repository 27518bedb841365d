"""The surgery engine (`compressor.surgery.rewrite`, `compressor.surgery.editable`).

Replacements are built by hand with numpy. The identity-like ones are exact in real
arithmetic (a kernel times an identity matrix, a branch with a zero kernel), so the
rewritten model matches the original within float32 rounding of a few reordered sums:
atol 1e-5 on outputs of order 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.errors import ModelLoadError  # noqa: E402
from compressor.surgery.editable import editable_layers, why_not_editable  # noqa: E402
from compressor.surgery.plan import PlanError  # noqa: E402
from compressor.surgery.replacement import Piece, Replacement  # noqa: E402
from compressor.surgery.rewrite import rewrite_model  # noqa: E402

L = keras.layers
ATOL = 1e-5


# --- models -------------------------------------------------------------------------------


def seq_with_input():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), name="pixels"),
            L.Conv2D(4, 3, activation="relu", name="conv"),
            L.Flatten(name="flat"),
            L.Dense(5, name="head"),
        ],
        name="seq",
    )


def seq_without_input():
    model = keras.Sequential([L.Dense(16, activation="relu", name="hidden"), L.Dense(3, name="head")], name="mlp")
    model.build((None, 6))
    return model


def residual():
    inputs = keras.Input((8, 8, 4), name="pixels")
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(inputs)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_b")(a)
    x = L.Add(name="add")([a, b])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="residual")


def concat():
    inputs = keras.Input((9, 9, 3), name="pixels")
    a = L.Conv2D(3, 3, padding="same", name="conv_a")(inputs)
    b = L.Conv2D(5, 3, dilation_rate=2, padding="same", activation="relu", name="conv_dilated")(inputs)
    x = L.Concatenate(name="concat")([a, b])
    x = L.Conv2D(4, 3, strides=2, padding="valid", activation="relu", name="conv_strided")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="concat_model")


def nested(kind):
    if kind.startswith("sequential"):
        head = [] if kind == "sequential_without_input" else [keras.Input((8, 8, 3))]
        inner = keras.Sequential(
            [*head, L.Conv2D(4, 3, activation="relu", name="conv"), L.GlobalAveragePooling2D(name="pool")],
            name="inner",
        )  # without an Input, the outer model's call builds it
    else:
        inner_in = keras.Input((8, 8, 3))
        x = L.Conv2D(4, 3, activation="relu", name="conv")(inner_in)
        inner = keras.Model(inner_in, L.GlobalAveragePooling2D(name="pool")(x), name="inner")
    inputs = keras.Input((8, 8, 3), name="pixels")
    x = L.Conv2D(3, 1, name="conv")(inputs)  # same name as inner/conv: only the qualified name tells them apart
    return keras.Model(inputs, L.Dense(3, name="head")(inner(x)), name=f"outer_{kind}")


def shared():
    left, right = keras.Input((6,), name="left"), keras.Input((6,), name="right")
    dense = L.Dense(8, activation="relu", name="shared")
    x = L.Concatenate(name="concat")([dense(left), dense(right)])
    return keras.Model([left, right], L.Dense(2, name="head")(x), name="siamese")


def conv1d():
    inputs = keras.Input((20, 3), name="signal")
    x = L.Conv1D(6, 5, strides=2, activation="relu", name="conv_strided")(inputs)
    x = L.Conv1D(6, 3, dilation_rate=2, padding="causal", name="conv_causal")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="conv1d_model")


def depthwise():
    inputs = keras.Input((8, 8, 4), name="pixels")
    x = L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", activation="relu", name="dw")(inputs)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x), name="depthwise_model")


def sample_inputs(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, *t.shape[1:])).astype("float32") for t in model.inputs]
    return xs if len(xs) > 1 else xs[0]


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x))


# --- replacements, by hand ------------------------------------------------------------------


def same_config(layer, **changes):
    return layer.__class__.from_config({**layer.get_config(), **changes})


def clone_of(layer):
    """The layer itself, again: same config (and name), same weights."""
    return Replacement([Piece(same_config(layer), layer.get_weights())])


def dense_factorization(layer):
    """W = W·I: Dense(W, no bias) then Dense(I, bias, activation)."""
    kernel, bias = layer.get_weights()
    units = kernel.shape[1]
    first = L.Dense(units, use_bias=False, name=f"{layer.name}_u")
    second = L.Dense(units, activation=layer.get_config()["activation"], name=f"{layer.name}_v")
    return Replacement([Piece(first, [kernel]), Piece(second, [np.eye(units, dtype="float32"), bias])])


def split_with_zero_branch(layer):
    """Chain: the layer without activation; branch: a zero kernel; activation after the Add."""
    kernel, *bias = layer.get_weights()
    activation = layer.get_config()["activation"]
    chain = same_config(layer, activation="linear", name=f"{layer.name}_main")
    branch = same_config(layer, activation="linear", use_bias=False, name=f"{layer.name}_residual")
    return Replacement(
        [Piece(chain, [kernel, *bias])],
        branch=Piece(branch, [np.zeros_like(kernel)]),
        activation=None if activation == "linear" else activation,
    )


def zero_kernel(layer):
    """The layer with its kernel zeroed: it outputs activation(bias)."""
    kernel, bias = layer.get_weights()
    return Replacement([Piece(same_config(layer), [np.zeros_like(kernel), bias])])


def identity_sandwich(layer):
    """A Tucker-2-shaped chain that is exact: 1×1 identity → the k×k kernel → 1×1 identity + bias."""
    kernel, *bias = layer.get_weights()
    c_in, c_out = kernel.shape[-2:]
    point = L.Conv1D if isinstance(layer, L.Conv1D) else L.Conv2D
    ones = (1,) * (kernel.ndim - 2)
    first = point(c_in, 1, use_bias=False, name=f"{layer.name}_in")
    core = same_config(layer, activation="linear", use_bias=False, name=f"{layer.name}_core")
    last = point(c_out, 1, activation=layer.get_config()["activation"], use_bias=bool(bias), name=f"{layer.name}_out")
    return Replacement(
        [
            Piece(first, [np.eye(c_in, dtype="float32").reshape(*ones, c_in, c_in)]),
            Piece(core, [kernel]),
            Piece(last, [np.eye(c_out, dtype="float32").reshape(*ones, c_out, c_out), *bias]),
        ]
    )


# --- identity-like rewrites reproduce the original -----------------------------------------

CASES = {
    "sequential_with_input": (seq_with_input, {"conv": clone_of, "head": dense_factorization}),
    "sequential_without_input": (seq_without_input, {"hidden": dense_factorization, "head": clone_of}),
    "residual_add": (residual, {"conv_a": identity_sandwich, "conv_b": split_with_zero_branch}),
    "concatenate": (
        concat,
        {"conv_a": split_with_zero_branch, "conv_dilated": identity_sandwich, "conv_strided": identity_sandwich},
    ),
    "nested_sequential": (lambda: nested("sequential"), {"inner/conv": split_with_zero_branch, "conv": clone_of}),
    "nested_functional": (lambda: nested("functional"), {"inner/conv": identity_sandwich, "head": dense_factorization}),
    "nested_sequential_without_input": (lambda: nested("sequential_without_input"), {"inner/conv": identity_sandwich}),
    "shared_layer": (shared, {"shared": dense_factorization}),
    "conv1d": (conv1d, {"conv_strided": identity_sandwich, "conv_causal": split_with_zero_branch}),
    "depthwise": (depthwise, {"dw": split_with_zero_branch}),
    "strided_clone": (concat, {"conv_strided": clone_of, "conv_dilated": clone_of}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_like_replacements_reproduce_outputs(case):
    build, edits = CASES[case]
    model = build()
    x = sample_inputs(model)
    before = outputs(model, x)
    weights_before = [w.copy() for w in model.get_weights()]

    rewritten = rewrite_model(model, edits)

    np.testing.assert_allclose(outputs(rewritten, x), before, atol=ATOL, rtol=0)
    # The original keeps its outputs, weights and layers.
    np.testing.assert_array_equal(outputs(model, x), before)
    for old, new in zip(weights_before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    # The edited layers are really gone, except where the replacement reuses the name.
    replaced = {name for name, factory in edits.items() if factory is not clone_of}
    assert not replaced & set(editable_layers(rewritten))


def test_rewritten_model_shares_no_variables_with_the_original():
    model = residual()
    x = sample_inputs(model)
    before = outputs(model, x)
    rewritten = rewrite_model(model, {"conv_b": split_with_zero_branch})
    for variable in rewritten.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    np.testing.assert_array_equal(outputs(model, x), before)
    assert not np.any(outputs(rewritten, x))


def test_branch_add_and_moved_activation_are_wired_as_layers():
    rewritten = rewrite_model(residual(), {"conv_b": split_with_zero_branch})
    names = [layer.name for layer in rewritten.layers]
    assert names.index("conv_b_main") < names.index("conv_b_add") < names.index("conv_b_activation")
    assert isinstance(rewritten.get_layer("conv_b_add"), L.Add)
    assert rewritten.get_layer("conv_b_activation").get_config()["activation"] == "relu"
    assert "conv_b" not in names


def test_factories_get_the_original_layer_once_even_when_it_is_shared():
    model = shared()
    seen = []

    def factory(layer):
        seen.append(layer)
        return dense_factorization(layer)

    rewritten = rewrite_model(model, {"shared": factory})
    assert seen == [model.get_layer("shared")]
    # One replacement serves both calls: 6*8 + 8*8 + 8 params instead of 6*8 + 8.
    assert [layer.name for layer in rewritten.layers].count("shared_u") == 1
    assert rewritten.count_params() == model.count_params() - (6 * 8 + 8) + (6 * 8 + 8 * 8 + 8)


def test_sequential_with_an_edit_becomes_functional_with_the_same_name():
    model = seq_with_input()
    edited = rewrite_model(model, {"head": dense_factorization})
    untouched = rewrite_model(model, {})
    assert not isinstance(edited, keras.Sequential) and edited.name == "seq"
    assert edited.layers[0].name == "pixels"
    assert isinstance(untouched, keras.Sequential) and untouched.name == "seq"
    np.testing.assert_array_equal(outputs(untouched, sample_inputs(model)), outputs(model, sample_inputs(model)))


@pytest.mark.parametrize("kind", ["sequential", "sequential_without_input", "functional"])
def test_nested_model_stays_nested_and_only_the_qualified_layer_changes(kind):
    model = nested(kind)
    rewritten = rewrite_model(model, {"inner/conv": zero_kernel})
    inner = rewritten.get_layer("inner")
    assert isinstance(inner, keras.Model)
    np.testing.assert_array_equal(inner.get_layer("conv").get_weights()[0], 0.0)
    for old, new in zip(model.get_layer("conv").get_weights(), rewritten.get_layer("conv").get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert "inner/conv" in editable_layers(rewritten)


# --- non-identity replacements change exactly what they should -----------------------------


def test_zero_kernel_outputs_the_bias_only():
    model = seq_without_input()
    x = sample_inputs(model)
    rewritten = rewrite_model(model, {"head": zero_kernel})
    bias = model.get_layer("head").get_weights()[1]
    np.testing.assert_array_equal(outputs(rewritten, x), np.broadcast_to(bias, (len(x), 3)))


def test_zero_kernel_inside_the_graph_changes_only_that_layer():
    model = seq_without_input()
    x = sample_inputs(model)
    rewritten = rewrite_model(model, {"hidden": zero_kernel})
    hidden_bias = model.get_layer("hidden").get_weights()[1]
    head_kernel, head_bias = model.get_layer("head").get_weights()
    expected = np.maximum(hidden_bias, 0.0) @ head_kernel + head_bias
    np.testing.assert_allclose(outputs(rewritten, x), np.broadcast_to(expected, (len(x), 3)), atol=ATOL, rtol=0)


# --- saving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["residual_add", "nested_sequential", "shared_layer", "sequential_without_input"])
def test_rewritten_model_reloads_with_plain_keras(case, tmp_path):
    build, edits = CASES[case]
    model = build()
    rewritten = rewrite_model(model, edits)
    assert all(type(layer).__module__.startswith("keras.") for layer in _all_layers(rewritten))
    path = tmp_path / "rewritten.keras"
    rewritten.save(path)
    reloaded = keras.saving.load_model(path)
    x = sample_inputs(model)
    np.testing.assert_allclose(outputs(reloaded, x), outputs(rewritten, x), atol=1e-6, rtol=0)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


# --- names ----------------------------------------------------------------------------------


def test_colliding_replacement_names_are_made_unique_deterministically():
    def collide(layer):
        kernel, bias = layer.get_weights()
        units = kernel.shape[1]
        eye = np.eye(units, dtype="float32")
        return Replacement(
            [
                Piece(L.Dense(units, use_bias=False, name="head"), [kernel]),  # taken by the untouched head
                Piece(L.Dense(units, use_bias=False, name="twin"), [eye]),
                Piece(L.Dense(units, activation="relu", name="twin"), [eye, bias]),  # taken by the piece before
            ]
        )

    model = seq_without_input()
    first = rewrite_model(model, {"hidden": collide})
    second = rewrite_model(model, {"hidden": collide})
    names = [layer.name for layer in first.layers]
    assert names[1:] == ["head_1", "twin", "twin_1", "head"]
    assert names == [layer.name for layer in second.layers]
    np.testing.assert_allclose(outputs(first, sample_inputs(model)), outputs(model, sample_inputs(model)), atol=ATOL)


def test_a_built_layer_in_a_replacement_is_copied_not_shared():
    model = seq_without_input()
    head = model.get_layer("head")
    rewritten = rewrite_model(model, {"head": Replacement([Piece(head, head.get_weights())])})
    assert rewritten.get_layer("head") is not head
    assert len(model.layers) == 2 and model.layers[1] is head


# --- what can be edited, and the errors -----------------------------------------------------


def test_editable_layers_and_reasons():
    model = residual()
    editable = editable_layers(model)
    assert list(editable) == ["conv_a", "conv_b", "pool", "head"]
    assert editable["conv_b"] is model.get_layer("conv_b")
    assert why_not_editable(model, "conv_b") is None
    assert "2 tensor inputs" in why_not_editable(model, "add")
    assert "input layer" in why_not_editable(model, "pixels")
    assert why_not_editable(model, "nope") == "no layer of that name"
    outer = nested("functional")
    assert {"conv", "inner/conv", "inner/pool", "head"} <= set(editable_layers(outer))
    assert "nested model" in why_not_editable(outer, "inner")


def test_unknown_names_raise_a_plan_error_listing_valid_ones():
    with pytest.raises(PlanError, match=r"unknown layer name\(s\).*'nope', 'inner/nope'.*'conv_a'"):
        rewrite_model(residual(), {"nope": clone_of, "inner/nope": clone_of, "conv_a": clone_of})


def test_layers_that_cannot_be_replaced_raise_a_plan_error_with_the_reason():
    with pytest.raises(PlanError, match=r"'add' \(Add takes 2 tensor inputs"):
        rewrite_model(residual(), {"add": clone_of})
    with pytest.raises(PlanError, match=r"'inner' \(a nested model"):
        rewrite_model(nested("sequential"), {"inner": clone_of})


def test_weight_shape_mismatch_names_the_layer_and_both_shapes():
    def wrong(layer):
        return Replacement([Piece(L.Dense(16, name="bad"), [np.zeros((5, 16), "float32"), np.zeros(16, "float32")])])

    with pytest.raises(PlanError, match=r"'hidden'.*'bad'.*\[\(6, 16\), \(16,\)\].*\[\(5, 16\), \(16,\)\]"):
        rewrite_model(seq_without_input(), {"hidden": wrong})


def test_output_shape_mismatch_and_bad_wiring_are_plan_errors():
    narrow = Replacement([Piece(L.Dense(4, name="narrow"), [np.zeros((6, 4), "float32"), np.zeros(4, "float32")])])
    with pytest.raises(PlanError, match=r"'hidden' outputs shape \(None, 4\); the layer outputs \(None, 16\)"):
        rewrite_model(seq_without_input(), {"hidden": narrow})
    mismatched_branch = Replacement(
        [Piece(L.Dense(16, name="main"), [np.zeros((6, 16), "float32"), np.zeros(16, "float32")])],
        branch=Piece(L.Dense(3, name="side"), [np.zeros((6, 3), "float32"), np.zeros(3, "float32")]),
    )
    with pytest.raises(PlanError, match=r"replacement of layer 'hidden' cannot be wired"):
        rewrite_model(seq_without_input(), {"hidden": mismatched_branch})


def test_invalid_replacements_are_plan_errors():
    with pytest.raises(PlanError, match="must be a Replacement"):
        rewrite_model(seq_without_input(), {"head": lambda layer: [layer]})
    with pytest.raises(PlanError, match="empty chain"):
        rewrite_model(seq_without_input(), {"head": Replacement([])})
    model = seq_without_input()
    with pytest.raises(PlanError, match="invalid activation"):
        rewrite_model(model, {"head": Replacement(clone_of(model.get_layer("head")).chain, activation="nope")})


def test_models_without_a_graph_are_refused():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ModelLoadError, match="no layer graph"):
        rewrite_model(model, {})
