"""What report.json promises a pipeline, on data whose splits differ.

The other CLI tests label every split with the model's own predictions, so every split
scores 100% and a report measured on the wrong split would pass them. Here the splits
score differently on purpose: the held-out figures must be those of the held-out data,
measured on the artifact itself, and a budget met on the search data but missed on
the held-out data must end in exit code 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.report.schema import ERROR_REPORT, REPORT, documented_keys, report_problems
from conftest import quadrants, write_quadrants_workdir

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model trained on real labels; val.npz as labelled, test.npz with half its labels wrong."""
    folder = tmp_path_factory.mktemp("contract")
    model = write_quadrants_workdir(folder)
    x, y = quadrants(64, seed=2)
    y[:32] = (y[:32] + 1) % 4
    np.savez(folder / "test.npz", x=x, y=y)
    return folder


def _compress(workdir, out, *args):
    command = ["compress", str(workdir / "model.keras"), "--out", str(out), "--runs", "3",
               "--cache-dir", str(workdir / "cache"), "--json", *map(str, args)]
    return runner.invoke(app, command)


def _tflite_accuracy(path, data):
    from compressor.bench.runtime import open_artifact

    return float(np.mean(open_artifact(path).predict(data["x"]).argmax(-1) == data["y"]))


def test_accuracy_is_the_artifacts_on_the_held_out_data(workdir, tmp_path):
    result = _compress(workdir, tmp_path / "out", "--method", "fixed_params", "--compression-factor", "0.6",
                       "--data", workdir / "val.npz", "--test-data", workdir / "test.npz", "--export", "tflite,keras")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    test = np.load(workdir / "test.npz")
    tflite = next(a for a in report["artifacts"] if a["format"] == "tflite")
    # Measured again here, by running the written files on the held-out data: exactly the report's figures.
    assert report["baseline"]["accuracy"] == _tflite_accuracy(Path(tflite["baseline_path"]), test)
    assert report["compressed"]["accuracy"] == _tflite_accuracy(Path(tflite["path"]), test)
    assert report["baseline"]["accuracy"] <= 0.5  # half the labels are wrong: not --data's 90% or more
    assert report["search"]["held_out_samples"] == 64 and report["search"]["search_samples"] == 96


