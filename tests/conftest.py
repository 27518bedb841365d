"""Tiny models and data shared by the tests.

Models are small enough that building, converting and running them takes a second
or two; they cover the graph kinds users bring: Sequential, Functional with a residual
Add, Conv1D, depthwise, and a model nested inside another.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
