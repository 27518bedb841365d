"""ONNX export of gated models: real `If` nodes that onnxruntime loads and runs.

Tolerance: the gated model and its ONNX form compute the same float32 ops; only the
summation order differs (onnxruntime's NCHWc convolutions, folded batch norms). On
these tiny models the logits move by at most ~3e-7; 1e-5 leaves a 30x margin and is
still far below anything that changes a prediction. A branch run on the wrong layout
or with a wrong kernel, the bug this module fixes, would be off by ~1e-1.
"""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import ExportError
from compressor.export import onnx_gating
from compressor.export import writers
from compressor.export.onnx_gating import convert_gated, fill_branch_shapes
from compressor.layers.gating import OPEN, gate_layers
from compressor.techniques.gating import insert_gates, set_offsets

ATOL = 1e-5
SAMPLES = 4


def _randomize_batch_norms(model, rng):
    """Give every BatchNormalization non-trivial statistics, so folding them is exercised."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.1, channels))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))


def build_tiny_resnet():
    """Stem conv, two identity blocks (conv-BN-ReLU-conv-BN, Add, ReLU), logits."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)))
    for _ in range(2):
        y = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(y))
        x = layers.ReLU()(layers.Add()([x, y]))
    outputs = layers.Dense(4)(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs, name="tiny_resnet")
    _randomize_batch_norms(model, np.random.default_rng(0))
    return model


def build_inverted_residual():
    """Stem conv, two MobileNetV2 blocks (1x1 expand, depthwise 3x3, 1x1 project; Add), logits."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same")(inputs)
    for _ in range(2):
        y = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(24, 1, use_bias=False)(x)))
        y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(8, 1, use_bias=False)(y))
        x = layers.Add()([x, y])
    outputs = layers.Dense(4)(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs, name="tiny_inverted_residual")
    _randomize_batch_norms(model, np.random.default_rng(0))
    return model


@pytest.fixture(scope="module", params=["resnet", "inverted_residual"])
def gated(request):
    """A gated tiny model (two gates) and batch-1 inputs for it."""
    build = build_tiny_resnet if request.param == "resnet" else build_inverted_residual
    model = insert_gates(build())
    x = np.random.default_rng(1).normal(size=(SAMPLES, 1, 16, 16, 3)).astype(np.float32)
    return model, x


def _session(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _max_diff(model, proto, x):
    """Largest |onnxruntime - Keras| over the inputs, each run at batch 1."""
    session = _session(proto)
    # [xi]: the gated model's inputs are a list; a bare tensor makes Keras warn.
    diffs = [session.run(None, {"input": xi})[0] - np.asarray(model([xi], training=False)) for xi in x]
    return max(float(np.abs(d).max()) for d in diffs)


def _if_nodes(proto):
    return [node for node in proto.graph.node if node.op_type == "If"]


def _branch_ops(node, branch):
    graph = next(attr.g for attr in node.attribute if attr.name == branch)
    return [n.op_type for n in graph.node]


@pytest.mark.parametrize("gates", ["open", "shut", "mixed"])
def test_onnxruntime_matches_keras_per_input(gated, gates):
    model, x = gated
    set_offsets(model, {"open": [OPEN, OPEN], "shut": [-OPEN, -OPEN], "mixed": [OPEN, -OPEN]}[gates])
    proto = convert_gated(model)
    assert _max_diff(model, proto, x) <= ATOL
    session = _session(proto)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    assert session.get_inputs()[0].shape == [1, 16, 16, 3]  # batch 1: the only batch that branches


def test_branch_work_sits_inside_the_if(gated):
    import onnx

    model, _ = gated
    set_offsets(model, OPEN)
    proto = convert_gated(model)
    onnx.checker.check_model(proto, full_check=True)
    ifs = _if_nodes(proto)
    assert len(ifs) == len(gate_layers(model)) == 2
    for node in ifs:
        assert _branch_ops(node, "then_branch").count("Conv") >= 2
        assert "Conv" not in _branch_ops(node, "else_branch")
    if model.name == "tiny_inverted_residual":
        depthwise = [
            n for node in ifs for attr in node.attribute if attr.name == "then_branch" for n in attr.g.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i == 24 for a in n.attribute)
        ]
        assert len(depthwise) == 2


def test_decisions_follow_each_input(gated):
    """Gates that open for some inputs and shut for others: the If decides per input, like Keras."""
    import keras

    model, x = gated
    rng = np.random.default_rng(2)
    try:
        for gate, _ in gate_layers(model):
            gate.kernel.assign(rng.normal(size=gate.kernel.shape))
        set_offsets(model, 0.0)
        for gate, _ in gate_layers(model):  # in graph order: a gate's input depends on the gates before it
            logits = np.concatenate([np.asarray(keras.Model(model.inputs, gate.output)([xi])) for xi in x]).ravel()
            gate.offset.assign(-float(np.median(logits)))  # half the inputs run the block, half skip it
            margins = np.abs(logits + gate.offset.numpy())
            assert margins.min() > 1e-4, "a logit this close to 0 could round either way in either runtime"
        assert _max_diff(model, convert_gated(model), x) <= ATOL
    finally:
        for gate, _ in gate_layers(model):
            gate.kernel.assign(np.zeros(gate.kernel.shape))  # the fixture's state


def test_open_and_shut_differ(gated):
    """The comparison above is not vacuous: the branches change the output."""
    model, x = gated
    set_offsets(model, OPEN)
    opened = _session(convert_gated(model)).run(None, {"input": x[0]})[0]
    set_offsets(model, -OPEN)
    shut = _session(convert_gated(model)).run(None, {"input": x[0]})[0]
    assert np.abs(opened - shut).max() > 100 * ATOL


def test_without_branch_shapes_tf2onnx_fails_and_we_refuse(monkeypatch):
    """The bug this module fixes, kept as a guard: tf2onnx's half-converted Conv is an ExportError."""
    model = insert_gates(build_tiny_resnet())
    monkeypatch.setattr(onnx_gating, "fill_branch_shapes", lambda graph_def: graph_def)
    with pytest.raises(ExportError, match=r"tf2onnx: Failed to convert node .*convolution"):
        convert_gated(model)