def test_without_test_data_the_held_out_part_of_data_is_measured(workdir, tmp_path):
    """fixed_loss splits --data; the half it holds out is spoiled here, and must be what the report measures."""
    from compressor.io.data import Dataset
    from compressor.pipeline import split_data

    val = np.load(workdir / "val.npz")
    x, y = val["x"].copy(), val["y"]
    search, held = split_data(Dataset(np.arange(len(y))[:, None].astype(np.float32), y, "val"), 0.5, seed=0)
    held_index = held.x[:, 0].astype(int)
    # Give half of the held-out samples the input of a sample of another class: the labels (and so the
    # stratified split) stay as they are, the original misclassifies those.
    for i in held_index[: len(held_index) // 2]:
        x[i] = x[np.flatnonzero(y != y[i])[0]]
    np.savez(tmp_path / "spoiled.npz", x=x, y=y)
    result = _compress(workdir, tmp_path / "out", "--method", "fixed_loss", "--max-acc-loss", "0.5",
                       "--data", tmp_path / "spoiled.npz", "--export", "tflite")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tflite = report["artifacts"][0]
    held_out = {"x": x[held_index], "y": y[held_index]}
    assert report["search"]["baseline_accuracy"] >= 0.9  # the search half is untouched
    assert report["baseline"]["accuracy"] == _tflite_accuracy(Path(tflite["baseline_path"]), held_out) <= 0.6
    assert report["compressed"]["accuracy"] == _tflite_accuracy(Path(tflite["path"]), held_out)


def test_budget_met_on_the_search_data_but_missed_on_held_out_data_exits_2(workdir, tmp_path):
    from compressor.bench.runtime import open_artifact

    args = ["--method", "fixed_loss", "--max-acc-loss", "0.1", "--data", workdir / "val.npz", "--export", "tflite"]
    first = _compress(workdir, tmp_path / "first", *args, "--test-data", workdir / "val.npz")
    assert first.exit_code == 0, first.output
    # Held-out data where the compressed artifact and the original disagree, labelled with the original's answers
    # (plain noise, without a bright quadrant, is where the two differ most).
    model, base = (open_artifact(tmp_path / "first" / name) for name in ("model.tflite", "baseline/model.tflite"))
    x = np.random.default_rng(1).random((2000, 16, 16, 3), dtype=np.float32)
    ours, theirs = model.predict(x).argmax(-1), base.predict(x).argmax(-1)
    differ = np.flatnonzero(ours != theirs)
    assert len(differ) >= 5, "the compressed model should differ from the original on some inputs"
    np.savez(tmp_path / "hard.npz", x=x[differ], y=theirs[differ])

    # The same search (same data, same cached table) chooses the same model; the held-out data then exposes it.
    result = _compress(workdir, tmp_path / "second", *args, "--test-data", tmp_path / "hard.npz")
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    budget = report["budget"]
    assert budget["search_achieved"] <= 0.1 and budget["achieved"] == pytest.approx(1.0)
    assert budget["met"] is False and report["status"] == "budget_not_met"
    assert "budget not met" in result.stderr
    assert (tmp_path / "second" / "model.tflite").is_file()  # the best candidate is still written
    assert report_problems(report) == []


def test_reports_have_exactly_the_documented_keys(workdir, tmp_path):
    result = _compress(workdir, tmp_path / "out", "--method", "fixed_loss", "--max-acc-loss", "0.5", "--data",
                       workdir / "val.npz", "--test-data", workdir / "test.npz", "--techniques", "channels,tucker")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report_problems(report) == []
    assert report["channels"] is not None and {a["format"] for a in report["artifacts"]} == {"tflite", "onnx", "keras"}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, int))
    error = _compress(workdir, tmp_path / "err", "--method", "fixed_params", "--compression-factor", "0.5",
                      "--data", tmp_path / "wrong_shape.npz")
    assert error.exit_code == 1
    written = json.loads((tmp_path / "err" / "report.json").read_text())
    assert written["status"] == "error" and report_problems(written) == []


def test_the_checker_names_what_departs():
    assert report_problems({"schema": 1, "status": "error", "method": None, "error": "x"}) == []
    problems = report_problems({"schema": 1, "status": "ok", "budget": {"kind": None, "limit": None, "achieved": None,
                                                                         "met": None, "surprise": 1}})
    assert "report.budget: undocumented key 'surprise'" in problems
    assert "report: missing key 'artifacts'" in problems


def test_the_readme_documents_every_key():
    text = README.read_text()
    block = text[text.index("#### `report.json`, schema 1"):]
    block = block[block.index("```"):]
    block = block[: block.index("```", 3)]
    quoted = set(re.findall(r'"([a-z0-9_]+)"', block))
    assert documented_keys(REPORT) | documented_keys(ERROR_REPORT) <= quoted, sorted(
        (documented_keys(REPORT) | documented_keys(ERROR_REPORT)) - quoted
    )


def test_an_artifact_slower_than_the_originals_gets_a_note():
    from compressor.report.build import slower_notes

    def entry(path, fmt, ours, theirs):
        return {"path": path, "format": fmt, "latency_ratio": ours / theirs, "latency_ms": {"median": ours},
                "baseline_latency_ms": {"median": theirs}}

    notes = slower_notes([entry("out/model.onnx", "onnx", 1.25, 0.1), entry("out/model.tflite", "tflite", 0.2, 0.4),
                          entry("out/model_int8.tflite", "tflite", 0.105, 0.1), {"path": "out/model.keras", "format": "keras"}])
    assert notes == ["model.onnx runs slower than the original's onnx file (1.25 ms against 0.1 ms median, 12.50×): "
                     "this runtime runs some edited layer less well than the original's; the other format, or "
                     "techniques that leave that layer whole, may serve better."]
