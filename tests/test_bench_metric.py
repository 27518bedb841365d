"""`compressor bench --metric`: top1, top5, mse, mae, agreement and hooks, per artifact, here and through --remote.

Each expected value is computed with numpy from the artifact's own runtime outputs
(`open_artifact(...).predict`), so the tests check what the bench reads and how it
reduces it, not the runtimes. The runtimes are deterministic on the same inputs and
batches, and the reductions differ only in summation order: RTOL below.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from typer.testing import CliRunner  # noqa: E402

from compressor.bench.benchmark import benchmark  # noqa: E402
from compressor.bench.runtime import open_artifact  # noqa: E402
from compressor.cli.app import app  # noqa: E402

FEATURES, CLASSES, TARGETS, SAMPLES = 8, 6, 3, 48
FAST = {"runs": 3, "warmup": 1}
CLI_FAST = ["--runs", "3", "--warmup", "1"]
RTOL = 1e-5  # float32 outputs reduced in float64 either way; only the order of the sums differs
SITE = sysconfig.get_paths()["purelib"]  # see tests/test_remote_bench.py: the board imports only shipped files
ISOLATED_PYTHON = f"{shlex.quote(sys.executable)} -S"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Two classifiers (.tflite, .onnx), a regressor, a two-output model, and data for each."""
    import keras

    from compressor.export.verify import export_and_verify

    folder = tmp_path_factory.mktemp("bench_metric")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)

    def dense(*widths, name=None):
        inputs = keras.Input((FEATURES,))
        h = inputs
        for width in widths[:-1]:
            h = keras.layers.Dense(width, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(widths[-1])(h), name=name)

    image = keras.Input((FEATURES,), name="features")
    h = keras.layers.Dense(16, activation="relu")(image)
    two = keras.Model(image, [keras.layers.Dense(4, activation="softmax", name="label")(h),
                              keras.layers.Dense(2, name="score")(h)], name="two")
    models = {"big": dense(32, CLASSES), "small": dense(CLASSES), "reg": dense(16, TARGETS), "two": two}
    for stem, model in models.items():
        formats = ("tflite",) if stem == "two" else ("tflite", "onnx")
        export_and_verify(model, folder, formats, x[:8], stem=stem)
    # Labels: the big model's classes, the last third shifted, so right and wrong both count.
    y = models["big"].predict(x, verbose=0).argmax(axis=1)
    y[2 * SAMPLES // 3:] = (y[2 * SAMPLES // 3:] + 1) % CLASSES
    np.savez(folder / "classes.npz", x=x, y=y)
    np.savez(folder / "unlabelled.npz", x=x)
    np.savez(folder / "targets.npz", x=x, y=rng.standard_normal((SAMPLES, TARGETS)).astype(np.float32))
    label, _ = two.predict(x, verbose=0)
    np.savez(folder / "two.npz", x=x, y_label=label.argmax(-1),
             y_score=rng.standard_normal((SAMPLES, 2)).astype(np.float32))
    return folder


def _outputs(path, x, output=None):
    return open_artifact(path).predict(x, output=output).reshape(len(x), -1).astype(np.float64)


def _data(arts, name):
    with np.load(arts / name) as archive:
        return {key: archive[key] for key in archive.files}


def _bench(arts, names, data, **kwargs):
    return benchmark([arts / name for name in names], data=arts / data, memory=False, **FAST, **kwargs).to_dict()


def _cli(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


@pytest.mark.parametrize("name", ["mse", "mae"])
def test_mse_and_mae_are_numpys_mean_error_on_the_runtime_outputs(arts, name):
    from compressor.metrics import resolve_metric

    data = _data(arts, "targets.npz")
    report = _bench(arts, ["reg.tflite", "reg.onnx"], "targets.npz", metric=resolve_metric(name))

    assert report["metric"] == {"name": name, "higher_is_better": False, "output": None}
    assert report["samples"] == SAMPLES
    for result in report["results"]:
        error = _outputs(result["path"], data["x"]) - data["y"]
        expected = np.mean(np.square(error) if name == "mse" else np.abs(error))
        assert result["metric_value"] == pytest.approx(expected, rel=RTOL)
        assert result["accuracy"] is None  # y holds targets, not classes


def test_top5_is_at_least_top1_and_both_are_numpys(arts):
    from compressor.metrics import resolve_metric

    data = _data(arts, "classes.npz")
    top1 = _bench(arts, ["big.tflite", "small.tflite", "big.onnx"], "classes.npz", metric=resolve_metric("top1"))
    top5 = _bench(arts, ["big.tflite", "small.tflite", "big.onnx"], "classes.npz", metric=resolve_metric("top5"))

    for one, five in zip(top1["results"], top5["results"]):
        outputs = _outputs(one["path"], data["x"])
        right = outputs.argmax(axis=1) == data["y"]
        among5 = np.argsort(-outputs, axis=1)[:, :5] == data["y"][:, None]
        assert one["metric_value"] == one["accuracy"] == pytest.approx(right.mean())
        assert five["metric_value"] == pytest.approx(among5.any(axis=1).mean())
        assert five["metric_value"] >= one["metric_value"]
        assert five["accuracy"] == one["accuracy"]  # `accuracy` stays top-1
    assert top1["results"][0]["metric_value"] == pytest.approx(2 / 3)  # by construction of the labels
    assert top5["metric"]["name"] == "top5" and top5["metric"]["higher_is_better"] is True


def test_agreement_is_with_the_first_artifact_and_needs_no_labels(arts):
    from compressor.metrics import resolve_metric

    x = _data(arts, "unlabelled.npz")["x"]
    report = _bench(arts, ["big.tflite", "big.tflite", "big.onnx", "small.tflite"], "unlabelled.npz",
                    metric=resolve_metric("agreement"))

    values = [r["metric_value"] for r in report["results"]]
    assert values[0] == values[1] == 1.0  # the first artifact, and the same file again
    assert values[2] >= 46 / 48  # the same model through onnxruntime: at most a near tie flips
    reference = _outputs(arts / "big.tflite", x).argmax(axis=1)
    assert values[3] == pytest.approx(np.mean(_outputs(arts / "small.tflite", x).argmax(axis=1) == reference))
    assert values[3] < 1.0
    assert report["samples"] == SAMPLES and all(r["accuracy"] is None for r in report["results"])


def test_a_hooks_value_is_passed_through(arts, tmp_path, monkeypatch):
    (tmp_path / "bench_hooks.py").write_text(textwrap.dedent("""
        import numpy as np

        def worst(y_true, y_pred):
            return float(np.max(np.abs(y_pred - y_true)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _data(arts, "targets.npz")

    result = _cli(arts / "reg.tflite", "--data", arts / "targets.npz", "--metric", "bench_hooks:worst",
                  "--metric-lower-is-better", "--json", *CLI_FAST)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = np.mean(np.max(np.abs(_outputs(arts / "reg.tflite", data["x"]) - data["y"]), axis=1))
    assert report["results"][0]["metric_value"] == pytest.approx(expected, rel=RTOL)
    assert report["metric"] == {"name": "bench_hooks:worst", "higher_is_better": False, "output": None}


def test_the_named_output_of_a_two_output_model_is_the_one_read(arts):
    import compressor

    data = _data(arts, "two.npz")
    mse = compressor.benchmark([arts / "two.tflite"], data=arts / "two.npz", metric="mse", metric_output="score",
                               **FAST).report
    top1 = compressor.benchmark([arts / "two.tflite"], data=arts / "two.npz", metric="top1", **FAST).report

    score = _outputs(arts / "two.tflite", data["x"], output="score")
    assert mse["metric"]["output"] == "score"
    assert mse["results"][0]["metric_value"] == pytest.approx(np.mean(np.square(score - data["y_score"])), rel=RTOL)
    assert top1["metric"]["output"] == "label"  # unnamed: the first output with class scores, as compress reads
    assert top1["results"][0]["metric_value"] == 1.0  # y_label holds the label head's own classes


def test_the_table_names_the_metrics_column(arts):
    result = _cli(arts / "reg.tflite", arts / "reg.onnx", "--data", arts / "targets.npz", "--metric", "mae",
                  *CLI_FAST)

    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "median" in line)
    assert header.split()[-1] == "mae" and "top-1" not in header  # targets: no top-1 column
    assert "mae on 48 samples" in " ".join(result.stdout.split())


@pytest.mark.parametrize("metric", ["mse", "agreement"])
def test_remote_gives_the_same_values(arts, tmp_path, metric):
    from compressor.bench.remote import bench_remote
    from compressor.metrics import resolve_metric

    data = "targets.npz" if metric == "mse" else "classes.npz"
    names = ["reg.tflite", "reg.onnx"] if metric == "mse" else ["big.tflite", "small.tflite"]
    local = _bench(arts, names, data, metric=resolve_metric(metric))
    work = tmp_path / "board"
    work.mkdir()
    prefix = f"env -C {shlex.quote(str(work))} PYTHONPATH={shlex.quote(SITE)}"

    remote = bench_remote([arts / name for name in names], prefix, data=arts / data, python=ISOLATED_PYTHON,
                          metric=metric, **FAST)

    assert remote["metric"] == local["metric"]
    for mine, theirs in zip(local["results"], remote["results"]):
        assert theirs["metric_value"] == pytest.approx(mine["metric_value"], rel=RTOL)
        assert theirs["accuracy"] == mine["accuracy"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("top1_unlabelled", "has no 'y'; metric top1 needs class labels (metric agreement needs no labels)"),
        ("mse_unlabelled", "has no 'y'; metric mse needs targets"),
        ("mse_two_outputs", "the model has 2 outputs (label, score): choose the one the metric reads with "
                            "--metric-output"),
        ("unknown_output", "the model has no output nope; its outputs are label, score (see --metric-output)"),
        ("direction_builtin", "--metric-higher-is-better is for a pkg.module:function metric; mse has its own"),
        ("hook_direction", "say which way is better with --metric-higher-is-better"),
        ("unknown_metric", "Invalid metric. Expected one of top1, top5, mse, mae, agreement"),
        ("no_data", "metric mae is measured on data: give --data"),
        ("hook_remote", "metric bench_hooks:worst is a function of a module the board does not have"),
        ("labels_beyond_outputs", "has labels up to 5, but reg.tflite outputs 3 class scores"),
    ],
)
def test_cli_errors_are_one_line(arts, case, message):
    reg, two = arts / "reg.tflite", arts / "two.tflite"
    args = {
        "top1_unlabelled": [reg, "--data", arts / "unlabelled.npz", "--metric", "top1"],
        "mse_unlabelled": [reg, "--data", arts / "unlabelled.npz", "--metric", "mse"],
        "mse_two_outputs": [two, "--data", arts / "two.npz", "--metric", "mse"],
        "unknown_output": [two, "--data", arts / "two.npz", "--metric-output", "nope"],
        "direction_builtin": [reg, "--data", arts / "targets.npz", "--metric", "mse", "--metric-higher-is-better"],
        "hook_direction": [reg, "--data", arts / "targets.npz", "--metric", "bench_hooks:worst"],
        "unknown_metric": [reg, "--data", arts / "targets.npz", "--metric", "rmse"],
        "no_data": [reg, "--metric", "mae"],
        "hook_remote": [reg, "--data", arts / "targets.npz", "--metric", "bench_hooks:worst",
                        "--metric-lower-is-better", "--remote", "sh -c"],
        "labels_beyond_outputs": [reg, "--data", arts / "classes.npz", "--metric", "top5"],
    }[case]

    result = _cli(*args, *CLI_FAST)

    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_the_board_side_takes_exactly_the_built_in_metrics():
    from compressor.bench.__main__ import build_parser
    from compressor.metrics import BUILTIN

    action = next(a for a in build_parser()._actions if "--metric" in a.option_strings)
    assert tuple(action.choices) == BUILTIN