def test_fill_branch_shapes_copies_and_shapes_every_argument():
    import tensorflow as tf

    model = insert_gates(build_tiny_resnet())
    spec = [tf.TensorSpec((1, 16, 16, 3), tf.float32)]
    graph_def, _, _ = writers._frozen_graph(model, spec)
    filled = fill_branch_shapes(graph_def)
    for before, after in zip(graph_def.library.function, filled.library.function):
        assert before.arg_attr[0].attr["_output_shapes"].list.shape[0].unknown_rank  # what freezing leaves
        shapes = [after.arg_attr[i].attr["_output_shapes"].list.shape[0] for i in range(len(after.signature.input_arg))]
        assert not any(s.unknown_rank for s in shapes)
        assert [1, 16, 16, 8] in [[d.size for d in s.dim] for s in shapes]  # the block input


def test_check_refuses_a_broken_branch_and_a_lost_if(gated):
    """The post-conversion check: what onnxruntime would reject, and a gate that would not skip."""
    model, _ = gated
    set_offsets(model, OPEN)
    proto = convert_gated(model)
    with pytest.raises(ExportError, match="kept 2 If nodes for 3 gates and exits"):
        onnx_gating._check(proto, gates=3)
    then = next(attr.g for attr in _if_nodes(proto)[0].attribute if attr.name == "then_branch")
    conv = next(n for n in then.node if n.op_type == "Conv")
    dilations = next(a for a in conv.attribute if a.name == "dilations")
    dilations.ints[:] = [1, 1, 1, 1]  # TensorFlow's NHWC form, as tf2onnx left it
    with pytest.raises(ExportError, match="invalid model: .*dilations"):
        onnx_gating._check(proto, gates=2)


def test_rejects_ungated_models_and_bad_opsets(gated):
    model, _ = gated
    with pytest.raises(ExportError, match="no gated residual block"):
        convert_gated(build_tiny_resnet())
    with pytest.raises(ExportError, match="unsupported ONNX opset 5"):
        convert_gated(model, opset=5)
