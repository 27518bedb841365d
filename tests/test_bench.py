"""Tests for `compressor bench`: latency and accuracy of .tflite and .onnx artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from typer.testing import CliRunner  # noqa: E402

from compressor.bench.benchmark import BenchReport, benchmark  # noqa: E402
from compressor.bench.latency import LatencyStats, rotated_order, time_interleaved  # noqa: E402
from compressor.cli.app import app  # noqa: E402
from compressor.errors import CompressorError, DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 3)
CLASSES = 5
SAMPLES = 40
FAST = ["--runs", "5", "--warmup", "1"]


def _conv_net(keras, shape=SHAPE, filters=(8, 16)):
    inputs = keras.Input(shape)
    x = inputs
    for f in filters:
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def _export(tf, model, folder: Path, name: str, onnx_too: bool = True) -> dict[str, Path]:
    import onnx
    import tf2onnx

    paths = {"tflite": folder / f"{name}.tflite"}
    paths["tflite"].write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    if onnx_too:
        spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input")]
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
        paths["onnx"] = folder / f"{name}.onnx"
        onnx.save(proto, str(paths["onnx"]))
    return paths


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Two conv nets as .tflite and .onnx, an .npz of inputs and labels, and Keras' accuracy."""
    import keras
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("bench")
    keras.utils.set_random_seed(0)
    big = _conv_net(keras)
    small = _conv_net(keras, filters=(4,))
    odd = _conv_net(keras, shape=(8, 8, 1), filters=(2,))
    # The small net again, with its batch fixed at 3 (40 samples leave a partial batch).
    fixed = keras.Input(SHAPE, batch_size=3)
    outputs = fixed
    for layer in small.layers[1:]:
        outputs = layer(outputs)
    fixed_batch = keras.Model(fixed, outputs)
    x = np.random.default_rng(0).standard_normal((SAMPLES, *SHAPE)).astype(np.float32)
    # Labels: the big model's own answer for the first half, a wrong one for the second,
    # so its accuracy is exactly 0.5 and right and wrong answers are both counted.
    y = big.predict(x, verbose=0).argmax(axis=1)
    y[SAMPLES // 2 :] = (y[SAMPLES // 2 :] + 1) % CLASSES
    data = folder / "val.npz"
    np.savez(data, x=x, y=y)
    unlabelled = folder / "unlabelled.npz"
    np.savez(unlabelled, x=x)
    wrong_shape = folder / "wrong_shape.npz"
    np.savez(wrong_shape, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    accuracy = {
        name: float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))
        for name, model in (("big", big), ("small", small))
    }
    return {
        "big": _export(tf, big, folder, "big"),
        "small": _export(tf, small, folder, "small"),
        "odd": _export(tf, odd, folder, "odd", onnx_too=False),
        "fixed_batch": _export(tf, fixed_batch, folder, "fixed_batch", onnx_too=False),
        "data": data,
        "unlabelled": unlabelled,
        "wrong_shape": wrong_shape,
        "accuracy": accuracy,
        "folder": folder,
    }


def _invoke(*args: object):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


# --- timing helpers -----------------------------------------------------------------


def test_rounds_are_interleaved_and_rotated():
    calls: list[tuple[int, int]] = []
    fns = [lambda r, i=i: calls.append((i, r)) for i in range(3)]

    samples = time_interleaved(fns, runs=4, warmup=2)

    assert [len(s) for s in samples] == [4, 4, 4]
    assert all(s.dtype == np.int64 and (s >= 0).all() for s in samples)
    rounds = [calls[k : k + 3] for k in range(0, len(calls), 3)]
    assert len(rounds) == 6  # 2 warm-up + 4 timed, each artifact once per round
    for r, this_round in enumerate(rounds):
        assert [i for i, _ in this_round] == rotated_order(3, r)
        assert {rr for _, rr in this_round} == {r}
    firsts = [this_round[0][0] for this_round in rounds]
    assert firsts == [0, 1, 2, 0, 1, 2]


def test_latency_stats_are_ordered_and_in_ms():
    stats = LatencyStats.from_ns([3_000_000, 1_000_000, 2_000_000, 10_000_000])
    assert stats.min == 1.0 and stats.max == 10.0 and stats.median == 2.5
    assert stats.min <= stats.median <= stats.p90 <= stats.max


# --- library ------------------------------------------------------------------------


def test_benchmark_two_artifacts_with_data(arts):
    paths = [arts["big"]["tflite"], arts["small"]["onnx"]]

    report = benchmark(paths, data=arts["data"], runs=20, warmup=2)

    assert isinstance(report, BenchReport)
    assert len(report.results) == 2
    assert report.runs == 20 and report.warmup == 2 and report.threads == 1
    assert report.samples == SAMPLES
    for path, result in zip(paths, report.results):
        lat = result.latency_ms
        assert 0 < lat.min <= lat.median <= lat.p90 <= lat.max
        assert result.bytes == path.stat().st_size
        assert result.path == str(path)
        assert result.batch == 1
    assert [r.format for r in report.results] == ["tflite", "onnx"]
    assert report.results[0].ratio_to_first == 1.0
    second = report.results[1]
    assert second.ratio_to_first == pytest.approx(
        second.latency_ms.median / report.results[0].latency_ms.median
    )


@pytest.mark.parametrize("model", ["big", "small"])
@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_accuracy_matches_keras(arts, model, fmt):
    report = benchmark([arts[model][fmt]], data=arts["data"], runs=1, warmup=0)
    # Top-1 over 40 samples: float differences between runtimes (~1e-6) cannot flip
    # an argmax unless two logits tie that closely, so the accuracy is exact.
    assert report.results[0].accuracy == pytest.approx(arts["accuracy"][model], abs=1e-6)
    if model == "big":
        assert report.results[0].accuracy == pytest.approx(0.5)


