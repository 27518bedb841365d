"""The output folder: refused when it holds results, replaced whole, untouched by a failed run."""

from __future__ import annotations

import pytest

from compressor.errors import CompressorError
from compressor.io.outdir import check_output_folder, existing_results, staged_output


def _fill(folder, text):
    (folder / "baseline").mkdir(parents=True)
    (folder / "baseline" / "model.tflite").write_text(text)
    for name in ("model.tflite", "model.int8.onnx", "report.json", "plan.json"):
        (folder / name).write_text(text)


def test_results_are_recognised_and_other_files_are_not(tmp_path):
    _fill(tmp_path, "old")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other.tflite").write_text("mine")
    assert existing_results(tmp_path) == ["baseline", "model.int8.onnx", "model.tflite", "plan.json", "report.json"]
    with pytest.raises(CompressorError, match="already holds results .*--overwrite"):
        check_output_folder(tmp_path, overwrite=False)
    check_output_folder(tmp_path, overwrite=True)
    check_output_folder(tmp_path / "new", overwrite=False)  # a missing folder is fine


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CompressorError, match="is a file"):
        check_output_folder(tmp_path / "f", overwrite=True)


def test_success_replaces_earlier_results_whole(tmp_path):
    out = tmp_path / "out"
    _fill(out, "old")
    (out / "notes.txt").write_text("mine")
    with staged_output(out) as staging:
        (staging / "model.tflite").write_text("new")
        (staging / "report.json").write_text("new")
    # The new run wrote no ONNX, plan or baseline: the old ones must not linger beside the new report.
    assert sorted(p.name for p in out.iterdir()) == ["model.tflite", "notes.txt", "report.json"]
    assert (out / "model.tflite").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_the_folder_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    _fill(out, "old")
    before = {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(error):
        with staged_output(out) as staging:
            (staging / "model.tflite").write_text("half")
            raise error()
    assert {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_first_run_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path / "out") as staging:
            (staging / "plan.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
