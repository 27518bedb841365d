"""The public Python API: `import compressor`, then compress, inspect, export_model and benchmark.

A tiny residual model in memory and numpy arrays labelled with its own predictions (so
the original is 100% accurate on them and every lost point is the compression's doing).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import compressor
from conftest import build_residual


@pytest.fixture(scope="module")
def model():
    return build_residual()


def _labelled(model, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *model.inputs[0].shape[1:]), dtype=np.float32)
    return x, np.asarray(model(x)).argmax(-1)


@pytest.fixture(scope="module")
def arrays(model):
    return {"val": _labelled(model, 64, 1), "test": _labelled(model, 48, 2)}


def test_import_is_cheap_and_every_public_name_resolves():
    code = (
        "import sys, compressor;"
        "heavy = [m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules];"
        "assert not heavy, heavy;"
        "names = [getattr(compressor, name) for name in compressor.__all__];"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules];"
        "assert not heavy, heavy;"
        "assert set(compressor.__all__) <= set(dir(compressor))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        compressor.nothing  # noqa: B018


def _finite_and_smaller(result, model, x):
    outputs = np.asarray(result.model(x))
    assert outputs.shape == (len(x), 4) and np.all(np.isfinite(outputs))
    assert result.model.count_params() < model.count_params()


def test_compress_fixed_params_on_an_in_memory_model_and_arrays(model, arrays, tmp_path):
    from compressor.report.schema import report_problems

    out = tmp_path / "fp"
    result = compressor.compress(model, data=arrays["test"], method="fixed_params", compression_factor=0.6,
                                 export=("tflite", "keras"), runs=3, warmup=1, out=out)
    assert isinstance(result, compressor.CompressResult)
    assert result.status == "ok" and result.budget_met is True and result.out == out
    assert result.report["budget"]["kind"] == "params" and result.report["budget"]["achieved"] <= 0.6 + 1e-9
    _finite_and_smaller(result, model, arrays["test"][0])
    assert set(result.artifacts) == {"tflite", "keras"}
    assert all(path.is_file() and path.parent == out for path in result.artifacts.values())
    assert report_problems(result.report) == []
    assert json.loads((out / "report.json").read_text()) == result.report
    # The options say which inputs were objects, by name; the model's file is none of the run's inputs.
    assert result.report["options"]["model"] == "keras.Model 'tiny_residual'"
    assert result.report["options"]["data"] == "data arrays"


def test_compress_fixed_loss_on_arrays_and_a_tf_dataset(model, arrays, tmp_path):
    import tensorflow as tf

    test = tf.data.Dataset.from_tensor_slices(arrays["test"]).batch(16)
    result = compressor.compress(model, data=arrays["val"], test_data=test, method="fixed_loss", max_acc_loss=0.3,
                                 export=("tflite",), runs=3, warmup=1, cache_dir=tmp_path / "cache", out=tmp_path / "fl")
    assert result.status in ("ok", "budget_not_met")
    budget = result.report["budget"]
    assert budget["kind"] == "accuracy_drop" and budget["met"] is result.budget_met
    search = result.report["search"]
    # --data's 64 samples: half selection (what the search measures on), half guard (what accepts models).
    assert search["held_out_samples"] == 48 and search["search_samples"] == 32 and search["acceptance"]["samples"] == 32
    _finite_and_smaller(result, model, arrays["test"][0])
    assert result.artifacts["tflite"].is_file()


def test_compress_takes_paths_too(model, arrays, tmp_path):
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "test.npz", x=arrays["test"][0], y=arrays["test"][1])
    result = compressor.compress(tmp_path / "model.keras", data=str(tmp_path / "test.npz"), method="fixed_params",
                                 compression_factor=0.6, techniques="tucker", export="tflite", runs=3, warmup=1,
                                 out=tmp_path / "out")
    assert result.status == "ok" and result.report["options"]["model"] == str(tmp_path / "model.keras")
    assert set(result.artifacts) == {"tflite"}


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"method": "fixed_loss", "max_acc_loss": 0.02}, "method fixed_loss needs labelled data= to measure accuracy on"),
        ({"method": "fixed_loss", "data": "VAL"}, "method fixed_loss needs max_acc_loss= (e.g. 0.02"),
        ({"method": "fixed_params", "compression_factor": 0.5, "finetune_epochs": 2}, "finetune_epochs= needs train_data="),
        ({"method": "fixed_params", "compression_factor": 0.5, "quantize": "dynamic", "int8_io": True},
         "int8_io= needs quantize= int8"),
        ({"method": "fixed_params", "compression_factor": 0.5, "runs": 0}, "Invalid runs. Expected an integer >= 1"),
        ({"method": "fixed_params", "compression_factor": 0.5, "max_acc": 0.1}, "unknown option(s) max_acc"),
        ({"method": "fixed_params", "compression_factor": 0.5, "json": True}, "unknown option(s) json"),
        ({"method": "fixed_params", "compression_factor": 0.5, "data": 42}, "Invalid data=. Expected a path"),
        ({"method": "fixed_params", "compression_factor": 0.5, "techniques": "pruning"}, "Invalid techniques"),
    ],
)
def test_bad_options_name_keywords_and_fail_before_any_work(model, arrays, tmp_path, keywords, message):
    keywords = {key: arrays["val"] if value == "VAL" else value for key, value in keywords.items()}
    with pytest.raises(compressor.CompressorError) as raised:
        compressor.compress(model, out=tmp_path / "never", **keywords)
    assert message in str(raised.value)
    assert not (tmp_path / "never").exists()


def test_a_model_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(compressor.OptionError, match="Expected a keras.Model or the path of a model file. Received: int"):
        compressor.compress(42, method="fixed_params", compression_factor=0.5, out=tmp_path / "o")


def test_the_signature_and_help_list_every_option_as_a_keyword():
    import inspect

    parameters = inspect.signature(compressor.compress).parameters
    assert parameters["max_acc_loss"].default is None and parameters["techniques"].default == ("auto",)
    assert "json" not in parameters and "quiet" not in parameters  # how the command line prints, not options of a run
    assert "calibration_samples (default 200): Samples that calibrate int8 quantization, from train_data= (else data=)" \
        in compressor.compress.__doc__


# --- the building blocks ------------------------------------------------------------------------


def test_inspect_gives_the_rows_the_command_prints(model, tmp_path):
    from compressor.cli.app import app

    model.save(tmp_path / "model.keras")
    inspection = compressor.inspect(model)
    assert inspection.model == "tiny_residual" and inspection.params == model.count_params()
    assert inspection.free_inputs == () and inspection.flops == sum(layer.flops for layer in inspection.layers)
    printed = CliRunner().invoke(app, ["inspect", str(tmp_path / "model.keras"), "--json"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == inspection.to_dict() == compressor.inspect(tmp_path / "model.keras").to_dict()


def test_export_model_checks_each_artifact_against_the_model(model, arrays, tmp_path, monkeypatch):
    checks = compressor.export_model(model, tmp_path / "out", formats=("tflite", "keras"), data=arrays["test"], samples=16)
    assert [check.format for check in checks] == ["tflite", "keras"]
    assert all(check.passed and check.samples == 16 and check.top1_agreement == 1.0 for check in checks)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny_residual.keras", "tiny_residual.tflite"]

    from compressor.export import verify

    real = verify.artifact_outputs
    monkeypatch.setattr(verify, "artifact_outputs", lambda fmt, path, x, **kw: real(fmt, path, x, **kw) + 0.5)
    with pytest.raises(compressor.VerificationError, match="tflite"):
        compressor.export_model(model, tmp_path / "drift", formats="tflite")
    loose = compressor.export_model(model, tmp_path / "drift", formats="tflite", strict=False)
    assert not loose[0].passed and (tmp_path / "drift" / "tiny_residual.tflite").is_file()


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"quantize": "int8"}, "quantize= int8 calibrates on real inputs: pass data="),
        ({"quantize": "dynamic", "int8_io": True}, "int8_io= needs quantize= int8"),
        ({"quantize": "dynamic", "formats": "keras"}, "quantize= dynamic quantizes tflite and onnx artifacts; formats= keras has neither"),
    ],
)
def test_export_model_refuses_what_cannot_work(model, tmp_path, keywords, message):
    with pytest.raises(compressor.OptionError) as raised:
        compressor.export_model(model, tmp_path / "out", **keywords)
    assert message in str(raised.value)


def test_benchmark_times_artifacts_and_gates_on_a_baseline(model, arrays, tmp_path):
    checks = compressor.export_model(model, tmp_path, formats="tflite", data=arrays["test"])
    run = compressor.benchmark([checks[0].path, checks[0].path], data=arrays["test"], runs=3, warmup=1)
    assert run.passed and run.gate is None and "gate" not in run.report
    first, second = run.report["results"]
    assert first["latency_ms"]["median"] > 0 and first["accuracy"] == 1.0 and second["ratio_to_first"] > 0
    assert run.report["input"] == "data arrays" and run.report["samples"] == 48 and run.report["host"]["name"]

    fast = json.loads(json.dumps(run.report))
    for result in fast["results"]:
        result["latency_ms"] = {key: value / 1000 for key, value in result["latency_ms"].items()}
    gated = compressor.benchmark([checks[0].path], runs=3, warmup=1, baseline=fast)
    assert not gated.passed and gated.report["gate"]["passed"] is False and gated.gate.regressions
    with pytest.raises(compressor.OptionError, match="remote_python= and remote_timeout= apply only with remote="):
        compressor.benchmark([checks[0].path], remote_timeout=5)


def test_the_api_example_runs(model, arrays, tmp_path):
    from pathlib import Path

    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "val.npz", x=arrays["val"][0], y=arrays["val"][1])
    script = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "model.keras"), str(tmp_path / "val.npz"),
                          str(tmp_path / "build")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tiny_residual:") and "accuracy 1.000" in out.stdout


def test_examples_import_only_the_public_surface():
    import ast
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
    assert examples
    for path in examples:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                inside = [alias.name for alias in node.names if alias.name.split(".")[0] == "compressor"]
                assert all(name == "compressor" for name in inside), (path.name, inside)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "compressor":
                assert node.module == "compressor", (path.name, node.module)
                assert {alias.name for alias in node.names} <= set(compressor.__all__), (path.name, node.module)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "compressor":
                assert node.attr in compressor.__all__, (path.name, node.attr)