def test_fixed_batch_artifact_is_timed_at_its_batch(arts):
    paths = [arts["small"]["tflite"], arts["fixed_batch"]["tflite"]]
    report = benchmark(paths, data=arts["data"], runs=3, warmup=1)
    assert [r.batch for r in report.results] == [1, 3]
    assert report.results[1].accuracy == pytest.approx(arts["accuracy"]["small"], abs=1e-6)


def test_generated_input_without_data(arts):
    report = benchmark([arts["big"]["tflite"], arts["big"]["onnx"]], runs=5, warmup=1, threads=0)
    assert report.input == "generated" and report.samples == 0 and report.threads == 0
    assert all(r.accuracy is None and r.latency_ms.median > 0 for r in report.results)


def test_unlabelled_data_times_without_accuracy(arts):
    report = benchmark([arts["small"]["tflite"]], data=arts["unlabelled"], runs=3, warmup=0)
    assert report.results[0].accuracy is None and report.samples == 0


def test_report_to_dict_is_json(arts):
    report = benchmark([arts["small"]["tflite"]], runs=2, warmup=0)
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["results"][0]["ratio_to_first"] == 1.0
    assert set(payload["results"][0]["latency_ms"]) == {"median", "p90", "min", "max", "mean", "std", "p5", "p95"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"runs": 0}, "runs must be an integer >= 1. Received: runs=0"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"threads": -2}, "threads must be an integer >= 0"),
    ],
)
def test_benchmark_rejects_bad_options(arts, kwargs, match):
    with pytest.raises(CompressorError, match=match):
        benchmark([arts["small"]["tflite"]], **kwargs)


def test_benchmark_rejects_no_artifacts():
    with pytest.raises(CompressorError, match="one or more"):
        benchmark([])


def test_benchmark_rejects_data_that_does_not_fit(arts):
    with pytest.raises(DataError, match=r"\(8, 8, 1\).*\(16, 16, 3\)"):
        benchmark([arts["small"]["tflite"]], data=arts["wrong_shape"], runs=1)


# --- command line -------------------------------------------------------------------


def test_cli_json(arts):
    a, b = arts["big"]["onnx"], arts["small"]["tflite"]

    result = _invoke(a, b, "--data", arts["data"], "--json", *FAST)

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["runs"] == 5 and payload["warmup"] == 1 and payload["threads"] == 1
    first, second = payload["results"]
    assert first["path"] == str(a) and second["path"] == str(b)
    assert first["format"] == "onnx" and second["format"] == "tflite"
    assert first["bytes"] == a.stat().st_size and second["bytes"] == b.stat().st_size
    assert first["ratio_to_first"] == 1.0 and second["ratio_to_first"] > 0
    assert first["accuracy"] == pytest.approx(arts["accuracy"]["big"], abs=1e-6)
    assert second["accuracy"] == pytest.approx(arts["accuracy"]["small"], abs=1e-6)
    for entry in (first, second):
        lat = entry["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]


def test_cli_json_without_labels_has_null_accuracy(arts):
    result = _invoke(arts["small"]["onnx"], "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["accuracy"] is None


def test_cli_table(arts, monkeypatch):
    monkeypatch.chdir(arts["folder"])  # short relative paths, as people type them
    result = _invoke("big.tflite", "small.tflite", "--data", "val.npz", *FAST)
    assert result.exit_code == 0, result.output
    for text in ("big.tflite", "small.tflite", "1.00×", "50.0%", "median", "p90", "× first"):
        assert text in result.stdout


def test_cli_does_not_import_tensorflow(arts):
    """The bench command runs on boards without TensorFlow: it must not import it."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from typer.testing import CliRunner
        from compressor.cli.app import app
        args = ["bench", {str(arts["big"]["tflite"])!r}, {str(arts["small"]["onnx"])!r},
                "--data", {str(arts["data"])!r}, "--runs", "3", "--warmup", "1", "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["results"]) == 2
        leaked = [m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules]
        assert not leaked, leaked
        print("clean")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout


def _corrupt(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "artifact not found"),
        ("extension", "expected a .tflite or .onnx file"),
        ("corrupt_tflite", "tflite runtime could not load"),
        ("corrupt_onnx", "onnx runtime could not load"),
        ("data_shape", "but the model expects (16, 16, 3)"),
        ("different_inputs", "artifacts take different inputs"),
        ("runs", "runs must be an integer >= 1"),
        ("warmup", "warmup must be an integer >= 0"),
        ("threads", "threads must be an integer >= 0"),
        ("missing_data", "data file not found"),
    ],
)
def test_cli_errors_are_one_line(arts, case, message):
    folder = arts["folder"]
    good = arts["small"]["tflite"]
    args = {
        "missing": [folder / "nope.tflite"],
        "extension": [arts["data"]],
        "corrupt_tflite": [good, _corrupt(folder, "corrupt.tflite")],
        "corrupt_onnx": [_corrupt(folder, "corrupt.onnx")],
        "data_shape": [good, "--data", arts["wrong_shape"]],
        "different_inputs": [good, arts["odd"]["tflite"]],
        "runs": [good, "--runs", "0"],
        "warmup": [good, "--warmup", "-1"],
        "threads": [good, "--threads", "-1"],
        "missing_data": [good, "--data", folder / "nope.npz"],
    }[case]

    result = _invoke(*args)

    assert result.exit_code != 0
    assert "error:" in result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
