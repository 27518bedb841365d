"""Low-rank compression of the layers deploy models hold: separable convolutions (their
pointwise kernel) and recurrent layers (their input and recurrent kernels, also both
directions of a Bidirectional), data-free to a 0.5 params budget, exported with parity;
recurrent FLOPs against hand counts; and a reason for every layer with weights that no
technique edits.

Tolerances: 1e-4 for artifacts, the default `atol` every artifact is verified against
(float32 outputs of these tiny models move by ~1e-7 in LiteRT and onnxruntime); 1e-5 for
Keras against Keras with the same (composed) kernels, where only the summation order
differs; 1e-6 relative for errors computed two ways in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import _keras
from test_export_layers import build_encoder, build_kws

ATOL = 1e-4


def build_separable():
    """An Xception-style block: separable convolutions (one with depth_multiplier 2), a 1x1 shortcut, batch norm."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    y = layers.SeparableConv2D(64, 3, padding="same", activation="relu")(x)
    y = layers.BatchNormalization()(layers.SeparableConv2D(64, 3, padding="same", use_bias=False)(y))
    x = layers.Add()([layers.Conv2D(64, 1)(x), y])
    x = layers.SeparableConv2D(96, 3, strides=2, padding="same", depth_multiplier=2, name="separable_out")(x)
    outputs = layers.Dense(5, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="separable")


def build_wide_kws():
    """LSTM -> GRU -> Dense on 49 frames of 10 MFCCs, 32 units: the recurrent kernels hold most params."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((49, 10))
    x = layers.GRU(32, name="gru")(layers.LSTM(32, return_sequences=True, name="lstm")(inputs))
    return keras.Model(inputs, layers.Dense(12, activation="softmax")(x), name="kws32")


def build_bidirectional_gru(kind="GRU", merge_mode="sum", return_sequences=True):
    """A Bidirectional recurrent layer (24 units a direction) on 20 frames of 10 features -> Dense."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((20, 10))
    rnn = getattr(layers, kind)(24, return_sequences=return_sequences)
    x = layers.Bidirectional(rnn, merge_mode=merge_mode, name="bi")(inputs)
    if return_sequences:
        x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(4)(x), name="bidirectional_rnn")


def _compress(model, out, export=("tflite", "onnx"), **options):
    import compressor

    return compressor.compress(model, out=out, method="fixed_params", compression_factor=0.5, export=export,
                               runs=1, warmup=0, **options)


@pytest.mark.parametrize(
    "build, replaced",
    [(build_separable, "SeparableConv2D"), (build_wide_kws, "RNN"), (build_bidirectional_gru, "Bidirectional")],
)
def test_family_compresses_data_free_to_half_the_params_and_exports_with_parity(tmp_path, build, replaced):
    from compressor.io.models import load_model

    model = build()
    result = _compress(model, tmp_path / "out", export=("tflite", "onnx", "keras"))
    budget = result.report["budget"]
    assert result.status == "ok" and budget["met"] and budget["search_achieved"] <= 0.5
    assert result.model.count_params() <= 0.5 * model.count_params()
    assert {a["format"] for a in result.report["artifacts"]} == {"tflite", "onnx", "keras"}
    for artifact in result.report["artifacts"]:
        assert artifact["max_abs_diff"] <= ATOL, artifact
    loaded = load_model(tmp_path / "out" / "model.keras")  # the low-rank cells load back
    x = np.random.default_rng(3).normal(size=(2, *model.input_shape[1:])).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0))
    # The family's own layers were factorized, not only the Dense/1x1 ones around them.
    edited = [layer for layer in result.model.layers if layer.name.endswith("_svd_in") or layer.name.endswith("_svd")]
    assert any(type(layer).__name__ == replaced for layer in edited)


