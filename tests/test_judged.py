"""Under `--quantize` the guard judges each model's quantized artifact, so its bound covers quantization error."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import ExportError
from compressor.export.judged import QuantizedJudge, judged_format
from compressor.io.data import Dataset
from compressor.metrics import TOP1
from compressor.pipeline.acceptance import Acceptance


def _fragile_under_int8():
    """A model that is exact in float and ruined by int8: argmax of 10 inputs in [0, 1].

    The hidden layer holds the 10 inputs scaled by 1e-2 next to one unit 1e4 times larger.
    Int8 gives the whole tensor one scale (about 0.4 per step), so the small units round to
    zero and every class scores the same; in float the output layer scales them back.
    """
    import keras

    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(11, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(hidden)
    model = keras.Model(inputs, outputs)
    first = np.zeros((10, 11), np.float32)
    first[np.arange(10), np.arange(10)] = 1e-2
    first[0, 10] = 1e2
    second = np.zeros((11, 10), np.float32)
    second[np.arange(10), np.arange(10)] = 1e2
    model.layers[1].set_weights([first, np.zeros(11, np.float32)])
    model.layers[2].set_weights([second, np.zeros(10, np.float32)])
    return model


@pytest.fixture(scope="module")
def fragile():
    rng = np.random.default_rng(0)
    x = rng.random((600, 10), dtype=np.float32)
    data = Dataset(x, x.argmax(axis=1), "guard")
    model = _fragile_under_int8()
    correct = np.asarray(model.predict(x, verbose=0)).argmax(axis=1) == data.y
    assert correct.all(), "the float model is exact by construction"
    return model, data


def test_a_model_that_int8_ruins_is_accepted_on_keras_and_rejected_on_its_int8_file(fragile):
    model, data = fragile
    on_keras = Acceptance(data, 0.02, 0.95, np.ones(len(data), bool))
    assert on_keras.look("the original", model)  # no prediction changed: drop 0
    judge = QuantizedJudge("tflite", "int8", calibration=data.x[:100])
    on_int8 = Acceptance(data, 0.02, 0.95, np.ones(len(data), bool), judge=judge)
    assert not on_int8.look("the original", model)
    look = on_int8.to_dict()["looks"][0]
    # Every class scores alike in int8: far more than the budget is lost (at least half the samples).
    assert look["drop"] > 0.5 and look["ci"][0] > 0.02
    assert on_int8.to_dict()["judged"] == "model.int8.tflite" and on_keras.to_dict()["judged"] == "keras model"


@pytest.mark.parametrize("fmt, mode, ruined", [("tflite", "dynamic", False), ("onnx", "int8", True)])
def test_the_judged_values_are_the_quantized_artifacts_own(fragile, fmt, mode, ruined):
    model, data = fragile
    judge = QuantizedJudge(fmt, mode, calibration=data.x[:100] if mode == "int8" else None)
    values = judge.values(model, data, TOP1)
    assert values.shape == (len(data),) and values.dtype == bool
    if ruined:
        # onnxruntime's static int8 gives the hidden tensor one scale, as TFLite's int8 does.
        assert values.mean() < 0.5
    else:
        # Dynamic range keeps float activations, and its int8 weights have a scale per output unit.
        assert values.mean() >= 0.99
    assert judge.name == f"model.{mode}.{fmt}"


def test_the_judged_format_follows_the_budgets_artifact():
    assert judged_format(["tflite", "onnx", "keras"]) == "tflite"
    assert judged_format(["onnx", "keras"]) == "onnx"
    assert judged_format(["keras"]) is None


@pytest.mark.parametrize("fmt, mode, match", [("keras", "int8", "Invalid format"), ("tflite", "none", "other than"),
                                              ("tflite", "int4", "Invalid quantization mode")])
def test_a_judge_without_a_quantized_artifact_is_refused(fmt, mode, match):
    with pytest.raises(ExportError, match=match):
        QuantizedJudge(fmt, mode)


def test_the_judge_converts_a_model_once_until_its_weights_change(fragile, monkeypatch):
    model, data = fragile
    judge = QuantizedJudge("tflite", "int8", calibration=data.x[:100])
    writes = []
    real = QuantizedJudge._write
    monkeypatch.setattr(QuantizedJudge, "_write", lambda self, m, folder: writes.append(1) or real(self, m, folder))
    first = judge.values(model, data, TOP1)
    # The step check and the guard judge the same model on two splits: one conversion.
    assert np.array_equal(judge.values(model, data, TOP1), first) and len(writes) == 1
    weights = model.get_weights()
    try:
        kernel = weights[0].copy()
        kernel[:, 10] = 0  # without the large unit, the small ones survive int8
        model.layers[1].set_weights([kernel, weights[1]])
        again = judge.values(model, data, TOP1)
        assert len(writes) == 2 and again.mean() > first.mean() + 0.3
    finally:
        model.set_weights(weights)
    assert np.array_equal(judge.values(model, data, TOP1), first) and len(writes) == 3
    folder = judge.artifact(model).parent
    del judge
    import gc

    gc.collect()
    assert not folder.exists()  # the judge's folder goes with it
