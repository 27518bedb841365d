"""Tiny models and data shared by the tests.

Models are small enough that building, converting and running them takes a second
or two; they cover the graph kinds users bring: Sequential, Functional with a residual
Add, Conv1D, depthwise, a model nested inside another, a layer called twice, and
parallel branches joined by a Concatenate.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import contextlib
import re

import numpy as np
import pytest


def _keras():
    import keras

    keras.utils.set_random_seed(0)
    return keras


def build_sequential():
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(5, activation="softmax"),
        ],
        name="tiny_sequential",
    )


def build_residual():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    y = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = layers.Conv2D(8, 3, padding="same")(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="tiny_residual")


def build_conv1d():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((32, 3))
    x = layers.Conv1D(8, 5, activation="relu")(inputs)
    x = layers.Conv1D(8, 3, dilation_rate=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = layers.Dense(6, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="tiny_conv1d")


def build_depthwise():
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((16, 16, 4))
    x = layers.DepthwiseConv2D(3, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(8, 1, activation="relu")(x)
    x = layers.SeparableConv2D(8, 3, strides=2, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="tiny_depthwise")


def build_nested():
    keras = _keras()
    layers = keras.layers
    backbone = keras.Sequential(
        [keras.Input((10, 10, 2)), layers.Conv2D(4, 3, activation="relu"), layers.GlobalAveragePooling2D()],
        name="backbone",
    )
    inputs = keras.Input((10, 10, 2))
    outputs = layers.Dense(3, activation="softmax")(backbone(inputs))
    return keras.Model(inputs, outputs, name="tiny_nested")


def build_shared():
    """A layer called twice (on its own output), then a residual block."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((12, 12, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    shared = layers.Conv2D(8, 3, padding="same", activation="relu", name="shared")
    x = shared(shared(x))
    y = layers.Conv2D(8, 3, padding="same", name="branch")(x)
    x = layers.Add(name="add")([x, y])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="tiny_shared")


def build_multi_branch():
    """Parallel 1x1 and 3x3 paths, concatenated and projected, inside a residual block (Inception-like)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((12, 12, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    a = layers.Conv2D(4, 1, activation="relu", name="path_1x1")(x)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="path_3x3")(x)
    y = layers.Conv2D(8, 1, name="project")(layers.Concatenate(name="concat")([a, b]))
    x = layers.ReLU(name="relu")(layers.Add(name="add")([x, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="tiny_multi_branch")


GRAPH_KINDS = {
    "sequential": build_sequential,
    "functional": build_residual,
    "nested": build_nested,
    "shared": build_shared,
    "multi_branch": build_multi_branch,
}
"""The graph kinds every rewriter must handle (tests/test_graph_kinds.py)."""


BUILDERS = {
    "sequential": build_sequential,
    "residual": build_residual,
    "conv1d": build_conv1d,
    "depthwise": build_depthwise,
    "nested": build_nested,
}


@pytest.fixture(params=sorted(BUILDERS))
def any_model(request):
    """Each tiny model kind in turn."""
    return BUILDERS[request.param]()


@pytest.fixture
def residual_model():
    return build_residual()


def write_npz(path, model, n=24, seed=0, one_hot=False):
    """Write n random samples shaped for the model, labelled with the model's own argmax."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *model.inputs[0].shape[1:]), dtype=np.float32)
    y = np.asarray(model(x)).argmax(-1)
    if one_hot:
        y = np.eye(model.outputs[0].shape[-1], dtype=np.float32)[y]
    np.savez(path, x=x, y=y)
    return path


def tflite_ops(path):
    """Op names of a .tflite file's main subgraph, then (op names, number of inputs) of every other subgraph."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    subgraphs = [([names[codes[op.opcodeIndex]] for op in graph.operators], len(graph.inputs)) for graph in model.subgraphs]
    return [subgraphs[0][0], *subgraphs[1:]]


def onnx_ops(path):
    """Op types of an .onnx file's main graph."""
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


def quadrants(n, seed):
    """Noise images whose class (0-3) is their brighter quadrant: real labels a tiny CNN learns in seconds."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 16, 16, 3), dtype=np.float32) * 0.5
    y = rng.integers(0, 4, n)
    for i, c in enumerate(y):
        x[i, (c // 2) * 8 : (c // 2 + 1) * 8, (c % 2) * 8 : (c % 2 + 1) * 8] += 1.0
    return x, y


def write_quadrants_workdir(folder):
    """Train the tiny residual model on `quadrants`; write model.keras, train.npz, val.npz, test.npz.

    Returns the trained model (at least 90% accurate on val.npz, checked).
    """
    keras = _keras()
    model = build_residual()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    train = quadrants(512, seed=0)
    model.fit(*train, epochs=8, batch_size=32, verbose=0)
    model.save(folder / "model.keras")
    write_quadrants_data(folder)
    x, y = (np.load(folder / "val.npz")[key] for key in ("x", "y"))
    assert np.mean(np.asarray(model(x)).argmax(-1) == y) >= 0.9, "the tiny model should have learnt the task"
    return model


def write_quadrants_data(folder):
    """train.npz (128 samples), val.npz (96) and test.npz (64) of `quadrants`, the same on every machine."""
    x, y = quadrants(512, seed=0)
    np.savez(folder / "train.npz", x=x[:128], y=y[:128])
    for name, n, seed in (("val", 96, 1), ("test", 64, 2)):
        x, y = quadrants(n, seed)
        np.savez(folder / f"{name}.npz", x=x, y=y)


@pytest.fixture
def keep_any_gates(monkeypatch):
    """Keep gates that skip nothing, and time them as faster: a tiny model's few training steps barely
    move its gates, and the tests using this are about what a gated run writes (test_gating.py tests that
    gates learn to skip; test_gating_cli's test_slower_gates_are_not_kept, that the timing decides)."""
    from compressor.bench import keras_latency
    from compressor.search import gating

    monkeypatch.setattr(gating, "MIN_SAVING", -1.0)
    monkeypatch.setattr(gating, "MIN_GATE_SKIP", -1.0)
    monkeypatch.setattr(keras_latency, "tflite_latency", lambda static, gated, x, **kwargs: (1.0, 0.5))


@contextlib.contextmanager
def raises_as_cli(error, match):
    """Like pytest.raises(error, match=...), matching the message as the CLI words it (options as flags)."""
    from compressor.errors import flag_name

    with pytest.raises(error) as caught:
        yield caught
    worded = caught.value.render(flag_name)
    assert re.search(match, worded), f"{match!r} not found in {worded!r}"
