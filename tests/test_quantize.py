"""Quantized TFLite and ONNX artifacts: accuracy, size, int8 I/O, guards and the CLI.

The accuracy tests use a small CNN trained for a few seconds on the bundled
scikit-learn digits (about 76% accuracy), calibrate on its training split and
measure on the 719 held-out validation and test images, so an accuracy figure
means something and one flipped prediction moves it by 0.14 points.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.bench.benchmark import top1_accuracy
from compressor.bench.runtime import dequantize_values, open_artifact, quantize_values
from compressor.cli.app import app
from compressor.errors import ExportError
from compressor.export.quantize import (
    QUANTIZE_MODES,
    calibration_set,
    export_onnx_quantized,
    export_tflite_quantized,
    parse_quantize,
    quantized_name,
)
from compressor.export.verify import ArtifactCheck, export_and_verify, verification_inputs
from compressor.io.data import Dataset
from conftest import build_sequential, write_npz

QUANTIZED = ("dynamic", "float16", "int8")
# Measured on this model: quantized artifacts lose 0 to 0.4 points of accuracy against
# the float artifact (int8 the most, 3 of 719 images). Two points leave room for the
# small changes in trained weights that another CPU or TensorFlow build produces, and
# still catch a broken quantizer (a badly scaled int8 graph loses tens of points).
MAX_ACCURACY_LOSS = 0.02


@pytest.fixture(scope="module")
def digits():
    """A trained digits CNN, its calibration samples and the held-out data."""
    import keras

    from compressor.models.digits import make_digit_splits

    splits = make_digit_splits(seed=0, train_copies=2)
    keras.utils.set_random_seed(0)
    layers = keras.layers
    # Flatten → Dense holds most of the 137k weights, so weights dominate the file size.
    model = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="digits_cnn",
    )
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(*splits.train, epochs=4, batch_size=64, verbose=0)
    held_out = Dataset(
        np.concatenate([splits.val[0], splits.test[0]]), np.concatenate([splits.val[1], splits.test[1]]), "val+test"
    )
    return model, calibration_set(splits.train[0], 200), held_out


@pytest.fixture(scope="module")
def artifacts(digits, tmp_path_factory):
    """Float, dynamic, float16 and int8 artifacts of the digits CNN, per format, plus int8 with int8 I/O."""
    from compressor.export.writers import export_onnx, export_tflite

    model, calibration, _ = digits
    folder = tmp_path_factory.mktemp("quantized")
    paths = {"none": {"tflite": export_tflite(model, folder / "model.tflite"), "onnx": export_onnx(model, folder / "model.onnx")}}
    for mode in QUANTIZED:
        paths[mode] = {
            "tflite": export_tflite_quantized(model, folder / quantized_name("model", mode, ".tflite"), mode, calibration),
            "onnx": export_onnx_quantized(paths["none"]["onnx"], folder / quantized_name("model", mode, ".onnx"), mode, calibration),
        }
    paths["int8_io"] = export_tflite_quantized(model, folder / "io.int8.tflite", "int8", calibration, int8_io=True)
    return paths


@pytest.fixture(scope="module")
def accuracies(digits, artifacts):
    _, _, held_out = digits
    return {
        mode: {fmt: top1_accuracy(open_artifact(artifacts[mode][fmt]), held_out) for fmt in ("tflite", "onnx")}
        for mode in ("none", *QUANTIZED)
    }


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.parametrize("mode", QUANTIZED)
def test_quantized_accuracy_stays_close_to_float(accuracies, mode, fmt):
    float_accuracy = accuracies["none"][fmt]
    assert float_accuracy > 0.6  # the model learned something, so the comparison means something
    assert accuracies[mode][fmt] >= float_accuracy - MAX_ACCURACY_LOSS, accuracies


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_quantized_files_are_smaller(artifacts, fmt):
    size = {mode: artifacts[mode][fmt].stat().st_size for mode in ("none", *QUANTIZED)}
    # 4-byte weights become 1 byte (int8, dynamic) or 2 bytes (float16); the graph,
    # scales and zero points keep the measured ratios near 3.6-3.8 and 1.97.
    assert size["none"] / size["int8"] >= 3.0, size
    assert size["none"] / size["dynamic"] >= 3.0, size
    assert 1.8 <= size["none"] / size["float16"] <= 2.2, size


def test_int8_tflite_runs_integer_kernels(artifacts):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifacts["int8"]["tflite"]))
    types = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    assert np.int8 in types
    runner = open_artifact(artifacts["int8"]["tflite"])
    assert runner.input_dtype == np.float32 and not runner.quantized_io  # float I/O by default


def test_int8_io_takes_int8_and_predicts_like_float_io(digits, artifacts):
    _, _, held_out = digits
    runner = open_artifact(artifacts["int8_io"])
    assert runner.input_dtype == np.int8 and runner.output_dtype == np.int8 and runner.quantized_io
    scale, _ = runner.input_quantization
    assert 0 < scale < 0.01  # inputs in [0, 1] spread over 256 steps
    prepared = runner.prepare(held_out.x[:3])
    assert prepared.dtype == np.int8
    # What the benchmark times: already quantized inputs in, float scores out.
    scores = runner.invoke(prepared[:1])
    assert scores.dtype == np.float32 and scores.shape == (1, 10)
    got = runner.predict(held_out.x).argmax(-1)
    expected = open_artifact(artifacts["int8"]["tflite"]).predict(held_out.x).argmax(-1)
    # The same int8 graph; only the float→int8 input step moves from the model into
    # the runner, whose rounding can differ in the last step for a few pixels.
    assert np.mean(got == expected) >= 0.98


def test_int8_io_accuracy_matches_the_float_artifact(digits, artifacts, accuracies):
    _, _, held_out = digits
    accuracy = top1_accuracy(open_artifact(artifacts["int8_io"]), held_out)
    assert accuracy >= accuracies["none"]["tflite"] - MAX_ACCURACY_LOSS


def test_quantize_values_rounds_half_away_from_zero_and_clips():
    q = quantize_values(np.array([0.25, -0.25, 0.75, 100.0, -100.0]), (0.5, 0), np.int8)
    np.testing.assert_array_equal(q, [1, -1, 2, 127, -128])
    assert q.dtype == np.int8
    np.testing.assert_array_equal(quantize_values(np.array([0.0, 1.0]), (1 / 255, -128), np.int8), [-128, 127])
    np.testing.assert_allclose(dequantize_values(np.array([-128, 127], np.int8), (1 / 255, -128)), [0.0, 1.0], atol=1e-6)


def test_prepare_passes_already_quantized_data_through(artifacts):
    runner = open_artifact(artifacts["int8_io"])
    raw = np.full((2, 32, 32, 1), 5, dtype=np.int8)
    np.testing.assert_array_equal(runner.prepare(raw), raw)


def test_export_and_verify_adds_quantized_checks_after_float_ones(tmp_path):
    model = build_sequential()
    x = verification_inputs(model, None, samples=16)
    checks = export_and_verify(
        model, tmp_path, ("tflite", "onnx", "keras"), x, atol=1e-4, quantize="int8", calibration=x
    )
    assert [(c.format, c.quantize) for c in checks] == [
        ("tflite", "none"), ("onnx", "none"), ("keras", "none"), ("tflite", "int8"), ("onnx", "int8"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.int8.onnx", "model.int8.tflite", "model.keras", "model.onnx", "model.tflite",
    ]
    for check in checks:
        assert check.passed, check.describe()
        assert check.to_dict()["quantize"] == check.quantize
    # Random weights and inputs: quantization moves outputs far beyond atol, by design.
    assert max(c.max_abs_diff for c in checks[3:]) > 1e-4


def test_every_model_kind_quantizes_to_int8(tmp_path, any_model):
    x = verification_inputs(any_model, None, samples=32)
    checks = export_and_verify(
        any_model, tmp_path, ("tflite", "onnx"), x, quantize="int8", calibration=x, int8_io=True
    )
    assert [(c.format, c.quantize) for c in checks[2:]] == [("tflite", "int8"), ("onnx", "int8")]
    for check in checks[2:]:
        assert check.passed, check.describe()
        # Softmax outputs in [0, 1] carry int8 steps of 1/256; measured differences are
        # <= 0.01. A wrongly scaled graph is off by tenths or more.
        assert check.max_abs_diff < 0.1, check.describe()
    assert open_artifact(tmp_path / "model.int8.tflite").input_dtype == np.int8


def test_quantized_check_passes_on_finite_outputs_only():
    common = dict(format="onnx", path="m.int8.onnx", bytes=1, top1_agreement=0.9, samples=8, atol=1e-4)
    assert ArtifactCheck(max_abs_diff=0.3, quantize="int8", **common).passed
    assert not ArtifactCheck(max_abs_diff=0.3, **common).passed
    broken = ArtifactCheck(max_abs_diff=float("inf"), quantize="int8", **common)
    assert not broken.passed
    assert "int8-quantized onnx artifact m.int8.onnx" in broken.describe()
    assert "non-finite outputs" in broken.describe()
    assert broken.to_dict()["max_abs_diff"] is None


def test_quantizers_print_nothing_and_leave_logging_alone(digits, artifacts, tmp_path, capsys):
    model, calibration, _ = digits
    handlers = list(logging.getLogger().handlers)
    export_onnx_quantized(artifacts["none"]["onnx"], tmp_path / "q.onnx", "int8", calibration[:20])
    export_tflite_quantized(model, tmp_path / "q.tflite", "int8", calibration[:20])
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert logging.getLogger().handlers == handlers


def test_calibration_set_is_a_seeded_subset():
    x = np.arange(50, dtype=np.float32).reshape(50, 1)
    a = calibration_set(x, 10, seed=1)
    assert a.shape == (10, 1) and len(np.unique(a)) == 10
    assert np.all(np.diff(a[:, 0]) > 0)  # rows keep their order
    np.testing.assert_array_equal(a, calibration_set(x, 10, seed=1))
    assert not np.array_equal(a, calibration_set(x, 10, seed=2))
    np.testing.assert_array_equal(calibration_set(x, 500), x)


@pytest.mark.parametrize("samples", [0, -3, 2.5, True])
def test_calibration_set_rejects_bad_counts(samples):
    with pytest.raises(ExportError, match="Expected an integer >= 1"):
        calibration_set(np.zeros((4, 2)), samples)


def test_parse_quantize_and_names():
    assert parse_quantize(" INT8 ") == "int8"
    assert QUANTIZE_MODES == ("none", "dynamic", "float16", "int8")
    assert quantized_name("model", "int8", ".tflite") == "model.int8.tflite"
    assert quantized_name("model", "float16", "onnx") == "model.float16.onnx"
    assert quantized_name("model", "none", ".onnx") == "model.onnx"
    with pytest.raises(
        ExportError,
        match=r"Invalid quantization mode\. Expected one of \('none', 'dynamic', 'float16', 'int8'\)\. "
        r"Received: quantize='int4'",
    ):
        parse_quantize("int4")


def test_guards_fire_before_anything_is_written(tmp_path):
    model = build_sequential()
    x = verification_inputs(model, None, samples=4)
    with pytest.raises(ExportError, match="int8 quantization calibrates on real inputs: pass data"):
        export_tflite_quantized(model, tmp_path / "m.tflite", "int8")
    with pytest.raises(ExportError, match="int8 quantization calibrates on real inputs"):
        export_and_verify(model, tmp_path / "out", ("tflite",), x, quantize="int8")
    with pytest.raises(ExportError, match="int8 input/output tensors need quantize='int8'"):
        export_tflite_quantized(model, tmp_path / "m.tflite", "dynamic", int8_io=True)
    with pytest.raises(ExportError, match="Invalid quantization mode"):
        export_and_verify(model, tmp_path / "out", ("tflite",), x, quantize="int3")
    with pytest.raises(ExportError, match="has no quantized artifact"):
        export_tflite_quantized(model, tmp_path / "m.tflite", "none")
    wrong = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ExportError, match=r"calibration samples have shape \(8, 8, 3\) but the model expects \(12, 12, 3\)"):
        export_tflite_quantized(model, tmp_path / "m.tflite", "int8", calibration=wrong)
    with pytest.raises(ExportError, match="calibration samples have shape"):
        export_and_verify(model, tmp_path / "out", ("tflite",), x, quantize="int8", calibration=wrong)
    assert not list(tmp_path.iterdir())


def test_onnx_guards(tmp_path, artifacts):
    with pytest.raises(ExportError, match=r"calibration samples have shape \(4,\) but the model expects \(32, 32, 1\)"):
        export_onnx_quantized(artifacts["none"]["onnx"], tmp_path / "q.onnx", "int8", np.zeros((2, 4), np.float32))
    with pytest.raises(ExportError, match="cannot read ONNX model"):
        export_onnx_quantized(tmp_path / "missing.onnx", tmp_path / "q.onnx", "dynamic")
    assert not list(tmp_path.iterdir())


cli = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = build_sequential()
    model.save(folder / "model.keras")
    write_npz(folder / "d.npz", model, n=32)
    return folder


def test_cli_writes_float_and_int8_artifacts(saved, tmp_path):
    result = cli.invoke(app, [
        "export", str(saved / "model.keras"), "--out", str(tmp_path), "--format", "tflite,onnx",
        "--quantize", "int8", "--data", str(saved / "d.npz"), "--calibration-samples", "16", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.int8.onnx", "model.int8.tflite", "model.onnx", "model.tflite",
    ]
    artifacts = json.loads(result.stdout)["artifacts"]
    assert [(a["format"], a["quantize"], a["passed"]) for a in artifacts] == [
        ("tflite", "none", True), ("onnx", "none", True), ("tflite", "int8", True), ("onnx", "int8", True),
    ]


def test_cli_table_lists_quantized_artifacts(saved, tmp_path):
    result = cli.invoke(app, [
        "export", str(saved / "model.keras"), "--out", str(tmp_path), "--format", "tflite", "--quantize", "float16",
    ])
    assert result.exit_code == 0, result.output
    assert "float16" in result.stdout and "quantized" in result.stdout  # the column may wrap "tflite float16"
    assert (tmp_path / "model.float16.tflite").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int8"], "--quantize int8 calibrates on real inputs: pass --data"),
        (["--quantize", "dynamic", "--int8-io"], "--int8-io needs --quantize int8"),
        (["--quantize", "int4"], "Invalid quantization mode"),
        (["--quantize", "dynamic", "--format", "keras"], "--format keras has neither"),
    ],
)
def test_cli_quantize_guards_exit_1_with_one_line(saved, tmp_path, flags, message):
    result = cli.invoke(app, ["export", str(saved / "model.keras"), "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
