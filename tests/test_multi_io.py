"""Models with two inputs and two outputs through inspect, export, parity, bench and compress.

The model: an image branch (Conv2D) and a metadata branch (Dense), concatenated, with a
softmax classification head `label` and a linear regression head `score`. It is trained
briefly on a learnable task, and its labels are then its own predictions, so the
original is 100% accurate on them and every lost point is the compression's doing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.errors import DataError
from compressor.io.data import load_data

runner = CliRunner()
ATOL = 1e-4


def _samples(n, seed):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 8, 8, 3)).astype("float32"),
            "meta": rng.standard_normal((n, 5)).astype("float32")}


def _build():
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((5,), name="meta")
    a = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(image)
    a = keras.layers.Conv2D(24, 3, activation="relu", name="conv2")(a)
    a = keras.layers.GlobalAveragePooling2D(name="gap")(a)
    b = keras.layers.Dense(16, activation="relu", name="meta_dense")(meta)
    h = keras.layers.Concatenate(name="cat")([a, b])
    h = keras.layers.Dense(48, activation="relu", name="trunk")(h)
    label = keras.layers.Dense(4, activation="softmax", name="label")(h)
    score = keras.layers.Dense(1, name="score")(h)
    model = keras.Model({"image": image, "meta": meta}, [label, score], name="two_io")
    x = _samples(1024, seed=9)
    classes = (x["meta"][:, :2] > 0).astype(int) @ np.array([1, 2])  # 4 classes from two signs
    target = x["meta"].sum(axis=1, keepdims=True) + x["image"].mean(axis=(1, 2, 3))[:, None]
    model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    model.fit(x, [classes, target], epochs=12, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_io")
    model = _build()
    model.save(folder / "model.keras")
    x = _samples(1600, seed=1)
    label, score = model.predict(x, verbose=0)
    np.savez(folder / "labelled.npz", **x, y_label=label.argmax(-1), y_score=score)
    return folder, model


def test_inspect_lists_named_inputs_and_outputs(workdir):
    folder, _ = workdir
    result = runner.invoke(app, ["inspect", str(folder / "model.keras")])
    assert result.exit_code == 0, result.output
    assert "Inputs: image 8x8x3, meta 5" in result.stdout
    assert "Outputs: label 4, score 1" in result.stdout
    shown = json.loads(runner.invoke(app, ["inspect", str(folder / "model.keras"), "--json"]).stdout)
    assert shown["inputs"] == [{"name": "image", "shape": [8, 8, 3]}, {"name": "meta", "shape": [5]}]
    assert [o["name"] for o in shown["outputs"]] == ["label", "score"]


def test_export_both_formats_named_with_parity_on_every_output(workdir, tmp_path):
    from compressor.bench.runtime import open_artifact
    from compressor.export.verify import export_and_verify, verification_inputs

    folder, model = workdir
    data = load_data(folder / "labelled.npz", input_shape={"image": (8, 8, 3), "meta": (5,)})
    checks = export_and_verify(model, tmp_path, ("tflite", "onnx"), verification_inputs(model, data, 64))
    for check in checks:
        assert set(check.output_diffs) == {"label", "score"}
        assert max(check.output_diffs.values()) == check.max_abs_diff <= ATOL, check.describe()
        assert check.top1_agreement == 1.0
        artifact = open_artifact(check.path)
        assert [i.name for i in artifact.inputs] == ["image", "meta"]
        assert set(artifact.output_names) == {"label", "score"}
        # Fed by name: the same outputs whatever order the dict lists the inputs in.
        swapped = {"meta": data.x["meta"][:8], "image": data.x["image"][:8]}
        np.testing.assert_allclose(artifact.predict(swapped, output="score"), model.predict(swapped, verbose=0)[1],
                                   atol=ATOL)


def test_bench_generates_or_reads_each_input(workdir, tmp_path):
    from compressor.bench.benchmark import benchmark
    from compressor.export.verify import export_and_verify, verification_inputs

    folder, model = workdir
    export_and_verify(model, tmp_path, ("tflite", "onnx"), verification_inputs(model, None, 8))
    paths = [tmp_path / "model.tflite", tmp_path / "model.onnx"]
    generated = benchmark(paths, runs=3, warmup=1, memory=False)
    assert generated.input == "generated" and all(r.latency_ms.median > 0 for r in generated.results)
    x = _samples(40, seed=3)
    np.savez(tmp_path / "bench.npz", **x, y=model.predict(x, verbose=0)[0].argmax(-1))
    read = benchmark(paths, data=tmp_path / "bench.npz", runs=3, warmup=1, memory=False)
    assert [r.accuracy for r in read.results] == [1.0, 1.0]


def test_data_free_compress_reaches_half_the_params_and_exports_with_parity(workdir, tmp_path):
    import compressor

    folder, _ = workdir
    result = compressor.compress(folder / "model.keras", out=tmp_path / "out", method="fixed_params",
                                 compression_factor=0.5, export=("tflite", "onnx"), runs=3)
    report = result.report
    assert report["budget"]["met"] is True and report["budget"]["achieved"] <= 0.5
    assert {a["format"] for a in report["artifacts"]} == {"tflite", "onnx"}
    assert all(a["max_abs_diff"] <= ATOL for a in report["artifacts"])


def test_fixed_loss_reads_the_named_labels_of_one_output(workdir, tmp_path):
    import compressor

    folder, _ = workdir
    lines = []
    result = compressor.compress(folder / "model.keras", folder / "labelled.npz", out=tmp_path / "fl",
                                 method="fixed_loss", max_acc_loss=0.05, export=("tflite",), runs=3, log=lines.append)
    report = result.report
    assert report["budget"]["met"] is True and report["budget"]["achieved"] <= 0.05
    assert report["baseline"]["accuracy"] == 1.0  # the labels are the `label` head's own predictions
    assert report["compressed"]["flops"] < report["baseline"]["flops"]
    assert any("accuracy reads output 'label'" in line for line in lines), lines


def test_single_input_shorthand_is_unchanged(tmp_path):
    x = np.random.default_rng(0).random((6, 4), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    data = load_data(tmp_path / "d.npz", input_shape=(4,))
    assert isinstance(data.x, np.ndarray) and data.targets == {} and data.output is None
    np.testing.assert_array_equal(data.take(3).y, [0, 1, 0])
    # A single-input model with two outputs: `x`, and `y_<output>` per output.
    np.savez(tmp_path / "two_out.npz", x=x, y_a=np.arange(6) % 3, y_b=x.sum(axis=1))
    data = load_data(tmp_path / "two_out.npz", input_shape={"in": (4,)})
    assert isinstance(data.x, np.ndarray) and set(data.targets) == {"a", "b"}


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((4, 8, 8, 3))}, r"no array for input 'meta'"),
    ({"image": np.zeros((4, 8, 8, 3)), "meta": np.zeros((4, 6))}, r"shape \(6,\) for input 'meta'.*expects \(5,\)"),
    ({"x": np.zeros((4, 5))}, r"no array for input 'image'"),
])
def test_bad_npz_names_the_input(workdir, tmp_path, arrays, message):
    folder, _ = workdir
    np.savez(tmp_path / "bad.npz", **{k: v.astype("float32") for k, v in arrays.items()})
    with pytest.raises(DataError, match=message):
        load_data(tmp_path / "bad.npz", input_shape={"image": (8, 8, 3), "meta": (5,)})
    result = runner.invoke(app, ["compress", str(folder / "model.keras"), "--out", str(tmp_path / "o"),
                                 "--method", "fixed_params", "--compression-factor", "0.5",
                                 "--data", str(tmp_path / "bad.npz")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "input '" in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0])


def test_a_regression_metric_reads_the_output_it_names(workdir, tmp_path):
    import compressor
    from compressor.errors import CompressorError

    folder, model = workdir
    x = _samples(1600, seed=2)
    target = x["meta"].sum(axis=1, keepdims=True) + x["image"].mean(axis=(1, 2, 3))[:, None]
    label, score = model.predict(x, verbose=0)
    np.savez(tmp_path / "reg.npz", **x, y_label=label.argmax(-1), y_score=target)
    args = dict(method="fixed_loss", metric="mse", max_metric_loss=0.5, export=("tflite",), runs=3)
    with pytest.raises(CompressorError, match="label, score"):  # a metric on numbers: the output must be named
        compressor.compress(folder / "model.keras", tmp_path / "reg.npz", out=tmp_path / "unnamed", **args)
    result = compressor.compress(folder / "model.keras", tmp_path / "reg.npz", out=tmp_path / "mse",
                                 metric_output="score", **args)
    budget = result.report["budget"]
    assert budget["metric"]["name"] == "mse" and budget["met"] is True and budget["achieved"] <= 0.5
    # The original's MSE on the held-out part is the score head's against y_score (not the label head's):
    # the whole file's value, within the spread of a random fifth of it.
    whole = float(np.mean((score - target) ** 2))
    assert 0.5 * whole <= budget["metric"]["baseline_value"] <= 2.0 * whole
    assert result.report["compressed"]["flops"] < result.report["baseline"]["flops"]


def test_agreement_reads_the_first_class_score_output_without_being_told(workdir, tmp_path):
    import compressor

    folder, model = workdir
    x = _samples(800, seed=3)
    np.savez(tmp_path / "unlabelled.npz", **x)  # no labels at all: agreement needs none
    lines = []
    result = compressor.compress(folder / "model.keras", tmp_path / "unlabelled.npz", out=tmp_path / "agree",
                                 method="fixed_loss", metric="agreement", max_metric_loss=0.1, export=("tflite",),
                                 runs=3, log=lines.append)
    budget = result.report["budget"]
    assert budget["met"] is True
    assert result.report["baseline"]["accuracy"] == 1.0  # the original agrees with itself on every sample
    assert any("label" in line for line in lines), lines  # the log names the output it chose
