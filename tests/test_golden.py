"""Golden runs: report.json and plan.json of fixed runs, frozen, so restructuring cannot change behaviour.

Each run compresses the tiny residual model trained on `quadrants` (real labels; the
trained file is `golden/model.keras`, so no training noise enters) through the CLI, then compares its report and plan with the files in `tests/golden/`, key by key:
every key must be there with the same value, numbers within the run's tolerance. What a
run cannot reproduce is left out before comparing: wall times, latencies, file sizes
and paths of this machine (see `normalize`). New keys in a report are allowed (schema
rule); keys that disappear or change are not.

Regenerate after an intended change of behaviour, and say why in the commit:

    COMPRESSOR_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from conftest import write_quadrants_data

GOLDEN = Path(__file__).parent / "golden"
UPDATE = bool(os.environ.get("COMPRESSOR_UPDATE_GOLDEN"))

# Measured, machine-dependent or wall-clock values: not part of the behaviour.
VOLATILE = {"timings_s", "latency_ms", "baseline_latency_ms", "static_latency_ms", "latency_ratio",
            "mean_latency_ratio", "latency_check", "seconds", "bytes", "baseline_bytes", "static_bytes",
            "init_ms", "first_inference_ms", "peak_memory_bytes", "baseline_peak_memory_bytes"}
TIMED_NOTE = "runs slower than the original's"
"""The words of report.json's note on a slower artifact (`compressor.report.build.slower_notes`), a timing too."""

# name → (arguments, tolerance on numbers). Runs without training are deterministic; training
# (fine-tuning, gates) on 2 threads may reorder float sums, so those runs get a tolerance.
RUNS = {
    "fixed_params": (["--method", "fixed_params", "--compression-factor", "0.6", "--export", "tflite,onnx,keras"], 1e-6),
    # fixed_loss: --data's 96 samples leave 48 to the guard, which confirms 30 points with room for the search.
    "fixed_loss": (["--method", "fixed_loss", "--max-acc-loss", "0.3", "--techniques", "tucker,sparsity",
                    "--export", "tflite"], 1e-6),
    "channels": (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "channels,tucker",
                  "--export", "tflite"], 1e-6),
    "channels_finetuned": (["--method", "fixed_loss", "--max-acc-loss", "0.3", "--techniques", "channels,tucker",
                  "--finetune-epochs", "1", "--train-data", "TRAIN", "--export", "tflite"], 0.05),
    "hessian": (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "hessian,sparsity",
                 "--criterion", "snip", "--train-data", "TRAIN", "--export", "tflite"], 1e-4),
    "gated": (["--method", "fixed_loss", "--max-acc-loss", "0.1", "--techniques", "gating", "--train-data", "TRAIN",
               "--gating-epochs", "2", "--gating-target", "0.1", "--gates-only", "--export", "tflite,onnx"], 0.05),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    (folder / "model.keras").write_bytes((GOLDEN / "model.keras").read_bytes())
    write_quadrants_data(folder)
    return folder


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run(name, workdir, tmp_path, keep_any_gates):
    args, tolerance = RUNS[name]
    out = tmp_path / name
    command = ["compress", str(workdir / "model.keras"), "--out", str(out), "--runs", "3", "--json",
               "--cache-dir", str(tmp_path / "cache"), "--data", str(workdir / "val.npz"),
               "--test-data", str(workdir / "test.npz"),
               *[str(workdir / "train.npz") if a == "TRAIN" else a for a in args]]
    result = CliRunner().invoke(app, command)
    assert result.exit_code in (0, 2), result.output
    for kind in ("report", "plan"):
        actual = normalize(json.loads((out / f"{kind}.json").read_text()))
        golden = GOLDEN / f"{name}.{kind}.json"
        if UPDATE:
            GOLDEN.mkdir(exist_ok=True)
            golden.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
            continue
        differences = compare(json.loads(golden.read_text()), actual, tolerance, kind)
        assert not differences, "\n".join(differences[:20])


def normalize(value):
    """The value without what a rerun cannot reproduce (VOLATILE keys), absolute paths cut to their last part."""
    if isinstance(value, dict):
        found = {k: normalize(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(found.get("notes"), list):  # a note on an artifact slower than the original's is a timing
            found["notes"] = [note for note in found["notes"] if TIMED_NOTE not in note]
        return found
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


def compare(golden, actual, tolerance, where):
    """Differences between the golden value and the actual one (empty: the same within tolerance).

    Keys of the golden value must all be there; keys it does not have are new (allowed).
    """
    if isinstance(golden, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        problems = []
        for key, value in golden.items():
            if key not in actual:
                problems.append(f"{where}.{key}: missing")
            else:
                problems += compare(value, actual[key], tolerance, f"{where}.{key}")
        return problems
    if isinstance(golden, list):
        if not isinstance(actual, list) or len(actual) != len(golden):
            return [f"{where}: expected {len(golden)} items, got {actual!r}"]
        return [p for i, (g, a) in enumerate(zip(golden, actual)) for p in compare(g, a, tolerance, f"{where}[{i}]")]
    if isinstance(golden, float) or (isinstance(golden, int) and isinstance(actual, float)):
        if not isinstance(actual, (int, float)) or isinstance(actual, bool):
            return [f"{where}: expected {golden!r}, got {actual!r}"]
        scale = max(1.0, abs(golden))
        return [] if math.isclose(golden, actual, abs_tol=tolerance * scale) else [f"{where}: expected {golden!r}, got {actual!r}"]
    return [] if golden == actual else [f"{where}: expected {golden!r}, got {actual!r}"]
