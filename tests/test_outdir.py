"""The output folder: a run's own files recorded, replaced whole, and nothing of the user's lost."""

from __future__ import annotations

import errno
import json
import os

import pytest

from compressor.errors import CompressorError
from compressor.io import outdir
from conftest import raises_as_cli
from compressor.io.outdir import (
    MANIFEST,
    check_output_folder,
    existing_results,
    holds_results,
    read_manifest,
    staged_output,
    write_error_report,
)


def _run(out, files, **kwargs):
    """One finished run that writes `files` (relative path → text)."""
    with staged_output(out, **kwargs) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


FIRST = {"model.tflite": "old", "model.int8.onnx": "old", "report.json": "old", "plan.json": "old",
         "baseline/model.tflite": "old", "static/model.tflite": "old", "plots/layer_params.png": "old"}


def test_a_run_records_what_it_wrote(tmp_path):
    out = tmp_path / "out"
    _run(out, FIRST)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["written_by"] == "compressor"
    assert [entry["path"] for entry in manifest["files"]] == sorted(FIRST)
    assert all(entry["bytes"] == 3 and len(entry["sha256"]) == 64 for entry in manifest["files"])
    assert existing_results(out) == sorted({"model.tflite", "model.int8.onnx", "report.json", "plan.json",
                                            "baseline", "static", "plots", MANIFEST})
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    with raises_as_cli(CompressorError, "already holds results .*--overwrite"):
        check_output_folder(out, overwrite=False)
    check_output_folder(out, overwrite=True)
    check_output_folder(tmp_path / "new", overwrite=False)  # a missing folder is fine


def test_overwrite_replaces_exactly_the_earlier_runs_files(tmp_path):
    out = tmp_path / "proj"
    _run(out, FIRST)
    mine = {"notes.txt": "mine", "other.tflite": "mine", "static/site.css": "mine", "plots/fig1.png": "mine",
            "baseline/README": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    _run(out, {"model.onnx": "new", "report.json": "new"}, overwrite=True)
    # The earlier run's files went (no stale TFLite beside a report that does not list it); the user's stayed.
    assert _tree(out) == {**mine, "model.onnx": "new", "report.json": "new", MANIFEST: (out / MANIFEST).read_text()}
    assert read_manifest(out).files == ("model.onnx", "report.json")


def test_folders_the_earlier_run_left_empty_are_removed(tmp_path):
    out = tmp_path / "out"
    _run(out, FIRST)
    _run(out, {"report.json": "new"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "report.json"]


def test_files_no_run_recorded_are_never_replaced(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "model.onnx").write_text("the user's own")
    for overwrite in (False, True):
        with pytest.raises(CompressorError, match="model.onnx, which no compressor run recorded writing"):
            check_output_folder(out, overwrite=overwrite)
    assert (out / "model.onnx").read_text() == "the user's own"


def test_the_input_model_is_never_replaced(tmp_path):
    out = tmp_path / "inplace"
    out.mkdir()
    (out / "model.keras").write_text("input")
    with pytest.raises(CompressorError, match="holds the input model.keras"):
        check_output_folder(out, overwrite=True, inputs=[out / "model.keras"])
    # Also when an earlier run wrote it: compressing a compressed model into its own folder.
    built = tmp_path / "build"
    _run(built, {"model.keras": "compressed", "report.json": "{}"})
    with pytest.raises(CompressorError, match="is an input of this run"):
        check_output_folder(built, overwrite=True, inputs=[built / "model.keras"])
    assert (built / "model.keras").read_text() == "compressed"


@pytest.mark.parametrize(
    "name, message",
    [("model.tflite", "no compressor run recorded writing"), ("plots/layer_params.png", "appeared during the run")],
)
def test_a_file_that_appears_during_the_run_is_kept_and_so_are_the_results(tmp_path, name, message):
    out = tmp_path / "out"
    with pytest.raises(CompressorError, match=f"{message}.*nothing was replaced, the new results are in"):
        with staged_output(out) as staging:
            (staging / name).parent.mkdir(exist_ok=True)
            (staging / name).write_text("new")
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_text("someone else's")
    assert (out / name).read_text() == "someone else's"
    kept = [p for p in out.iterdir() if p.name.startswith(".compressor-results-")]
    assert len(kept) == 1 and (kept[0] / name).read_text() == "new"


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CompressorError, match="is a file"):
        check_output_folder(tmp_path / "f", overwrite=True)


def test_an_unreadable_manifest_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CompressorError, match="not a manifest this version can read"):
        check_output_folder(tmp_path, overwrite=True)
    (tmp_path / MANIFEST).write_text(json.dumps({"status": "complete", "files": [{"path": "../elsewhere"}]}))
    with pytest.raises(CompressorError, match="outside its folder"):
        check_output_folder(tmp_path, overwrite=True)


def test_an_output_folder_on_another_filesystem(tmp_path, monkeypatch):
    """`--out` as a mount point: a rename from outside it fails with EXDEV (the staging folder is inside)."""
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.replace

    def replace(src, dst):
        if not str(os.path.abspath(src)).startswith(str(out)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    _run(out, {"model.tflite": "new", "baseline/model.tflite": "base"})
    assert _tree(out)["model.tflite"] == "new" and _tree(out)["baseline/model.tflite"] == "base"


def test_a_move_across_filesystems_copies_then_renames(tmp_path, monkeypatch):
    """A subfolder mounted on its own: the first rename fails, a copy under a temporary name is renamed."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    source, target = tmp_path / "a.bin", tmp_path / "sub" / "b.bin"
    source.write_bytes(b"payload")
    outdir._move(source, target)
    assert target.read_bytes() == b"payload" and not source.exists()
    assert calls[1][0].startswith(".b.bin.") and calls[1][1] == "b.bin"  # the copy's temporary name, renamed
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_the_folder_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    _run(out, FIRST)
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(error):
        with staged_output(out, overwrite=True) as staging:
            (staging / "model.tflite").write_text("half")
            raise error()
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_first_run_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path / "out") as staging:
            (staging / "plan.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_error_report_does_not_block_the_rerun(tmp_path):
    out = tmp_path / "out"
    write_error_report(out, b'{"status": "error"}\n')
    assert read_manifest(out).status == "error" and not holds_results(out)
    check_output_folder(out, overwrite=False)
    _run(out, {"report.json": "ok"})
    assert (out / "report.json").read_text() == "ok" and read_manifest(out).status == "complete"
    assert holds_results(out)
