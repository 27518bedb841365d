"""`compress --techniques ...,gating` end to end on a tiny residual model, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.report.schema import report_problems
from conftest import build_residual, onnx_ops, tflite_ops, write_npz

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gating")
    model = build_residual()
    model.save(folder / "model.keras")
    write_npz(folder / "val.npz", model, n=48, seed=1)
    write_npz(folder / "test.npz", model, n=32, seed=2)
    write_npz(folder / "train.npz", model, n=64, seed=3)
    plain(input_shape=(16, 16, 3)).save(folder / "plain.keras")
    return folder


def plain(input_shape):
    import keras

    layers = keras.layers
    return keras.Sequential(
        [keras.Input(input_shape), layers.Conv2D(4, 3), layers.GlobalAveragePooling2D(), layers.Dense(4, activation="softmax")]
    )


def _compress(workdir, out, *args, model="model.keras"):
    command = ["compress", str(workdir / model), "--out", str(out), "--runs", "20", "--json",
               "--data", str(workdir / "val.npz"), "--test-data", str(workdir / "test.npz"), *map(str, args)]
    return runner.invoke(app, command)


def test_gating_end_to_end_with_report_static_artifact_and_exact_replay(workdir, tmp_path, keep_any_gates):
    import keras

    out = tmp_path / "gated"
    # --data's 48 samples leave 24 to the guard, which confirms no budget under about 0.12: 0.3 lets the guard
    # accept gates that change a few predictions (the guard itself is tested in test_acceptance.py).
    result = _compress(
        workdir, out, "--method", "fixed_loss", "--max-acc-loss", "0.3", "--techniques", "gating",
        "--train-data", workdir / "train.npz", "--gating-epochs", "3", "--gating-target", "0.1", "--gates-only",
    )
    assert result.exit_code in (0, 2), result.output
    report = json.loads(result.stdout)
    assert report_problems(report) == []
    gating = report["gating"]
    assert gating["applied"] is True and gating["network"] is False and gating["epochs"] == 3
    # Names as saved in model.keras (the fixture's Add is auto-named, per test process).
    from compressor.io.models import load_model
    from compressor.techniques.gating import find_residual_blocks

    names = [block.add for block in find_residual_blocks(load_model(workdir / "model.keras"))]
    assert [block["name"] for block in gating["blocks"]] == names and len(names) == 1
    assert all(0.0 <= block["skip_rate"] <= 1.0 for block in gating["blocks"])
    flops = gating["flops_per_input"]
    assert flops["min"] <= flops["p10"] <= flops["median"] <= flops["p90"] <= flops["max"] <= report["compressed"]["flops"]
    assert sum(gating["flops_per_input"]["histogram"]["counts"]) == gating["samples"] == 32
    assert report["compressed"]["expected_flops"] == pytest.approx(flops["mean"])
    # The static model's TFLite artifact was timed in the same run, over the held-out inputs.
    assert (out / "static" / "model.tflite").is_file()
    # The written files are the gated model: one IF op (If node) per gate; the static artifact has none.
    assert tflite_ops(out / "model.tflite")[0].count("IF") == len(names)
    assert onnx_ops(out / "model.onnx").count("If") == len(names)
    assert tflite_ops(out / "static" / "model.tflite")[0].count("IF") == 0
    assert gating["tflite"]["static_latency_ms"]["mean"] > 0 and gating["tflite"]["latency_ms"]["mean"] > 0
    assert all(entry["max_abs_diff"] <= 1e-4 for entry in report["artifacts"])
    assert "## Dynamic gating" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["gating"]["blocks"] == names and set(plan["gating"]["gates"]) == {f"{names[0]}_gate"}

    # Gates trained alone replay from the plan's weights, exactly, without training data.
    replay = _compress(workdir, tmp_path / "replay", "--plan", out / "plan.json")
    assert replay.exit_code in (0, 2), replay.output
    x = np.load(workdir / "test.npz")["x"]
    first, again = (keras.models.load_model(folder / "model.keras") for folder in (out, tmp_path / "replay"))
    np.testing.assert_allclose(again.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize(
    "args, model, message",
    [
        (["--techniques", "gating"], "model.keras", "--techniques gating trains the gates: pass --train-data"),
        (["--techniques", "gating", "--train-data", "train.npz", "--gating-target", "1.5"], "model.keras", "Invalid gating target"),
        (["--techniques", "gating", "--train-data", "train.npz"], "plain.keras", "has no residual block"),
        (["--techniques", "gating", "--train-data", "train.npz", "--quantize", "dynamic"], "model.keras", "pass --export tflite,keras"),
    ],
)
def test_bad_gating_options_give_one_clear_line(workdir, tmp_path, args, model, message):
    args = [str(workdir / arg) if arg.endswith(".npz") else arg for arg in args]
    result = _compress(workdir, tmp_path / "bad", "--method", "fixed_loss", "--max-acc-loss", "0.1", *args, model=model)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_gates_that_skip_too_little_are_not_kept(workdir, tmp_path):
    out = tmp_path / "plain"
    result = _compress(
        workdir, out, "--method", "fixed_loss", "--max-acc-loss", "0.1", "--techniques", "gating",
        "--train-data", workdir / "train.npz", "--gating-epochs", "1", "--export", "tflite",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gating = report["gating"]
    # One epoch on 64 samples leaves the gates open: not one of them is worth its cost.
    assert gating["applied"] is False and "no gate skips its block for 10% of the inputs" in gating["reason"]
    assert gating["attempts"][0]["gates_kept"] == 0
    assert "expected_flops" not in report["compressed"] and not (out / "static").exists()
    assert "gating" not in json.loads((out / "plan.json").read_text())
    assert "Not applied" in (out / "report.md").read_text()


def test_gates_trained_with_the_network_replay_by_training_again(workdir, tmp_path, keep_any_gates):
    out = tmp_path / "net"
    args = ("--method", "fixed_params", "--compression-factor", "0.9", "--techniques", "gating", "--gating-epochs", "2", "--gating-target", "0.1")
    result = _compress(workdir, out, *args, "--train-data", workdir / "train.npz", "--export", "tflite")
    assert result.exit_code == 2, result.output  # gates add parameters: a params budget is not met by gating alone
    report = json.loads(result.stdout)
    # A cost budget leaves the gates without an accuracy floor: one training, kept.
    assert report["gating"]["network"] is True and len(report["gating"]["attempts"]) == 1
    missing = _compress(workdir, tmp_path / "re", "--plan", out / "plan.json", "--export", "tflite")
    assert missing.exit_code == 1 and "pass --train-data to replay them" in missing.output
    again = _compress(workdir, tmp_path / "re2", "--plan", out / "plan.json", "--export", "tflite", "--train-data", workdir / "train.npz")
    assert again.exit_code in (0, 2), again.output
    assert json.loads(again.stdout)["gating"]["applied"] is True


def test_slower_gates_are_not_kept(workdir, tmp_path, monkeypatch):
    from compressor.bench import keras_latency
    from compressor.search import gating

    monkeypatch.setattr(gating, "MIN_SAVING", -1.0)
    monkeypatch.setattr(gating, "MIN_GATE_SKIP", -1.0)
    timed = []

    def slower(static, gated, x, **kwargs):
        timed.append(len(x))
        return 0.5, 0.6

    monkeypatch.setattr(keras_latency, "tflite_latency", slower)
    result = _compress(
        workdir, tmp_path / "slow", "--method", "fixed_loss", "--max-acc-loss", "0.1", "--techniques", "gating",
        "--train-data", workdir / "train.npz", "--gating-epochs", "1", "--export", "tflite",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["gating"]
    assert timed == [24]  # timed on the search data (the selection half of --data), not on the held-out data
    assert report["applied"] is False and "the gates cost more than they skip" in report["reason"]
    assert report["latency_check"] == {"static_ms": 0.5, "gated_ms": 0.6, "data": "search", "samples": 24}


def test_tflite_latency_times_both_models_on_the_inputs():
    from compressor.bench.keras_latency import tflite_latency
    from compressor.techniques.gating import insert_gates

    static = build_residual()
    x = np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 3)).astype("float32")
    static_ms, gated_ms = tflite_latency(static, insert_gates(static), x, runs=5)
    assert static_ms > 0 and gated_ms > 0
