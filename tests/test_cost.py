"""Per-layer parameters and FLOPs (`compressor.graph.cost`).

FLOPs are checked against hand arithmetic (written out in each case: 2 per
multiply-accumulate, +1 per output element for a bias add or an activation), totals
against `model.count_params()` and against the TFLite converter's own estimate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from conftest import build_nested, build_residual, build_sequential  # noqa: E402

from compressor.errors import ModelLoadError  # noqa: E402
from compressor.graph.cost import LayerCost, applicable_techniques, model_cost  # noqa: E402

L = keras.layers


def single_layer_flops(layer, *input_shapes):
    """FLOPs of `layer` called once on inputs of these per-sample shapes."""
    inputs = [keras.Input(shape) for shape in input_shapes]
    outputs = layer(inputs if len(inputs) > 1 else inputs[0])
    cost = model_cost(keras.Model(inputs, outputs))
    (entry,) = [c for c in cost.layers if c.name == layer.name]
    return entry.flops


# --- FLOPs of single layers, against hand arithmetic ------------------------------------

CASES = {
    # out 5x5x4 (ceil(9/2)), each output reads 3*3*3: 2*100*27 + 100 bias
    "conv2d_stride2_same": (lambda: L.Conv2D(4, 3, strides=2, padding="same"), [(9, 9, 3)], 2 * 100 * 27 + 100),
    # out 7x7x4, no bias: 2*196*27
    "conv2d_valid": (lambda: L.Conv2D(4, 3, use_bias=False), [(9, 9, 3)], 2 * 196 * 27),
    # out 6x6x8, each output reads 3*3*(4/2 groups): 2*288*18
    "conv2d_grouped": (
        lambda: L.Conv2D(8, 3, groups=2, padding="same", use_bias=False), [(6, 6, 4)], 2 * 288 * 18,
    ),
    # out 16x6 = 96, reads 5*3: 2*96*15 + 96 bias + 96 relu
    "conv1d_relu": (lambda: L.Conv1D(6, 5, activation="relu"), [(20, 3)], 2 * 96 * 15 + 96 + 96),
    # dilation 2 spans 5 inputs: out 16x4 = 64, reads 3*3: 2*64*9 + 64 bias
    "conv1d_dilated": (lambda: L.Conv1D(4, 3, dilation_rate=2), [(20, 3)], 2 * 64 * 9 + 64),
    # out 6x6x(3*2) = 216, each reads 3*3 of its channel: 2*216*9 + 216 bias
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), [(8, 8, 3)], 2 * 216 * 9 + 216),
    # depthwise 36 positions * 4 ch * 9 + pointwise 36 * 4 * 8, no bias
    "separable": (
        lambda: L.SeparableConv2D(8, 3, padding="same", use_bias=False), [(6, 6, 4)], 2 * (36 * 4 * 9 + 36 * 4 * 8),
    ),
    # each of 50 input elements scatters into 3*3*4 outputs; bias on 10x10x4 outputs
    "conv2d_transpose": (lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same"), [(5, 5, 2)], 2 * 50 * 36 + 400),
    "dense": (lambda: L.Dense(7), [(10,)], 2 * 7 * 10 + 7),
    # rank 3: 5x7 outputs, each reads the last input axis (10)
    "dense_rank3": (lambda: L.Dense(7), [(5, 10)], 2 * 35 * 10 + 35),
    "batchnorm": (lambda: L.BatchNormalization(), [(4, 4, 6)], 2 * 96),
    # out 4x4x2 = 32 elements, window 3*3
    "maxpool": (lambda: L.MaxPooling2D(3, strides=2), [(9, 9, 2)], 32 * 9),
    "avgpool": (lambda: L.AveragePooling2D(2), [(8, 8, 2)], 32 * 4),
    "global_avgpool": (lambda: L.GlobalAveragePooling2D(), [(8, 8, 2)], 128),
    # 3 inputs of 32 elements: 2 adds per element
    "add3": (lambda: L.Add(), [(4, 4, 2)] * 3, 2 * 32),
    "relu": (lambda: L.ReLU(), [(4, 4, 2)], 32),
    "softmax": (lambda: L.Softmax(), [(10,)], 10),
    "linear_activation": (lambda: L.Activation("linear"), [(4, 4, 2)], 0),
    "rescaling_scale_only": (lambda: L.Rescaling(1 / 255), [(4, 4, 2)], 32),
    "rescaling_scale_offset": (lambda: L.Rescaling(2.0, offset=-1.0), [(4, 4, 2)], 64),
    "zero_padding": (lambda: L.ZeroPadding2D(1), [(4, 4, 2)], 0),
    "flatten": (lambda: L.Flatten(), [(4, 4, 2)], 0),
    "concatenate": (lambda: L.Concatenate(), [(4, 4, 2)] * 2, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_flops_match_hand_arithmetic(case):
    make, shapes, expected = CASES[case]
    assert single_layer_flops(make(), *shapes) == expected


def test_normalization_counts_two_ops_per_element():
    layer = L.Normalization(mean=[0.5, 0.5], variance=[0.25, 0.25])
    assert single_layer_flops(layer, (4, 4, 2)) == 2 * 32


def test_unknown_layer_is_listed_with_zero_flops():
    inputs = keras.Input((6,))
    outputs = L.Dense(2)(L.UnitNormalization(name="unit")(inputs))
    cost = model_cost(keras.Model(inputs, outputs))
    (unit,) = [c for c in cost.layers if c.name == "unit"]
    assert (unit.type, unit.flops, unit.params) == ("UnitNormalization", 0, 0)


def test_layer_normalization_counts_its_statistics_and_its_affine_part():
    inputs = keras.Input((5, 6))
    outputs = L.LayerNormalization(name="ln")(inputs)
    plain = L.LayerNormalization(center=False, scale=False, name="plain")(outputs)
    cost = {c.name: c for c in model_cost(keras.Model(inputs, plain)).layers}
    assert (cost["ln"].flops, cost["ln"].params) == (7 * 30, 12)  # mean, centre, square, variance, 1/σ, γ, β
    assert cost["plain"].flops == 5 * 30


def _attention_flops(tq, tk, dq, dv, heads, key_dim, value_dim, out_dim, bias=True):
    """Multi-head attention as its matrix products (2 FLOPs per multiply-accumulate), written out."""
    b = 1 if bias else 0
    q = tq * (2 * dq * heads * key_dim + b * heads * key_dim)  # query projection
    k = tk * (2 * dv * heads * key_dim + b * heads * key_dim)  # key projection (key = value)
    v = tk * (2 * dv * heads * value_dim + b * heads * value_dim)
    scale = tq * heads * key_dim  # query * 1/sqrt(key_dim)
    scores = heads * 2 * tq * tk * key_dim
    softmax = heads * tq * tk
    mix = heads * 2 * tq * tk * value_dim
    out = tq * (2 * heads * value_dim * out_dim + b * out_dim)
    return q + k + v + scale + scores + softmax + mix + out


def test_attention_flops_are_its_projections_scores_softmax_and_mix():
    query, value = keras.Input((7, 16)), keras.Input((5, 12))
    outputs = L.MultiHeadAttention(4, 8, value_dim=6, name="mha")(query, value)
    (mha,) = [c for c in model_cost(keras.Model([query, value], outputs)).layers if c.name == "mha"]
    assert mha.flops == _attention_flops(7, 5, 16, 12, 4, 8, 6, 16)
    x = keras.Input((7, 16))
    fewer = L.MultiHeadAttention(3, 8, value_dim=6, use_bias=False, output_shape=10, name="mha")(x, x)
    (mha,) = [c for c in model_cost(keras.Model(x, fewer)).layers if c.name == "mha"]
    assert mha.flops == _attention_flops(7, 7, 16, 16, 3, 8, 6, 10, bias=False)


def test_attention_over_some_axes_attends_within_the_others():
    x = keras.Input((4, 6, 8))  # attention along axis 2 only: 4 independent rows of 6 positions
    outputs = L.MultiHeadAttention(2, 4, attention_axes=(2,), name="mha")(x, x)
    (mha,) = [c for c in model_cost(keras.Model(x, outputs)).layers if c.name == "mha"]
    def core(attended):  # scores, softmax and mix of 2 heads for 24 query positions
        return 2 * 24 * attended * (2 * 4 + 1 + 2 * 4)

    assert mha.flops == _attention_flops(24, 24, 8, 8, 2, 4, 4, 8) - core(24) + core(6)


def test_keras_ops_in_the_graph_cost_one_per_element():
    inputs = keras.Input((3,))
    outputs = L.Dense(4, use_bias=False, name="d")(inputs) * 0.5  # a keras.ops Multiply node
    cost = model_cost(keras.Model(inputs, outputs))
    assert cost.flops == 2 * 4 * 3 + 4


# --- totals: params exact, nested and shared layers ---------------------------------------


def build_shared():
    """One Dense applied to two inputs, and a nested model applied twice."""
    tower = keras.Sequential([keras.Input((6,)), L.Dense(5, name="inner")], name="tower")
    a, b = keras.Input((6,)), keras.Input((6,))
    shared = L.Dense(6, name="shared")
    x = L.Add(name="sum")([tower(shared(a)), tower(shared(b))])
    return keras.Model([a, b], L.Dense(2, name="head")(x), name="shared_model")


@pytest.mark.parametrize("build", [build_sequential, build_residual, build_nested, build_shared])
def test_total_params_equal_count_params(build):
    model = build()
    cost = model_cost(model)
    assert cost.params == model.count_params()
    assert cost.flops == sum(layer.flops for layer in cost.layers) > 0


def test_shared_layers_count_flops_per_call_and_params_once():
    cost = {c.name: c for c in model_cost(build_shared()).layers}
    assert set(cost) >= {"shared", "tower/inner", "sum", "head"}
    assert (cost["shared"].params, cost["shared"].flops) == (6 * 6 + 6, 2 * (2 * 6 * 6 + 6))
    assert (cost["tower/inner"].params, cost["tower/inner"].flops) == (6 * 5 + 5, 2 * (2 * 5 * 6 + 5))
    assert "tower" not in cost  # the nested model is flattened into its layers


def test_nested_layers_get_qualified_names_and_shapes():
    cost = model_cost(build_nested())
    conv = next(c for c in cost.layers if c.type == "Conv2D")
    assert conv.name.startswith("backbone/")
    assert conv.output_shape == (None, 8, 8, 4)
    assert conv.flops == 2 * 8 * 8 * 4 * (3 * 3 * 2) + 2 * 8 * 8 * 4  # + bias + relu


def test_free_spatial_dimensions_count_zero_until_shapes_are_given():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(4, 3, padding="same", use_bias=False)(inputs))
    assert model_cost(model).flops == 0
    fixed = model_cost(model, input_shapes=[(8, 8, 3)])
    assert fixed.flops == 2 * 64 * 4 * 27
    assert fixed.layers[-1].output_shape == (None, 8, 8, 4)


def test_subclassed_model_is_refused():
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Tiny()
    model(keras.ops.zeros((1, 3)))
    with pytest.raises(ModelLoadError, match="no layer graph"):
        model_cost(model)


def test_unbuilt_sequential_is_refused():
    with pytest.raises(ModelLoadError, match="no layer graph"):
        model_cost(keras.Sequential([L.Dense(2)]))


def test_wrong_input_shapes_are_refused():
    with pytest.raises(ModelLoadError, match="input shape"):
        model_cost(build_residual(), input_shapes=[(16, 16, 3), (16, 16, 3)])


def test_to_dict_is_json_with_the_documented_keys():
    payload = json.loads(json.dumps(model_cost(build_residual()).to_dict()))
    assert set(payload) == {"params", "flops", "layers"}
    assert set(payload["layers"][0]) == {"name", "type", "output_shape", "params", "flops", "techniques"}
    conv = next(layer for layer in payload["layers"] if layer["type"] == "Conv2D")
    assert conv["output_shape"] == [None, 16, 16, 8] and conv["techniques"] == ["tucker", "sparsity", "channel"]
    assert LayerCost("a", "B", (None, 2), 1, 2, ("svd",)).to_dict()["techniques"] == ["svd"]


# --- applicable techniques -------------------------------------------------------------------

TECHNIQUE_CASES = [
    (lambda: L.Conv2D(4, 3), (6, 6, 2), ("tucker", "sparsity", "channel")),
    (lambda: L.Conv2D(4, 1), (6, 6, 2), ("svd", "sparsity", "channel")),
    (lambda: L.Conv2D(4, 3, groups=2), (6, 6, 2), ("sparsity", "channel")),
    (lambda: L.Conv1D(4, 3), (6, 2), ("svd", "sparsity", "channel")),
    (lambda: L.Dense(4), (3,), ("svd", "sparsity", "channel")),
    (lambda: L.DepthwiseConv2D(3), (6, 6, 2), ("sparsity", "channel")),
    (lambda: L.SeparableConv2D(4, 3), (6, 6, 2), ("svd", "sparsity", "channel")),
    (lambda: L.LSTM(4), (5, 3), ("svd",)),
    (lambda: L.GRU(4, reset_after=False), (5, 3), ()),
    (lambda: L.Bidirectional(L.LSTM(4)), (5, 3), ("svd",)),
    (lambda: L.Bidirectional(L.GRU(4), merge_mode="sum"), (5, 3), ("svd",)),
    (lambda: L.Bidirectional(L.GRU(4, reset_after=False)), (5, 3), ()),
    (lambda: L.Bidirectional(L.LSTM(4), backward_layer=L.LSTM(6, go_backwards=True)), (5, 3), ()),
    (lambda: L.Conv2DTranspose(4, 3), (6, 6, 2), ("sparsity",)),
    (lambda: L.BatchNormalization(), (6, 6, 2), ()),
    (lambda: L.ReLU(), (6, 6, 2), ()),
]


@pytest.mark.parametrize("make, shape, expected", TECHNIQUE_CASES)
def test_applicable_techniques(make, shape, expected):
    layer = make()
    layer.build((None, *shape))
    assert applicable_techniques(layer) == expected


# --- Keras applications ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121"])
def test_keras_applications(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    cost = model_cost(model)
    assert cost.params == model.count_params()
    assert cost.flops > 0
    assert len({layer.name for layer in cost.layers}) == len(cost.layers) == len(model.layers)


# --- cross-check with the TFLite converter ---------------------------------------------------

# Converts each model at batch 1 with frozen variables (a variable read hides Dense
# layers from the estimate) and prints the converter's "Estimated count of
# arithmetic ops" line, which TFLite logs at INFO level from C++ to fd 2: the child
# needs TF_CPP_MIN_LOG_LEVEL=0.
_CONVERT = textwrap.dedent(
    """
    import sys
    import keras, tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    for path in sys.argv[1:]:
        model = keras.saving.load_model(path, compile=False)
        spec = tf.TensorSpec((1, *model.inputs[0].shape[1:]), model.inputs[0].dtype)
        forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(forward)]).convert()
    """
)
_ESTIMATE = re.compile(r"Estimated count of arithmetic ops: ([\d.]+) ([KMG]?)\s*ops")


def converter_flops(paths):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT, *map(str, paths)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    found = [float(value) * scale[unit] for value, unit in _ESTIMATE.findall(done.stderr)]
    assert len(found) == len(paths), done.stderr[-2000:]
    return found


def build_conv_net():
    inputs = keras.Input((32, 32, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Conv2D(32, 1, activation="relu")(x)
    outputs = L.Dense(10)(L.Flatten()(x))
    return keras.Model(inputs, outputs, name="conv_net")


def test_flops_agree_with_the_tflite_converter(tmp_path):
    """Ours within 5% of the converter's estimate.

    The converter counts the same MACs but: folds BatchNormalization into the
    preceding conv and fuses ReLU into conv/add (0 where we count 2 and 1 per
    element), counts a bias once per channel (and drops all-zero biases) where we
    count one add per output element, skips MEAN (global average pooling), and
    charges 64 per element for softmax. Its printed figure is rounded to 3 decimals
    of M. Those differ by about 2% on these nets.
    """
    models = [build_conv_net(), build_residual()]
    paths = [tmp_path / f"{model.name}.keras" for model in models]
    for model, path in zip(models, paths):
        model.save(path)
    for model, theirs in zip(models, converter_flops(paths)):
        ours = model_cost(model).flops
        assert ours == pytest.approx(theirs, rel=0.05), (model.name, ours, theirs)
