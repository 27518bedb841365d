"""Metrics beyond top-1 (`--metric`): per-sample values, hooks, the paired bound on values, options, end to end.

The end-to-end runs use a small Dense regression net (mse) and a small classifier whose
data has no labels (agreement); each checks the budget on held-out data.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.errors import CompressorError, DataError, OptionError
from compressor.metrics import check_targets, output_index, resolve_metric, top_k_correct
from compressor.search.confidence import paired_difference, t_value, z_value


def test_class_metrics_per_sample_against_a_hand_count():
    outputs = np.array([[0.1, 0.5, 0.2, 0.0, 0.1, 0.05, 0.05],
                        [0.3, 0.1, 0.2, 0.25, 0.05, 0.04, 0.06],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.9]])
    y = np.array([2, 5, 6])
    # Row 0: label 2 is 2nd highest; row 1: label 5 (0.04) is 7th of 7; row 2: label 6 is highest.
    assert resolve_metric("top1").values(outputs, y).tolist() == [False, False, True]
    assert resolve_metric("top5").values(outputs, y).tolist() == [True, False, True]
    assert resolve_metric("agreement").binary and resolve_metric("agreement").labels is None
    # A single sigmoid column reads as top-1 at 0.5, whatever k.
    assert top_k_correct(np.array([[0.7], [0.2]]), np.array([1, 1]), k=5).tolist() == [True, False]


def test_regression_metrics_per_sample_and_relative_scores():
    outputs = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    y = np.array([[1.5, 1.0], [0.0, 2.0], [3.0, -1.0]])
    mse, mae = resolve_metric("mse"), resolve_metric("mae")
    assert mse.values(outputs, y) == pytest.approx([(0.25 + 1.0) / 2, 4.0 / 2, 0.0])
    assert mae.values(outputs, y) == pytest.approx([(0.5 + 1.0) / 2, 2.0 / 2, 0.0])
    original = np.array([1.0, 2.0, 3.0])
    # Scores are 1 − value / original's mean: the original's mean score is 0, and a model with
    # 10% more error on every sample has a drop of exactly 0.1 (a relative increase).
    assert mse.scores(original, original.mean()).mean() == pytest.approx(0.0)
    drop = mse.scores(original, 2.0).mean() - mse.scores(1.1 * original, 2.0).mean()
    assert drop == pytest.approx(0.1)
    with pytest.raises(DataError, match="relative to it means nothing"):
        mse.scores(np.zeros(3), 0.0)
    with pytest.raises(DataError, match="y holds 3 value"):
        mse.values(outputs, np.zeros((3, 3)))
    with pytest.raises(DataError, match="y holds 1 value"):
        check_targets(mse, np.zeros(3), 2, "d.npz")
    with pytest.raises(DataError, match="needs no labels"):
        check_targets(resolve_metric("top1"), None, 2, "d.npz")


def test_a_hook_is_imported_and_called_per_sample(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def huber(y_true, y_pred):\n"
        "    d = np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))\n"
        "    return float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))\n"
        "def broken(y_true, y_pred):\n"
        "    raise ValueError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = resolve_metric("my_metrics:huber", higher_is_better=False)
    outputs, y = np.array([[0.0], [3.0]]), np.array([[0.5], [0.0]])
    assert metric.values(outputs, y) == pytest.approx([0.125, 2.5])
    assert metric.scores(metric.values(outputs, y), 99.0) == pytest.approx([-0.125, -2.5])  # absolute, lower is better
    with pytest.raises(DataError, match="my_metrics:broken failed on one sample: ValueError: no"):
        resolve_metric("my_metrics:broken", higher_is_better=True).values(outputs, y)
    with pytest.raises(OptionError, match="say which way is better"):
        resolve_metric("my_metrics:huber")
    with pytest.raises(OptionError, match="could not import no_such_module_here"):
        resolve_metric("no_such_module_here:f", higher_is_better=True)
    with pytest.raises(OptionError, match="has no function nothing"):
        resolve_metric("my_metrics:nothing", higher_is_better=True)
    with pytest.raises(OptionError, match="Invalid metric"):
        resolve_metric("top3")


def test_output_index_names_the_outputs():
    assert output_index(["out"], None) == 0
    assert output_index(["a", "b"], "b") == 1
    with pytest.raises(OptionError, match="has 2 outputs \\(a, b\\): choose .* metric_output="):
        output_index(["a", "b"], None)
    with pytest.raises(OptionError, match="no output c; its outputs are a, b"):
        output_index(["a", "b"], "c")


def test_paired_difference_is_the_t_bound_on_the_mean_difference():
    rng = np.random.default_rng(0)
    original = rng.normal(size=200)
    candidate = original - 0.05 + 0.1 * rng.normal(size=200)
    measured = paired_difference(original, candidate, 0.95)
    d = original - candidate
    half = t_value(z_value(0.95), 199) * d.std(ddof=1) / np.sqrt(200)
    assert measured.drop == pytest.approx(d.mean()) and measured.upper == pytest.approx(d.mean() + half)
    assert measured.lower == pytest.approx(d.mean() - half)
    assert abs(t_value(z_value(0.975), 10) - 2.228) < 2e-3  # Student's t table
    # Coverage of the one-sided bound at a true drop of 0.02 (1000 draws, 40 samples each): near 95%.
    covered = np.mean([paired_difference(x, x - 0.02 - rng.normal(size=40), 0.95).upper >= 0.02
                       for x in rng.normal(size=(1000, 40))])
    assert 0.93 <= covered <= 0.97


@pytest.mark.parametrize("values, message", [
    ({"metric": "mse", "max_acc_loss": 0.02}, "max_acc_loss= is an accuracy budget; metric mse takes max_metric_loss="),
    ({"metric": "top1", "max_acc_loss": 0.02, "max_metric_loss": 0.02}, "not both"),
    ({"metric": "mae"}, "method fixed_loss needs max_metric_loss= for metric= mae"),
    ({"metric": "mse", "max_metric_loss": 0.1, "metric_higher_is_better": True}, "is for a pkg.module:function"),
    ({"metric": "pkg.mod:fn", "max_metric_loss": 0.1}, "say which way is better"),
    ({"metric": "mse", "max_metric_loss": 0.1, "techniques": "channels,tucker"}, "techniques= channels measure top-1"),
    ({"metric": "top9", "max_acc_loss": 0.1}, "Invalid metric"),
    ({"metric": "mse", "max_metric_loss": -1.0}, "Invalid max metric loss"),
])
def test_bad_metric_options_are_one_line_errors(values, message):
    from compressor.config import CompressOptions

    with pytest.raises(OptionError, match=message.replace("(", "\\(").replace(")", "\\)")) as caught:
        CompressOptions.parse(model="m.keras", out="o", method="fixed_loss", data="d.npz", **values)
    assert "\n" not in str(caught.value)


def test_max_metric_loss_spells_the_top1_budget_and_unbounds_regression_budgets():
    from compressor.config import CLASS_METRICS, BUILTIN_METRICS, CompressOptions
    from compressor.metrics import BUILTIN
    from compressor.metrics import CLASS_METRICS as METRIC_CLASSES

    assert BUILTIN_METRICS == BUILTIN and CLASS_METRICS == METRIC_CLASSES
    same = CompressOptions.parse(model="m.keras", out="o", method="fixed_loss", data="d.npz", max_metric_loss=0.02)
    assert same.budget() == CompressOptions.parse(model="m.keras", out="o", method="fixed_loss", data="d.npz",
                                                  max_acc_loss=0.02).budget()
    doubled = CompressOptions.parse(model="m.keras", out="o", method="fixed_loss", data="d.npz", metric="MSE",
                                    max_metric_loss=1.5)
    assert doubled.budget().limit == 1.5 and doubled.metric_name == "mse"  # 150% more error: a valid budget
    with pytest.raises(CompressorError, match="Expected 0 <= L < 1"):
        CompressOptions.parse(model="m.keras", out="o", method="fixed_loss", data="d.npz", metric="top5",
                              max_metric_loss=1.5).budget()


def _regression(n=1500, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    hidden = keras.layers.Dense(128, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    x = rng.normal(size=(n, 8)).astype("float32")
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 3]], axis=1).astype("float32")
    y += 0.3 * rng.normal(size=y.shape).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model, x, y


def test_a_regression_model_compresses_within_an_mse_budget_on_held_out_data(tmp_path):
    import compressor

    model, x, y = _regression()
    limit = 0.5  # at most 50% more error than the original: low-rank options of trained Dense layers cost 20-50%
    result = compressor.compress(model, data=(x[:1000], y[:1000]), test_data=(x[1000:], y[1000:]),
                                 method="fixed_loss", metric="mse", max_metric_loss=limit, export=("tflite",),
                                 runs=2, warmup=1, out=tmp_path / "out", cache_dir=tmp_path / "cache")
    report = result.report
    budget, metric = report["budget"], report["budget"]["metric"]
    assert metric["name"] == "mse" and metric["relative"] is True
    # Held-out: the relative MSE increase, measured on the TFLite artifact, is the achieved drop and within budget.
    relative = metric["value"] / metric["baseline_value"] - 1
    assert budget["achieved"] == pytest.approx(relative, abs=1e-6)
    assert budget["met"] is True and relative <= limit
    held_out = float(np.mean((np.asarray(model.predict(x[1000:], verbose=0)) - y[1000:]) ** 2))
    assert metric["baseline_value"] == pytest.approx(held_out, rel=1e-4)
    assert report["compressed"]["params"] < report["baseline"]["params"]  # it did compress
    assert report["search"]["acceptance"]["looks"][0]["accepted"] is True
    assert "metric `mse`" in (tmp_path / "out" / "report.md").read_text()


def test_a_label_free_agreement_run_meets_its_budget_on_held_out_data(tmp_path):
    import keras

    import compressor
    from conftest import build_residual

    model = build_residual()
    rng = np.random.default_rng(3)
    x = rng.random((600, *model.inputs[0].shape[1:]), dtype=np.float32)
    limit = 0.1
    result = compressor.compress(model, data=x[:400], test_data=x[400:], method="fixed_loss", metric="agreement",
                                 max_acc_loss=limit, export=("tflite",), runs=2, warmup=1, out=tmp_path / "out",
                                 cache_dir=tmp_path / "cache")
    report = result.report
    assert report["budget"]["metric"]["name"] == "agreement" and report["budget"]["met"] is True
    # Held-out agreement, recomputed here from the TFLite artifact: the budget's achieved value is 1 − it.
    from compressor.bench.runtime import open_artifact

    ours = open_artifact(result.artifacts["tflite"]).predict(x[400:]).reshape(200, -1).argmax(-1)
    theirs = np.asarray(keras.ops.convert_to_numpy(model(x[400:]))).argmax(-1)
    baseline_tflite = report["artifacts"][0]["baseline_path"]
    original = open_artifact(baseline_tflite).predict(x[400:]).reshape(200, -1).argmax(-1)
    assert np.mean(original == theirs) == 1.0  # the original's artifact agrees with the original
    assert report["budget"]["achieved"] == pytest.approx(1 - np.mean(ours == theirs), abs=1e-9)
    assert report["budget"]["achieved"] <= limit
    assert report["compressed"]["flops"] < report["baseline"]["flops"]


def test_cli_refuses_max_acc_loss_with_mse_in_one_line(tmp_path):
    from compressor.cli.app import app

    result = CliRunner().invoke(app, ["compress", str(tmp_path / "m.keras"), "--method", "fixed_loss", "--data",
                                      str(tmp_path / "d.npz"), "--metric", "mse", "--max-acc-loss", "0.02",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-acc-loss is an accuracy budget; metric mse takes --max-metric-loss" in lines[0]


def test_targets_load_from_an_npz_and_image_folders_refuse_them(tmp_path):
    from compressor.io.data import load_data

    np.savez(tmp_path / "r.npz", x=np.zeros((3, 2), np.float32), y=np.array([[0.5, 1.5]] * 3))
    data = load_data(tmp_path / "r.npz", numeric=True)
    assert data.y.dtype == np.float32 and data.y.shape == (3, 2)
    assert load_data(tmp_path / "r.npz").y.tolist() == [1, 1, 1]  # without targets: class labels, as before
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="image folder"):
        load_data(tmp_path / "images", numeric=True)
    assert sys.modules.get("compressor.metrics") is not None