def test_factorized_separable_convolution_keeps_its_depthwise_kernel():
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.base import reconstruction_error
    from compressor.techniques.registry import DEFAULT_REGISTRY

    model = build_separable()
    layer = model.get_layer("separable_out")  # depth_multiplier 2, stride 2: pointwise (1, 1, 128, 96)
    svd = DEFAULT_REGISTRY["svd"]
    assert svd.applies(layer) is None and DEFAULT_REGISTRY["tucker"].applies(layer) is not None
    edit = LayerEdit(layer.name, "svd", {"rank": 24, "residual": None})
    replacement = svd.build(layer, edit)
    first, second = (piece.layer for piece in replacement.chain)
    assert type(first).__name__ == "SeparableConv2D" and first.filters == 24 and first.strides == (2, 2)
    assert type(second).__name__ == "Conv2D" and second.kernel_size == (1, 1) and second.use_bias
    np.testing.assert_array_equal(replacement.chain[0].weights[0], np.asarray(layer.depthwise_kernel))
    # Error priced from singular values alone == error of the built layers.
    (priced,) = svd.kernel_errors(layer, [edit])
    assert abs(priced - reconstruction_error(layer, edit, replacement)) <= 1e-6 * max(priced, 1e-12)
    # Rewritten = original with the composed pointwise kernel.
    rewritten = rewrite_model(model, {layer.name: replacement})
    keras = _keras()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    u, s, vt = np.linalg.svd(np.asarray(layer.pointwise_kernel, np.float64)[0, 0], full_matrices=False)
    approx = (u[:, :24] * s[:24]) @ vt[:24]
    reference.get_layer(layer.name).pointwise_kernel.assign(approx[None, None].astype(np.float32))
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5)
    cost = svd.cost(layer, edit, (1, 8, 8, 64), (1, 4, 4, 96))
    depthwise = 3 * 3 * 64 * 2
    assert cost[0] == depthwise + 24 * (128 + 96) + 96  # depthwise, the two factors, the bias


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_low_rank_cell_computes_the_layer_with_composed_kernels(kind):
    """Both kernels factorized: the same outputs as the Keras layer with kernels A·B."""
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.registry import DEFAULT_REGISTRY
    from compressor.techniques.recurrent import composed, kernels

    keras = _keras()
    inputs = keras.Input((12, 6))
    x = getattr(keras.layers, kind)(16, return_sequences=True, name="rnn")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    layer = model.get_layer("rnn")
    replacement = DEFAULT_REGISTRY["svd"].build(layer, LayerEdit("rnn", "svd", {"rank": 2, "residual": None}))
    assert replacement.notes["input_rank"] == 2 and replacement.notes["recurrent_rank"] == 2
    rewritten = rewrite_model(model, {"rnn": replacement})
    stacked = composed(layer, replacement.chain[0].weights)
    w_rows = kernels(layer)[0].shape[0]
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.get_layer("rnn").cell.kernel.assign(stacked[:w_rows].astype(np.float32))
    reference.get_layer("rnn").cell.recurrent_kernel.assign(stacked[w_rows:].astype(np.float32))
    x = np.random.default_rng(1).normal(size=(3, 12, 6)).astype(np.float32)
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5)
    assert rewritten.get_layer("rnn_svd").count_params() < layer.count_params()


def test_a_kernel_is_kept_whole_where_its_factors_would_be_larger():
    from compressor.surgery.plan import LayerEdit
    from compressor.techniques.registry import DEFAULT_REGISTRY

    model = build_kws()  # LSTM(16) on 10 features: input kernel 10x64, rank 12 factors (10+64)*12 > 640
    layer = model.get_layer(index=1)
    replacement = DEFAULT_REGISTRY["svd"].build(layer, LayerEdit(layer.name, "svd", {"rank": 12, "residual": None}))
    assert replacement.notes["input_rank"] is None and replacement.notes["recurrent_rank"] == 12
    shapes = [np.shape(w) for w in replacement.chain[0].weights]
    assert shapes == [(10, 64), (16, 12), (12, 64), (64,)]


