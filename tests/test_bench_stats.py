"""Tests for the statistics LiteRT users expect from a benchmark: spread of the runs (std,
p5, p95), load and first-inference time apart from the runs, peak memory per artifact in
a fresh process, and the delegate and execution provider the artifacts ran with.

The models are one matrix product each, 1 MB and 20 MB of float32 weights: ONNX files
written with onnx.helper, TFLite files converted from a tf.function.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from typer.testing import CliRunner  # noqa: E402

from compressor.bench.benchmark import benchmark  # noqa: E402
from compressor.bench.latency import LatencyStats  # noqa: E402
from compressor.bench.remote import bench_remote  # noqa: E402
from compressor.bench.runtime import ArtifactRunner, open_artifact  # noqa: E402
from compressor.cli.app import app  # noqa: E402
from compressor.errors import OptionError  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402

# (inputs, outputs) of each matrix product: 1024 x 256 floats = 1 MiB, 1024 x 5120 = 20 MiB.
# The same input, so that both can be timed in one run.
SIZES = {"small": (1024, 256), "large": (1024, 5120)}
SAMPLES = 16
FAST = {"runs": 3, "warmup": 1}


def _onnx_matmul(path: Path, n: int, m: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((n, m)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _tflite_matmul(path: Path, n: int, m: int) -> None:
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(0).standard_normal((n, m)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, n], tf.float32)])
    def matmul(x):
        return tf.matmul(x, w)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([matmul.get_concrete_function()], matmul)
    path.write_bytes(converter.convert())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_stats")
    for name, (n, m) in SIZES.items():
        _onnx_matmul(folder / f"{name}.onnx", n, m)
        _tflite_matmul(folder / f"{name}.tflite", n, m)
    # Labels: the small model's own top-1, so its accuracy is 1 with any kernels that agree.
    x = np.random.default_rng(1).standard_normal((SAMPLES, SIZES["small"][0])).astype(np.float32)
    y = open_artifact(folder / "small.tflite").predict(x).argmax(axis=1)
    np.savez(folder / "small.npz", x=x, y=y)
    return folder


def _invoke(*args: object):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


# --- statistics of the runs -----------------------------------------------------------------


def test_std_p5_p95_on_known_samples():
    # 2, 4, 4, 4, 5, 5, 7, 9 ms: mean 5, mean squared deviation 4, so std 2 (over all runs).
    # Percentiles interpolate linearly between sorted runs: p5 sits 0.35 of the way from
    # the 1st run to the 2nd (2 + 0.35 * 2), p95 0.65 of the way from the 7th to the 8th.
    stats = LatencyStats.from_ns([int(ms * 1e6) for ms in (5, 2, 9, 4, 4, 7, 4, 5)])
    assert stats.mean == pytest.approx(5.0, abs=1e-12)
    assert stats.std == pytest.approx(2.0, abs=1e-12)
    assert stats.p5 == pytest.approx(2.7, abs=1e-12)
    assert stats.p95 == pytest.approx(8.3, abs=1e-12)
    assert stats.median == pytest.approx(4.5, abs=1e-12)


def test_one_run_has_no_spread():
    stats = LatencyStats.from_ns([3_000_000])
    assert stats.std == 0.0 and stats.p5 == stats.p95 == stats.median == 3.0


# --- load and first inference apart from the runs ------------------------------------------


def test_init_and_first_call_are_not_in_the_timed_runs(models, monkeypatch):
    """A runner whose first call takes 200 ms and the rest none: only first_inference_ms shows it."""
    calls = []

    def invoke(x):
        calls.append(len(x))
        if len(calls) == 1:
            time.sleep(0.2)
        return np.zeros((len(x), 2), np.float32)

    runner = ArtifactRunner(models / "small.tflite", "tflite", (None, 4), np.dtype(np.float32), invoke,
                            init_ms=123.0, delegate="xnnpack")
    monkeypatch.setattr("compressor.bench.benchmark.open_artifact", lambda *args, **kwargs: runner)

    report = benchmark([models / "small.tflite"], data=Dataset(np.ones((8, 4), np.float32), None, "ones"),
                       runs=5, warmup=2, memory=False)
    result = report.results[0]
    assert len(calls) == 1 + 2 + 5  # the first call, then warm-up, then the timed runs
    assert result.init_ms == 123.0
    assert result.first_inference_ms >= 200.0
    assert result.latency_ms.max < 100.0  # 0 ms each, with room for a loaded machine
    assert result.peak_memory_bytes is None


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_real_init_is_measured_and_exceeds_a_run(models, fmt):
    """Loading 20 MB of weights (XNNPACK packs them; onnxruntime copies them) takes longer than one product."""
    report = benchmark([models / f"large.{fmt}"], runs=5, warmup=1, memory=False)
    result = report.to_dict()["results"][0]
    assert result["init_ms"] > result["latency_ms"]["median"] > 0
    assert result["first_inference_ms"] > 0


# --- peak memory -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, xnnpack", [("tflite", True), ("tflite", False), ("onnx", True)])
def test_peak_memory_grows_with_the_model(models, fmt, xnnpack):
    """Measured one process per artifact: the 20 MB model's peak exceeds the 1 MB one's by at least half the difference."""
    small, large = models / f"small.{fmt}", models / f"large.{fmt}"
    # One run for both, the large first: in a shared process its arena would hide the small one's.
    report = benchmark([large, small], xnnpack=xnnpack, **FAST)
    large_peak, small_peak = (result.peak_memory_bytes for result in report.results)
    difference = large.stat().st_size - small.stat().st_size
    assert small_peak > 0
    assert large_peak - small_peak >= 0.5 * difference, (large_peak, small_peak, difference)


# --- delegate and execution provider -----------------------------------------------------


def test_no_xnnpack_changes_the_delegate_not_the_outputs(models):
    x = np.load(models / "small.npz")["x"]
    default, builtin = (open_artifact(models / "small.tflite", xnnpack=flag) for flag in (True, False))
    assert (default.delegate, builtin.delegate) == ("xnnpack", "none")
    ours, theirs = default.predict(x), builtin.predict(x)
    # Different kernels sum in a different order: equal to float32 rounding, same top-1.
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(np.abs(ours).max()))
    assert np.array_equal(theirs.argmax(axis=1), ours.argmax(axis=1))

    result = _invoke(models / "small.tflite", models / "small.onnx", "--data", models / "small.npz",
                     "--no-xnnpack", "--json", "--runs", "3", "--warmup", "1")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["xnnpack"] is False
    tflite, onnx = payload["results"]
    assert (tflite["delegate"], tflite["provider"]) == ("none", None)
    assert (onnx["delegate"], onnx["provider"]) == (None, "CPUExecutionProvider")
    assert tflite["accuracy"] == onnx["accuracy"] == 1.0
    assert tflite["threads"] == onnx["threads"] == 1


def test_table_shows_the_runtime_statistics(models):
    result = _invoke(models / "small.tflite", models / "small.onnx", "--no-xnnpack", "--runs", "3", "--warmup", "1")
    assert result.exit_code == 0, result.output
    for text in ("init", "1st call", "std", "p5", "p95", "peak memory", "no delegate", "CPU"):
        assert text in result.stdout, text


def test_bad_onnx_provider_is_one_line_and_exit_1(models):
    result = _invoke(models / "small.onnx", "--onnx-provider", "NoSuchExecutionProvider", "--runs", "1")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "--onnx-provider 'NoSuchExecutionProvider' is not available" in lines[0]
    assert "CPUExecutionProvider" in lines[0]  # what this onnxruntime has


def test_bad_onnx_provider_in_python_names_the_keyword(models):
    with pytest.raises(OptionError, match="onnx_provider= 'Nope' is not available"):
        benchmark([models / "small.onnx"], onnx_provider="Nope", runs=1)


# --- through --remote ----------------------------------------------------------------------


def test_remote_run_measures_the_same_statistics(models, tmp_path):
    """On the far side too: a fresh process per artifact for memory, the delegate as asked."""
    work = tmp_path / "board"
    work.mkdir()
    site = sysconfig.get_paths()["purelib"]
    prefix = f"env -C {shlex.quote(str(work))} PYTHONPATH={shlex.quote(site)} TMPDIR={shlex.quote(str(work))}"
    report = bench_remote([models / "large.tflite", models / "small.tflite"], prefix, xnnpack=False,
                          python=f"{shlex.quote(sys.executable)} -S", **FAST)
    large, small = report["results"]
    assert report["xnnpack"] is False and large["delegate"] == small["delegate"] == "none"
    assert large["init_ms"] > 0 and large["first_inference_ms"] > 0 and {"std", "p5", "p95"} <= set(large["latency_ms"])
    difference = (models / "large.tflite").stat().st_size - (models / "small.tflite").stat().st_size
    assert large["peak_memory_bytes"] - small["peak_memory_bytes"] >= 0.5 * difference
    assert not list(work.iterdir())
