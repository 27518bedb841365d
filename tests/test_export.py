"""Export to TFLite, ONNX and .keras, and the parity check on each artifact.

Tolerance: float32 kernels in LiteRT (XNNPACK) and onnxruntime sum in a different
order than TensorFlow, which moves outputs of these tiny models by ~1e-7; 1e-5 is a
hundred times that and still far below anything that changes a prediction.
"""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import ExportError, VerificationError
from compressor.export import verify
from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs
from compressor.export.writers import parse_formats
from compressor.io.data import load_data
from conftest import build_residual, build_sequential, raises_as_cli, write_npz

ATOL = 1e-5


def test_every_model_kind_exports_within_tolerance(tmp_path, any_model):
    data = load_data(write_npz(tmp_path / "d.npz", any_model), any_model.inputs[0].shape[1:])
    checks = export_and_verify(any_model, tmp_path / "out", ("tflite", "onnx", "keras"), data.x, atol=ATOL)
    assert [c.format for c in checks] == ["tflite", "onnx", "keras"]
    for check in checks:
        assert check.passed, check.describe()
        assert check.max_abs_diff <= ATOL
        assert check.top1_agreement == 1.0
        assert check.samples == len(data)
        assert check.bytes == (tmp_path / "out" / f"model.{check.format}").stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.keras", "model.onnx", "model.tflite"]


def test_tflite_allocates_batch_one_and_both_batches_are_dynamic(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from compressor.bench.runtime import open_artifact

    model = build_sequential()
    x = verification_inputs(model, None, samples=5)
    export_and_verify(model, tmp_path, ("tflite", "onnx"), x, atol=ATOL)
    interpreter = Interpreter(model_path=str(tmp_path / "model.tflite"))
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 12, 12, 3]
    tflite_runner = open_artifact(tmp_path / "model.tflite")
    assert tflite_runner.input_shape == (None, 12, 12, 3)
    assert tflite_runner.invoke(x).shape == (5, 5)
    onnx_runner = open_artifact(tmp_path / "model.onnx")
    assert onnx_runner.input_shape == (None, 12, 12, 3)
    assert onnx_runner.invoke(x).shape == (5, 5)


def test_generated_inputs_are_seeded_and_shaped():
    model = build_residual()
    a = verification_inputs(model, None, samples=7, seed=3)
    b = verification_inputs(model, None, samples=7, seed=3)
    assert a.shape == (7, 16, 16, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_free_input_dimensions_need_data():
    import keras

    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(2, 3)(inputs)))
    with raises_as_cli(ExportError, "free dimensions; pass --data"):
        verification_inputs(model, None)


def test_parity_failure_reports_numbers(tmp_path, monkeypatch):
    model = build_sequential()
    real = verify.artifact_outputs
    monkeypatch.setattr(
        verify, "artifact_outputs", lambda fmt, path, x, **kw: real(fmt, path, x, **kw) + (0.01 if fmt == "onnx" else 0.0)
    )
    checks = export_and_verify(model, tmp_path, ("tflite", "onnx"), verification_inputs(model, None, 8), atol=1e-4)
    assert [c.passed for c in checks] == [True, False]
    assert checks[1].max_abs_diff == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(VerificationError, match=r"onnx artifact .* max_abs_diff=0\.01 \(atol 0\.0001\)"):
        ensure_passed(checks)


def test_multi_output_model_exports_but_is_not_quantized(tmp_path):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, [keras.layers.Dense(2, name="a")(inputs), keras.layers.Dense(3, name="b")(inputs)])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (check,) = export_and_verify(model, tmp_path, ("tflite",), x)
    assert check.passed and set(check.output_diffs) == {"a", "b"}
    with pytest.raises(ExportError, match="quantization supports single-input, single-output"):
        export_and_verify(model, tmp_path, ("tflite",), x, quantize="dynamic")


@pytest.mark.parametrize("text, expected", [("tflite", ("tflite",)), (" ONNX, tflite,onnx ", ("onnx", "tflite"))])
def test_parse_formats(text, expected):
    assert parse_formats(text) == expected


@pytest.mark.parametrize("text", ["", "tflite,pt", ","])
def test_parse_formats_rejects(text):
    with pytest.raises(ExportError, match="expected a comma-separated list of tflite, onnx, keras"):
        parse_formats(text)


def test_bad_opset(tmp_path):
    from compressor.export.writers import export_onnx

    with pytest.raises(ExportError, match="unsupported ONNX opset 99"):
        export_onnx(build_sequential(), tmp_path / "m.onnx", opset=99)
    assert not list(tmp_path.iterdir())
