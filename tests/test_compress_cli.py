"""`compress` end to end on a tiny model, through the CLI a pipeline would call.

The tiny residual model's labels are its own predictions, so the original is 100%
accurate on them and every lost point is the compression's doing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from conftest import build_residual, write_npz

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress")
    model = build_residual()
    model.save(folder / "model.keras")
    write_npz(folder / "val.npz", model, n=64, seed=1)
    write_npz(folder / "test.npz", model, n=48, seed=2)
    return folder


def _compress(workdir, out, *args):
    result = runner.invoke(
        app,
        ["compress", str(workdir / "model.keras"), "--out", str(out), "--runs", "5", "--cache-dir", str(workdir / "cache"), "--json", *map(str, args)],
    )
    return result


def _report(result):
    return json.loads(result.stdout)


def test_fixed_params_end_to_end_and_plan_replay(workdir, tmp_path):
    import keras

    out = tmp_path / "fp"
    result = _compress(workdir, out, "--method", "fixed_params", "--compression-factor", "0.6", "--data", workdir / "test.npz")
    assert result.exit_code == 0, result.output
    report = _report(result)
    assert report["status"] == "ok" and report["method"] == "fixed_params"
    budget = report["budget"]
    assert budget["kind"] == "params" and budget["met"] is True
    assert budget["achieved"] <= 0.6 + 1e-9
    assert report["compressed"]["params"] / report["baseline"]["params"] == pytest.approx(budget["achieved"])
    assert {a["format"] for a in report["artifacts"]} == {"tflite", "onnx", "keras"}
    tflite = next(a for a in report["artifacts"] if a["format"] == "tflite")
    assert tflite["latency_ms"]["median"] > 0 and tflite["baseline_latency_ms"]["median"] > 0
    assert 0.0 <= tflite["accuracy"] <= 1.0 and tflite["max_abs_diff"] <= 1e-4
    assert any(row["technique"] in ("tucker", "svd") for row in report["layers"])
    assert all(row.get("reason") for row in report["layers"] if row["technique"] == "skipped")
    for name in ("model.keras", "model.tflite", "model.onnx", "plan.json", "report.json", "report.md",
                 "plots/accuracy_vs_compression.png", "plots/layer_params.png"):
        assert (out / name).is_file(), name
    written = json.loads((out / "report.json").read_text())
    assert written["status"] == "ok" and written["schema"] == 1
    assert tflite["path"] == str(out / "model.tflite")  # the final path, not the staging folder's
    assert [p.name for p in tmp_path.iterdir()] == ["fp"]  # no staging folder left beside it

    replay = _compress(workdir, tmp_path / "replay", "--plan", out / "plan.json", "--data", workdir / "test.npz")
    assert replay.exit_code == 0, replay.output
    x = np.load(workdir / "test.npz")["x"]
    first = keras.saving.load_model(out / "model.keras")
    second = keras.saving.load_model(tmp_path / "replay" / "model.keras")
    np.testing.assert_allclose(np.asarray(first(x)), np.asarray(second(x)), atol=1e-6)


def test_fixed_loss_measures_the_artifact_on_held_out_data(workdir, tmp_path):
    result = _compress(
        workdir, tmp_path / "fl", "--method", "fixed_loss", "--max-acc-loss", "0.1",
        "--data", workdir / "val.npz", "--test-data", workdir / "test.npz",
    )
    assert result.exit_code in (0, 2), result.output
    report = _report(result)
    budget = report["budget"]
    tflite = next(a for a in report["artifacts"] if a["format"] == "tflite")
    assert report["baseline"]["accuracy"] == tflite["baseline_accuracy"]
    assert report["compressed"]["accuracy"] == tflite["accuracy"]
    assert budget["achieved"] == pytest.approx(tflite["baseline_accuracy"] - tflite["accuracy"])
    assert (result.exit_code == 0) == budget["met"]
    assert report["search"]["evaluations"] > 0
    # --data's 64 samples: half selection (what the search measures on), half guard (what accepts models).
    assert report["search"]["held_out_samples"] == 48 and report["search"]["search_samples"] == 32
    assert report["search"]["acceptance"]["samples"] == 32

    again = _compress(
        workdir, tmp_path / "fl2", "--method", "fixed_loss", "--max-acc-loss", "0.3",
        "--data", workdir / "val.npz", "--test-data", workdir / "test.npz",
    )
    search = _report(again)["search"]
    assert search["cached_evaluations"] > 0  # the sensitivity table came from the cache


def test_budget_not_met_exits_2_and_still_writes(workdir, tmp_path):
    out = tmp_path / "tight"
    result = _compress(workdir, out, "--method", "fixed_params", "--compression-factor", "0.01", "--export", "tflite")
    assert result.exit_code == 2, result.output
    report = _report(result)
    assert report["status"] == "budget_not_met" and report["budget"]["met"] is False
    assert (out / "model.tflite").is_file() and (out / "plan.json").is_file()
    assert "budget not met" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "fixed_params", "--compression-factor", "1.5"], "Expected 0 < F < 1"),
        (["--method", "fixed_params", "--compression-factor", "0"], "Expected 0 < F < 1"),
        (["--method", "fixed_loss", "--max-acc-loss", "-0.1", "--data", "VAL"], "max_acc_loss"),
        (["--method", "fixed_loss", "--max-acc-loss", "0.02"], "needs labelled --data"),
        (["--method", "fixed_loss", "--max-acc-loss", "0.02", "--data", "UNLABELLED"], "needs labels"),
        (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "sparsity", "--pruning-structure", "diagonal"], "Invalid pruning structure"),
        (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "sparsity", "--pruning-structure", "block", "--block-size", "3,3"], "3"),
        (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "pruning"], "Invalid techniques"),
        (["--compression-factor", "0.5"], "choose a method"),
        (["--plan", "MISSING"], "plan not found"),
    ],
)
def test_bad_inputs_give_one_clear_line(workdir, tmp_path, args, message):
    np.savez(tmp_path / "unlabelled.npz", x=np.load(workdir / "val.npz")["x"])
    replace = {"VAL": str(workdir / "val.npz"), "UNLABELLED": str(tmp_path / "unlabelled.npz"), "MISSING": str(tmp_path / "nope.json")}
    result = _compress(workdir, tmp_path / "out", *[replace.get(a, a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith("error:")
    assert message in " ".join(result.stderr.split())


def test_sparsity_shrinks_the_tflite_file(workdir, tmp_path):
    result = _compress(
        workdir, tmp_path / "sparse", "--method", "fixed_params", "--compression-factor", "0.5",
        "--techniques", "sparsity", "--export", "tflite", "--data", workdir / "test.npz",
    )
    assert result.exit_code == 0, result.output
    report = _report(result)
    tflite = report["artifacts"][0]
    # Half the weights kept and stored sparsely: the file must shrink by a clear margin
    # (index overhead keeps it above half).
    assert tflite["bytes"] < 0.85 * tflite["baseline_bytes"], (tflite["bytes"], tflite["baseline_bytes"])
    assert report["compressed"]["flops"] == report["baseline"]["flops"]  # zeros still run dense
    assert any("TFLite runs convolutions dense" in note for note in report["notes"])


# --- channels, hessian, fine-tuning --------------------------------------------------------------


@pytest.fixture(scope="module")
def trainable(workdir):
    """The tiny model's folder with training data labelled like val/test (the model's own argmax)."""
    import keras

    model = keras.models.load_model(workdir / "model.keras")
    write_npz(workdir / "train.npz", model, n=96, seed=3)
    return workdir


def _plan(out):
    return json.loads((out / "plan.json").read_text())


def test_channel_pruning_to_a_flops_budget_with_fine_tuning_and_replay(trainable, tmp_path):
    import keras

    out = tmp_path / "ch"
    result = _compress(
        trainable, out, "--method", "fixed_params", "--compression-factor", "0.5", "--budget-on", "flops",
        "--techniques", "channels", "--criterion", "fpgm", "--data", trainable / "test.npz",
        "--train-data", trainable / "train.npz", "--finetune-epochs", "1",
    )
    assert result.exit_code == 0, result.output
    report = _report(result)
    assert report["budget"]["met"] is True
    # FLOPs are whole channels' worth: at most the budget, and the model really is narrower.
    assert report["compressed"]["flops"] <= 0.5 * report["baseline"]["flops"]
    assert report["channels"]["channels_removed"] > 0 and report["channels"]["groups_pruned"] > 0
    rows = [row for row in report["layers"] if row["technique"] == "channels"]
    groups = [row for row in rows if "channels_before" in row]
    assert groups and all(row["channels_after"] < row["channels_before"] and row["criterion"] == "fpgm" for row in groups)
    # Every narrowed layer with weights has its own params row; together they account for all that went.
    layers = [row for row in rows if "params_before" in row]
    assert layers and all(row["params_after"] <= row["params_before"] for row in layers)
    removed = sum(row["params_before"] - row["params_after"] for row in layers)
    from compressor.graph.cost import model_cost

    original = model_cost(keras.models.load_model(trainable / "model.keras")).params
    assert removed == original - report["compressed"]["dense_params"]
    # Fine-tuned once per pruning step.
    assert report["finetune"]["epochs"] == len(report["channels"]["steps"]) >= 1
    plan = _plan(out)
    assert plan["channels"] and plan["finetune"]["epochs"] == report["finetune"]["epochs"]
    compressed = keras.models.load_model(out / "model.keras")
    assert compressed.count_params() < keras.models.load_model(trainable / "model.keras").count_params()

    # Replaying rebuilds the same structure (weights differ by fine-tuning noise).
    replay = _compress(trainable, tmp_path / "re", "--plan", out / "plan.json", "--data", trainable / "test.npz",
                       "--train-data", trainable / "train.npz")
    assert replay.exit_code == 0, replay.output
    again = keras.models.load_model(tmp_path / "re" / "model.keras")
    assert [tuple(w.shape) for w in again.weights] == [tuple(w.shape) for w in compressed.weights]

    # A fine-tuned plan cannot be replayed without training data.
    missing = _compress(trainable, tmp_path / "re2", "--plan", out / "plan.json", "--data", trainable / "test.npz")
    assert missing.exit_code == 1 and "pass --train-data to replay it" in missing.output


def test_channel_pruning_under_an_accuracy_budget_without_fine_tuning(trainable, tmp_path):
    result = _compress(trainable, tmp_path / "cl", "--method", "fixed_loss", "--max-acc-loss", "0.1",
                       "--techniques", "channels", "--data", trainable / "val.npz", "--test-data", trainable / "test.npz")
    assert result.exit_code in (0, 2), result.output
    report = _report(result)
    channels = report["channels"]
    # Every accepted bisection step stayed within 3/4 of the budget on the search data.
    for step in channels["steps"]:
        if step["accepted"]:
            assert channels["baseline_accuracy"] - step["accuracy"] <= 0.75 * 0.1 + 1e-9
    assert report["finetune"]["epochs"] == 0


def test_hessian_edits_record_their_statistics_and_compose_with_channels(trainable, tmp_path):
    out = tmp_path / "he"
    result = _compress(
        trainable, out, "--method", "fixed_params", "--compression-factor", "0.5",
        "--techniques", "channels,hessian,tucker", "--data", trainable / "test.npz", "--train-data", trainable / "train.npz",
    )
    assert result.exit_code == 0, result.output
    report = _report(result)
    techniques = {row["technique"] for row in report["layers"]}
    assert "channels" in techniques and techniques & {"hessian", "tucker", "svd"}
    assert report["compressed"]["params"] <= 0.5 * report["baseline"]["params"] * 1.001
    plan = _plan(out)
    if any(edit["technique"] == "hessian" for edit in plan["edits"]):
        assert plan["statistics"]["data"] == "train"
    replay = _compress(trainable, tmp_path / "he2", "--plan", out / "plan.json", "--data", trainable / "test.npz",
                       "--train-data", trainable / "train.npz")
    assert replay.exit_code == 0, replay.output
    first = next(a for a in report["artifacts"] if a["format"] == "keras")
    second = next(a for a in _report(replay)["artifacts"] if a["format"] == "keras")
    # Same data, same seed: the K-FAC statistics and so the rebuilt layers are the same.
    assert second["accuracy"] == pytest.approx(first["accuracy"], abs=1e-9)


def test_a_time_limit_that_leaves_no_room_stops_the_channel_search_and_says_so(trainable, tmp_path):
    out = tmp_path / "late"
    args = ("--method", "fixed_params", "--compression-factor", "0.5", "--budget-on", "flops", "--techniques", "channels",
            "--data", trainable / "test.npz", "--train-data", trainable / "train.npz", "--finetune-epochs", "1")
    # 6 ms from the start: passed by the time the search begins, so no step is taken and the budget is missed.
    result = _compress(trainable, out, *args, "--time-limit", "0.0001")
    assert result.exit_code == 2, result.output
    report = _report(result)
    assert report["status"] == "budget_not_met" and report["options"]["time_limit"] == 0.0001
    assert report["channels"]["stopped"] == "time limit" and report["channels"]["steps"] == []
    assert report["compressed"]["flops"] == report["baseline"]["flops"]
    assert any("stopped at its time limit (0.0001 min)" in note for note in report["notes"])
    assert "it stopped at its time limit" in (out / "report.md").read_text()
    bad = _compress(trainable, tmp_path / "bad", *args, "--time-limit", "0")
    assert bad.exit_code == 1 and "time limit" in bad.output and "Traceback" not in bad.output


def test_fine_tuning_needs_training_data_and_hessian_needs_data(workdir, tmp_path):
    result = _compress(workdir, tmp_path / "x", "--method", "fixed_params", "--compression-factor", "0.5", "--finetune-epochs", "2")
    assert result.exit_code == 1 and "needs --train-data" in result.output
    result = _compress(workdir, tmp_path / "y", "--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "hessian")
    assert result.exit_code == 1 and "K-FAC statistics on data" in result.output


def test_sparsity_masks_by_a_criterion_and_gradual_pruning_while_fine_tuning(trainable, tmp_path):
    import keras

    from compressor.surgery.editable import editable_layers

    out = tmp_path / "sp"
    result = _compress(
        trainable, out, "--method", "fixed_params", "--compression-factor", "0.6", "--techniques", "sparsity",
        "--data", trainable / "test.npz", "--train-data", trainable / "train.npz", "--finetune-epochs", "2",
    )
    assert result.exit_code == 0, result.output
    report = _report(result)
    assert report["finetune"]["final_epochs"] == 2
    plan = _plan(out)
    model = keras.models.load_model(out / "model.keras")
    layers = editable_layers(model)
    for edit in plan["edits"]:
        kernel = np.asarray(layers[edit["layer"]].kernel)
        # Pruned gradually from dense during fine-tuning, the kernel ends at exactly the planned density.
        kept = np.count_nonzero(kernel) / kernel.size
        assert kept == pytest.approx(edit["sparsity"]["density"], abs=1.0 / kernel.size + 1e-9), edit["layer"]

    scored = _compress(
        trainable, tmp_path / "snip", "--method", "fixed_params", "--compression-factor", "0.6", "--techniques", "sparsity",
        "--criterion", "snip", "--data", trainable / "test.npz", "--train-data", trainable / "train.npz",
    )
    assert scored.exit_code == 0, scored.output
    assert _plan(tmp_path / "snip")["statistics"] == {"data": "train", "seed": 0, "criterion": "snip"}
    fpgm = _compress(
        trainable, tmp_path / "fpgm", "--method", "fixed_params", "--compression-factor", "0.6", "--techniques", "sparsity",
        "--criterion", "fpgm", "--data", trainable / "test.npz",
    )
    assert fpgm.exit_code == 1 and "fpgm" in fpgm.output


# --- pipeline integration: output folder, interruption, quiet, quantization --------------------

FAST_FP = ["--method", "fixed_params", "--compression-factor", "0.6", "--export", "tflite"]


def test_earlier_results_need_overwrite(workdir, tmp_path):
    out = tmp_path / "again"
    assert _compress(workdir, out, *FAST_FP).exit_code == 0
    first = (out / "report.json").read_text()
    refused = _compress(workdir, out, *FAST_FP)
    assert refused.exit_code == 1 and "already holds results" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "report.json").read_text() == first  # untouched, not even an error report
    replaced = _compress(workdir, out, *FAST_FP, "--overwrite", "--export", "onnx")
    assert replaced.exit_code == 0, replaced.output
    # The earlier run's TFLite file does not linger beside a report that does not list it.
    assert not (out / "model.tflite").exists() and (out / "model.onnx").is_file()


@pytest.mark.parametrize("earlier", [False, True])
def test_an_interrupted_run_leaves_the_output_folder_as_it_was(workdir, tmp_path, monkeypatch, earlier):
    import compressor.export.verify as verify

    out = tmp_path / "out"
    if earlier:
        assert _compress(workdir, out, *FAST_FP).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if earlier else None
    real = verify.export_and_verify

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # an artifact is written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "export_and_verify", interrupted)
    result = _compress(workdir, out, *FAST_FP, "--overwrite")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    if earlier:
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if earlier else [])


def test_a_failed_run_writes_an_error_report_that_does_not_block_the_rerun(workdir, tmp_path, monkeypatch):
    import compressor.export.verify as verify

    real = verify.export_and_verify

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(verify, "export_and_verify", broken)
    result = _compress(workdir, tmp_path / "err", *FAST_FP)
    assert result.exit_code == 1 and "converter exploded" in result.stderr
    report = json.loads((tmp_path / "err" / "report.json").read_text())
    assert report == {"schema": 1, "status": "error", "method": "fixed_params", "error": "converter exploded"}
    assert sorted(p.name for p in (tmp_path / "err").iterdir()) == ["compressor-manifest.json", "report.json"]
    monkeypatch.setattr(verify, "export_and_verify", real)
    rerun = _compress(workdir, tmp_path / "err", *FAST_FP)  # the corrected command, without --overwrite
    assert rerun.exit_code == 0, rerun.output
    assert _report(rerun)["status"] == "ok" and (tmp_path / "err" / "model.tflite").is_file()


def test_ctrl_c_inside_the_converter_is_an_interruption(workdir, tmp_path, monkeypatch):
    """Native code turns the KeyboardInterrupt of Ctrl-C into another error (pybind11 does)."""
    import signal

    import tensorflow as tf

    class Converter:
        def convert(self):
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                raise RuntimeError("pybind11::error_already_set: KeyboardInterrupt") from None

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_keras_model", staticmethod(lambda model: Converter()))
    # Python's own handler, as in a fresh process (a test before this one may have left another).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = _compress(workdir, tmp_path / "out", *FAST_FP)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130 and "interrupted" in result.stderr, result.output
    assert not (tmp_path / "out").exists()  # no error report in a fresh folder


def test_the_input_model_is_never_replaced(workdir, tmp_path):
    folder = tmp_path / "inplace"
    folder.mkdir()
    model = folder / "model.keras"
    model.write_bytes((workdir / "model.keras").read_bytes())
    result = runner.invoke(app, ["compress", str(model), "--out", str(folder), "--overwrite", *FAST_FP])
    assert result.exit_code == 1 and "holds the input model.keras" in result.stderr, result.output
    assert model.read_bytes() == (workdir / "model.keras").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["model.keras"]


def test_overwrite_leaves_the_users_files_alone(workdir, tmp_path):
    proj = tmp_path / "proj"
    for name in ("static/site.css", "plots/fig1.png", "baseline/notes.txt", "index.html"):
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text(f"mine: {name}")
    assert _compress(workdir, proj, *FAST_FP, "--quantize", "dynamic").exit_code == 0
    assert _compress(workdir, proj, *FAST_FP, "--overwrite").exit_code == 0
    for name in ("static/site.css", "plots/fig1.png", "baseline/notes.txt", "index.html"):
        assert (proj / name).read_text() == f"mine: {name}"
    assert not (proj / "model.dynamic.tflite").exists()  # the earlier run's own file went
    (proj / "model.onnx").write_text("mine too")  # a file no run wrote, with a result's name
    refused = _compress(workdir, proj, *FAST_FP, "--overwrite")
    assert refused.exit_code == 1 and "no compressor run recorded writing" in refused.stderr
    assert (proj / "model.onnx").read_text() == "mine too"


def test_quiet_prints_nothing_but_keeps_the_exit_code(workdir, tmp_path):
    ok = runner.invoke(app, ["compress", str(workdir / "model.keras"), "--out", str(tmp_path / "q"), "--runs", "3", "--quiet", *FAST_FP])
    assert ok.exit_code == 0 and ok.stdout == "", ok.output
    missed = runner.invoke(app, ["compress", str(workdir / "model.keras"), "--out", str(tmp_path / "q2"), "--runs", "3", "--quiet",
                                 "--method", "fixed_params", "--compression-factor", "0.01", "--export", "tflite"])
    assert missed.exit_code == 2 and missed.stdout == ""
    assert "budget not met" in missed.stderr  # the one line that says why


def test_int8_artifacts_carry_the_budget(workdir, tmp_path):
    result = _compress(
        workdir, tmp_path / "q8", "--method", "fixed_loss", "--max-acc-loss", "0.3", "--data", workdir / "val.npz",
        "--test-data", workdir / "test.npz", "--quantize", "int8", "--calibration-samples", "32", "--export", "tflite,onnx",
    )
    assert result.exit_code in (0, 2), result.output
    report = _report(result)
    names = {Path(a["path"]).name: a for a in report["artifacts"]}
    assert set(names) == {"model.tflite", "model.onnx", "model.int8.tflite", "model.int8.onnx"}
    counted = names["model.int8.tflite"]
    assert counted["quantize"] == "int8" and names["model.tflite"]["quantize"] == "none"
    assert report["budget"]["artifact"] == "model.int8.tflite"
    assert report["compressed"]["accuracy"] == counted["accuracy"]
    assert report["budget"]["achieved"] == pytest.approx(counted["baseline_accuracy"] - counted["accuracy"])
    assert report["calibration"] == {"samples": 32, "data": "search"}
    # The guard judged the file the budget counts, not the Keras model (tests/test_judged.py: why it matters).
    assert report["search"]["acceptance"]["judged"] == "model.int8.tflite"
    assert "measured as its quantized artifact (model.int8.tflite)" in (tmp_path / "q8" / "report.md").read_text()
    # Both TFLite artifacts were timed in one run against the same original.
    assert counted["baseline_latency_ms"] == names["model.tflite"]["baseline_latency_ms"]
    # (File sizes are not compared here: this model's few weights are outweighed by the
    # quantization parameters; tests/test_quantize.py checks the 4x on a real model.)


# --- data refused at load, before any search ---------------------------------------------------


@pytest.fixture
def no_search(monkeypatch):
    """Fail loudly if a run gets as far as the search: the checks under test come before it."""
    from compressor.pipeline import stages

    def search(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(stages, "search", search)


@pytest.mark.parametrize("option", ["--data", "--test-data", "--train-data"])
def test_non_finite_data_is_refused_at_load_naming_the_file(workdir, tmp_path, no_search, option):
    with np.load(workdir / "test.npz") as arrays:
        x, y = arrays["x"].copy(), arrays["y"]
    x[17, 3, 4, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    given = {"--data": workdir / "val.npz", option: tmp_path / "nan.npz"}
    result = _compress(workdir, tmp_path / "out", *FAST_FP, *[str(a) for pair in given.items() for a in pair])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error:") and "Traceback" not in result.output
    assert "nan.npz: x holds nan at sample 17 (index (17, 3, 4, 0)); data must be finite" in " ".join(result.stderr.split())


@pytest.mark.parametrize("option", ["--data", "--test-data", "--train-data"])
def test_labels_beyond_the_models_classes_are_refused_before_the_search(workdir, tmp_path, no_search, option):
    with np.load(workdir / "test.npz") as arrays:
        x, y = arrays["x"], arrays["y"].copy()
    y[5] = 12  # the tiny residual model has 4 classes
    np.savez(tmp_path / "test.npz", x=x, y=y)
    given = {"--data": workdir / "val.npz", option: tmp_path / "test.npz"}
    result = _compress(workdir, tmp_path / "out", "--method", "fixed_loss", "--max-acc-loss", "0.1", "--export", "tflite",
                       *[str(a) for pair in given.items() for a in pair])
    assert result.exit_code == 1, result.output
    assert "test.npz: y[5] = 12, but the model has 4 classes (labels must be 0..3)" in " ".join(result.stderr.split())


def test_config_code_needs_allow_config_code_on_the_command_line(workdir, tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "ci_data_hook.py").write_text(
        "import numpy as np\n"
        f"def load():\n    arrays = np.load({str(workdir / 'test.npz')!r})\n    return arrays['x'], arrays['y']\n"
    )
    monkeypatch.syspath_prepend(str(hooks))
    config = tmp_path / "ci.toml"
    config.write_text('test-data = "ci_data_hook:load"\n')
    args = [*FAST_FP, "--data", workdir / "val.npz", "--config", config]
    refused = _compress(workdir, tmp_path / "out", *args)
    assert refused.exit_code == 1 and not (tmp_path / "out").exists()
    assert "ci.toml: test-data = 'ci_data_hook:load' is a Python hook (it imports code)" in refused.stderr
    assert "--allow-config-code" in refused.stderr
    allowed = _compress(workdir, tmp_path / "out", *args, "--allow-config-code")
    assert allowed.exit_code == 0, allowed.output
    assert _report(allowed)["search"]["held_out_samples"] == 48


def test_a_model_with_a_lambda_layer_compresses_only_with_allow_model_code(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Lambda(lambda t: t * 0.5)(x)
    x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.save(tmp_path / "model.keras")
    write_npz(tmp_path / "val.npz", model, n=16)
    args = ["--method", "fixed_params", "--compression-factor", "0.6", "--export", "tflite,keras", "--data", tmp_path / "val.npz"]
    refused = _compress(tmp_path, tmp_path / "out", *args)
    assert refused.exit_code == 1 and "--allow-model-code" in refused.stderr
    allowed = _compress(tmp_path, tmp_path / "allowed", *args, "--allow-model-code")
    assert allowed.exit_code == 0, allowed.output
    report = _report(allowed)
    assert report["options"]["allow_model_code"] is True
    assert all(artifact["max_abs_diff"] <= 1e-4 for artifact in report["artifacts"])  # the .keras one reloads too