def test_recurrent_flops_match_a_hand_count():
    from compressor.graph.cost import model_cost

    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((49, 10))
    x = layers.LSTM(16, return_sequences=True, name="lstm")(inputs)
    x = layers.GRU(16, return_sequences=True, name="gru")(x)
    x = layers.SimpleRNN(8, return_sequences=True, name="rnn")(x)
    x = layers.Bidirectional(layers.LSTM(4), name="bi")(x)
    model = keras.Model(inputs, x)
    flops = {layer.name: layer.flops for layer in model_cost(model).layers}
    # Per step: 2·(Cin + u)·G·u for the products, G·u to add them, G·u per bias, then the gate arithmetic.
    lstm = 49 * (2 * (10 + 16) * 64 + 64 + 64 + 9 * 16)  # G·u = 64; i, f, g, o, f·c + i·g, o·tanh(c)
    gru = 49 * (2 * (16 + 16) * 48 + 48 + 2 * 48 + 8 * 16)  # two biases (reset_after)
    rnn = 49 * (2 * (16 + 8) * 8 + 8 + 8 + 8)
    bi = 2 * 49 * (2 * (8 + 4) * 16 + 16 + 16 + 9 * 4)  # both directions
    assert (flops["lstm"], flops["gru"], flops["rnn"], flops["bi"]) == (lstm, gru, rnn, bi) == (176400, 163856, 19992, 44296)


def test_recurrent_edit_cost_is_the_cost_of_the_layer_it_builds():
    from compressor.graph.flops import layer_flops
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.base import edit_cost
    from compressor.techniques.registry import DEFAULT_REGISTRY

    model = build_wide_kws()
    for name, rank in (("lstm", 4), ("gru", 8)):
        layer = model.get_layer(name)
        edit = LayerEdit(name, "svd", {"rank": rank, "residual": None})
        rewritten = rewrite_model(model, {name: DEFAULT_REGISTRY["svd"].build(layer, edit)})
        new = rewritten.get_layer(f"{name}_svd")
        built = (new.count_params(), layer_flops(new, [tuple(new.input.shape)], [tuple(new.output.shape)]))
        assert edit_cost(layer, edit) == built
        assert built[1] < layer_flops(layer, [tuple(layer.input.shape)], [tuple(layer.output.shape)])


def _evaluator_matches_rewrite(model, layer, rank, x):
    """The evaluator's output error with an svd edit of `layer` equals the rewritten model's (rel 1e-3),
    and the evaluator's model is the original again afterwards."""
    from compressor.io.data import Dataset
    from compressor.search.evaluate import Evaluator
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.registry import DEFAULT_REGISTRY

    reference = model.predict(x, verbose=0)
    evaluator = Evaluator(model, Dataset(x, reference.argmax(-1), "own labels"))
    edit = LayerEdit(layer, "svd", {"rank": rank, "residual": None})
    measured = evaluator.measure([edit]).output_error
    rewritten = rewrite_model(model, {layer: DEFAULT_REGISTRY["svd"].build(model.get_layer(layer), edit)})
    outputs = rewritten.predict(x, verbose=0).astype(np.float64)
    expected = np.sum((outputs - reference) ** 2) / np.sum(reference.astype(np.float64) ** 2)
    assert expected > 1e-8  # the edit moves the outputs, so the comparison means something
    assert measured == pytest.approx(expected, rel=1e-3)
    np.testing.assert_allclose(evaluator.measure().output_error, 0.0, atol=1e-12)  # the kernels were put back


def test_evaluator_sets_both_kernels_of_a_recurrent_edit():
    """Under fixed_loss the evaluator's model with a recurrent edit = the rewritten model."""
    x = np.random.default_rng(2).normal(size=(16, 49, 10)).astype(np.float32)
    _evaluator_matches_rewrite(build_wide_kws(), "gru", 4, x)


def test_every_skipped_layer_with_weights_has_a_reason(tmp_path):
    model = build_encoder()  # low rank only: with the default, channel removal would take the attention's heads
    result = _compress(model, tmp_path / "out", export=("keras",), techniques=("tucker",))
    layers = result.report["layers"]
    with_weights = {layer.name for layer in model.layers if layer.weights}
    assert with_weights <= {entry["name"] for entry in layers}
    skipped = [entry for entry in layers if entry["technique"] == "skipped"]
    assert skipped and all(entry["reason"].strip() for entry in skipped)
    attention = next(entry for entry in layers if entry["name"].startswith("multi_head_attention"))
    assert attention["technique"] == "skipped" and "EinsumDense" in attention["reason"]


BIDIRECTIONAL_VARIANTS = [("LSTM", "concat", False), ("GRU", "sum", True), ("SimpleRNN", "ave", True)]


def _low_rank_kernels(layer, rank, seed=4):
    """Give each direction's W and U rank `rank` (products of random factors), so a rank-`rank` SVD is exact."""
    rng = np.random.default_rng(seed)
    for side in (layer.forward_layer, layer.backward_layer):
        for variable in (side.cell.kernel, side.cell.recurrent_kernel):
            rows, cols = variable.shape
            left, right = rng.normal(size=(rows, rank)), rng.normal(size=(rank, cols))
            variable.assign((left @ right / np.sqrt(rows * rank)).astype(np.float32))


@pytest.mark.parametrize("kind, merge_mode, return_sequences", BIDIRECTIONAL_VARIANTS)
def test_factorized_bidirectional_computes_the_original_at_the_kernels_rank(kind, merge_mode, return_sequences):
    """Kernels of rank 3, edit of rank 3: all four kernels factored, outputs within 1e-5 of the original."""
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.registry import DEFAULT_REGISTRY

    model = build_bidirectional_gru(kind, merge_mode, return_sequences)
    layer = model.get_layer("bi")
    _low_rank_kernels(layer, 3)
    replacement = DEFAULT_REGISTRY["svd"].build(layer, LayerEdit("bi", "svd", {"rank": 3, "residual": None}))
    assert replacement.notes["input_rank"] == 3 and replacement.notes["recurrent_rank"] == 3
    assert replacement.notes["reconstruction_error"] < 1e-6
    rewritten = rewrite_model(model, {"bi": replacement})
    new = rewritten.get_layer("bi_svd")
    assert type(new).__name__ == "Bidirectional" and new.merge_mode == merge_mode
    assert [type(side).__name__ for side in (new.forward_layer, new.backward_layer)] == ["RNN", "RNN"]
    assert (new.forward_layer.go_backwards, new.backward_layer.go_backwards) == (False, True)
    assert new.return_sequences == return_sequences
    assert new.count_params() < layer.count_params()
    x = np.random.default_rng(5).normal(size=(3, 20, 10)).astype(np.float32)
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_bidirectional_edit_is_both_directions_with_their_own_factors():
    """Rank 2 of random kernels: the rewritten model = the original with each direction's kernels set to
    its own composed factors (`assign_searched_kernel` of `composed`), within 1e-5."""
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.base import reconstruction_error
    from compressor.techniques.recurrent import assign_searched_kernel, composed, searched_kernel
    from compressor.techniques.registry import DEFAULT_REGISTRY

    keras = _keras()
    model = build_bidirectional_gru("LSTM", "concat", False)
    layer = model.get_layer("bi")
    edit = LayerEdit("bi", "svd", {"rank": 2, "residual": None})
    replacement = DEFAULT_REGISTRY["svd"].build(layer, edit)
    stacked = composed(layer, replacement.chain[0].weights)
    assert stacked.shape == searched_kernel(layer).shape == (10 + 24, 2 * 4 * 24)  # [W; U] forward | backward
    errors = DEFAULT_REGISTRY["svd"].kernel_errors(layer, [edit])
    assert errors[0] == pytest.approx(reconstruction_error(layer, edit, replacement), rel=1e-6)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    assign_searched_kernel(reference.get_layer("bi"), stacked.astype(np.float32))
    np.testing.assert_allclose(searched_kernel(reference.get_layer("bi")), stacked, atol=1e-6)
    rewritten = rewrite_model(model, {"bi": replacement})
    x = np.random.default_rng(6).normal(size=(3, 20, 10)).astype(np.float32)
    outputs = rewritten.predict(x, verbose=0)
    assert np.max(np.abs(outputs - model.predict(x, verbose=0))) > 1e-4  # rank 2 moves the outputs
    np.testing.assert_allclose(outputs, reference.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("kind, merge_mode, return_sequences", BIDIRECTIONAL_VARIANTS)
def test_bidirectional_edit_cost_is_the_cost_of_the_layer_it_builds(kind, merge_mode, return_sequences):
    from compressor.graph.flops import layer_flops
    from compressor.surgery.plan import LayerEdit
    from compressor.surgery.rewrite import rewrite_model
    from compressor.techniques.base import edit_cost
    from compressor.techniques.registry import DEFAULT_REGISTRY

    model = build_bidirectional_gru(kind, merge_mode, return_sequences)
    layer = model.get_layer("bi")
    original = layer_flops(layer, [tuple(layer.input.shape)], [tuple(layer.output.shape)])
    for rank in (2, 6):
        edit = LayerEdit("bi", "svd", {"rank": rank, "residual": None})
        new = rewrite_model(model, {"bi": DEFAULT_REGISTRY["svd"].build(layer, edit)}).get_layer("bi_svd")
        built = (new.count_params(), layer_flops(new, [tuple(new.input.shape)], [tuple(new.output.shape)]))
        assert edit_cost(layer, edit) == built
        assert built[0] < layer.count_params() and built[1] < original


def test_bidirectional_gru_without_reset_after_keeps_its_reason(tmp_path):
    import compressor
    from compressor.techniques.registry import DEFAULT_REGISTRY

    keras = _keras()
    inputs = keras.Input((20, 10))
    x = keras.layers.Bidirectional(keras.layers.GRU(8, reset_after=False), name="bi")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    assert "reset_after=False" in DEFAULT_REGISTRY["svd"].applies(model.get_layer("bi"))
    assert DEFAULT_REGISTRY["svd"].options(model.get_layer("bi")) == []
    listed = {layer.name: layer.techniques for layer in compressor.inspect(model).layers}
    assert listed["bi"] == ()
    assert "svd" in compressor.inspect(build_bidirectional_gru()).layers[1].techniques  # reset_after=True
    rows = {row["name"]: row for row in _compress(model, tmp_path / "out", export=("keras",)).report["layers"]}
    assert rows["bi"]["technique"] == "skipped" and "reset_after=False" in rows["bi"]["reason"]


def test_replayed_plan_of_a_bidirectional_edit_gives_the_same_model(tmp_path):
    import compressor
    from compressor.io.models import load_model

    model = build_bidirectional_gru("LSTM", "concat", False)
    first = _compress(model, tmp_path / "first", export=("keras",))
    assert any(type(layer).__name__ == "Bidirectional" and layer.name.endswith("_svd") for layer in first.model.layers)
    replayed = compressor.compress(model, out=tmp_path / "replay", plan=tmp_path / "first" / "plan.json",
                                   export=("keras",), runs=1, warmup=0)
    assert replayed.report["compressed"]["params"] == first.report["compressed"]["params"]
    assert replayed.report["compressed"]["flops"] == first.report["compressed"]["flops"]
    for ours, theirs in zip(first.model.get_weights(), replayed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    loaded = load_model(tmp_path / "replay" / "model.keras")
    x = np.random.default_rng(7).normal(size=(2, 20, 10)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), first.model.predict(x, verbose=0))


def test_evaluator_sets_all_four_kernels_of_a_bidirectional_edit():
    """Under fixed_loss the evaluator's model with a Bidirectional edit = the rewritten model (rel 1e-3)."""
    x = np.random.default_rng(8).normal(size=(16, 20, 10)).astype(np.float32)
    _evaluator_matches_rewrite(build_bidirectional_gru("GRU", "concat", False), "bi", 3, x)


def test_bidirectional_of_unlike_directions_is_not_factorized():
    from compressor.techniques.registry import DEFAULT_REGISTRY

    keras = _keras()
    layer = keras.layers.Bidirectional(keras.layers.LSTM(4), backward_layer=keras.layers.LSTM(6, go_backwards=True))
    layer.build((None, 5, 3))
    assert "differ in kind or units" in DEFAULT_REGISTRY["svd"].applies(layer)
    assert DEFAULT_REGISTRY["svd"].options(layer, input_shape=(1, 5, 3)) == []
