"""Tests for the latency gate: `compressor.bench.gate` and `compressor bench --baseline`.

Baselines are real reports of the tiny artifacts below with their medians scaled, so
the expected verdict follows from the scale and the threshold, not from timing luck.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from typer.testing import CliRunner  # noqa: E402

from compressor.bench.benchmark import benchmark  # noqa: E402
from compressor.bench.gate import (  # noqa: E402
    Regression,
    compare_latency,
    latency_regressions,
    load_report,
    medians,
)
from compressor.cli.app import app  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402

SHAPE = (8, 8, 3)
FAST = ["--runs", "5", "--warmup", "1"]
# Latency of these sub-millisecond artifacts varies between runs on a shared 2-core
# machine by up to a few times; scaling a baseline by 1000 puts the verdict far beyond
# that noise, so the CLI tests cannot flip.
FAR = 1000.0


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Two tiny .tflite artifacts and a real bench report of them."""
    import keras
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("gate")
    keras.utils.set_random_seed(0)
    paths = []
    for name, filters in (("wide.tflite", 8), ("narrow.tflite", 2)):
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(filters, 3, activation="relu")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
        (folder / name).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        paths.append(folder / name)
    report = benchmark(paths, runs=5, warmup=1).to_dict()
    return {"folder": folder, "paths": paths, "report": report}


def _scaled(report: dict, factors: list[float]) -> dict:
    """A copy of `report` with each artifact's median multiplied by its factor."""
    scaled = copy.deepcopy(report)
    for result, factor in zip(scaled["results"], factors):
        result["latency_ms"]["median"] *= factor
    return scaled


def _write(folder: Path, name: str, payload) -> Path:
    path = folder / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


# --- library ------------------------------------------------------------------------


def test_threshold_splits_slower_from_allowed(arts):
    baseline = arts["report"]
    # First artifact 1% beyond the 10% allowed, second 1% within it.
    now = _scaled(baseline, [1.11, 1.09])

    gate = compare_latency(now, baseline, max_regression=0.10)

    assert not gate.passed
    first, second = arts["paths"]
    assert [r.name for r in gate.compared] == [str(first), str(second)]
    assert [r.name for r in gate.regressions] == [str(first)]
    (slow,) = gate.regressions
    base_ms = baseline["results"][0]["latency_ms"]["median"]
    assert slow.baseline_ms == base_ms and slow.ms == pytest.approx(base_ms * 1.11, rel=1e-12)
    assert slow.change == pytest.approx(0.11, rel=1e-9)  # float products: only rounding error
    assert latency_regressions(now, baseline, 0.10) == [slow]
    assert str(slow).startswith(f"{first}: median ") and str(slow).endswith("ms (+11.0%)")
    assert latency_regressions(now, baseline, 0.12) == []


def test_exactly_at_the_limit_passes(arts):
    now = _scaled(arts["report"], [1.0 + 0.25, 1.0])
    assert compare_latency(now, arts["report"], max_regression=0.25).passed
    assert not compare_latency(now, arts["report"], max_regression=0.0).passed


def test_faster_is_never_a_regression(arts):
    now = _scaled(arts["report"], [0.5, 0.1])
    gate = compare_latency(now, arts["report"], max_regression=0.0)
    assert gate.passed
    assert [round(r.change, 6) for r in gate.compared] == [-0.5, -0.9]


def test_artifact_missing_from_baseline_is_listed_not_failed(arts):
    baseline = copy.deepcopy(arts["report"])
    del baseline["results"][1]
    now = _scaled(arts["report"], [1.0, 50.0])  # the new one is far slower: still no failure

    gate = compare_latency(now, baseline, max_regression=0.10)

    assert gate.passed
    assert gate.missing == (str(arts["paths"][1]),)
    assert [r.name for r in gate.compared] == [str(arts["paths"][0])]


def test_artifacts_match_by_file_name_across_folders(arts):
    baseline = _scaled(arts["report"], [0.5, 1.0])
    for result in baseline["results"]:
        result["path"] = str(Path("previous-build") / Path(result["path"]).name)

    gate = compare_latency(arts["report"], baseline, max_regression=0.10)

    assert gate.missing == ()
    assert [r.name for r in gate.regressions] == [str(arts["paths"][0])]


def test_a_file_name_that_is_not_unique_does_not_match(arts):
    baseline = copy.deepcopy(arts["report"])
    twin = copy.deepcopy(baseline["results"][0])
    twin["path"] = str(Path("elsewhere") / Path(twin["path"]).name)
    baseline["results"].append(twin)
    now = copy.deepcopy(arts["report"])
    now["results"][0]["path"] = Path(now["results"][0]["path"]).name  # only the name is left

    gate = compare_latency(now, baseline, max_regression=0.10)

    assert gate.missing == (Path(arts["paths"][0]).name,)


def test_compress_report_works_as_baseline(arts):
    """A compress report.json lists artifacts, and the original's, with latency_ms."""
    first, second = arts["report"]["results"]
    compress_report = {
        "status": "ok",
        "artifacts": [
            {
                "format": "tflite",
                "path": first["path"],
                "latency_ms": {**first["latency_ms"], "median": first["latency_ms"]["median"] / 2},
                "baseline_path": second["path"],
                "baseline_latency_ms": second["latency_ms"],
            },
            {"format": "keras", "path": "model.keras", "latency_ms": None},
        ],
    }

    assert medians(compress_report) == {
        first["path"]: first["latency_ms"]["median"] / 2,
        second["path"]: second["latency_ms"]["median"],
    }
    gate = compare_latency(arts["report"], compress_report, max_regression=0.5)
    assert [r.name for r in gate.regressions] == [first["path"]]


def test_different_hosts_give_a_warning(arts):
    now, baseline = copy.deepcopy(arts["report"]), copy.deepcopy(arts["report"])
    now["host"] = {"machine": "aarch64", "name": "pi5"}
    baseline["host"] = {"machine": "x86_64", "name": "ci-runner"}
    gate = compare_latency(now, baseline, 0.1)
    assert gate.passed and "ci-runner (x86_64)" in gate.warning and "pi5 (aarch64)" in gate.warning
    baseline["host"] = now["host"]
    assert compare_latency(now, baseline, 0.1).warning is None


@pytest.mark.parametrize("value", [-0.01, float("nan"), float("inf"), True, "0.1", None])
def test_max_regression_is_validated(arts, value):
    with pytest.raises(CompressorError, match="max_regression must be a fraction >= 0"):
        compare_latency(arts["report"], arts["report"], value)


def test_gate_result_to_dict_is_json(arts):
    gate = compare_latency(_scaled(arts["report"], [2.0, 1.0]), arts["report"], 0.1)
    payload = json.loads(json.dumps(gate.to_dict()))
    assert payload["passed"] is False and payload["max_regression"] == 0.1
    assert [c["regressed"] for c in payload["compared"]] == [True, False]
    assert payload["regressions"] == [str(arts["paths"][0])] and payload["missing"] == []
    assert isinstance(gate.regressions[0], Regression)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "baseline not found"),
        ("{", "is not valid JSON"),
        ("[1, 2]", "is not a bench report"),
        ('{"results": []}', "holds no median latencies"),
        ('{"results": [{"path": "a.tflite", "latency_ms": {"median": "fast"}}]}', "needs latency_ms.median"),
        ('{"results": [{"path": "a.tflite", "latency_ms": {"median": 0}}]}', "> 0. Received: 0"),
        ('{"results": [{"latency_ms": {"median": 1.0}}]}', "an artifact has no 'path'"),
    ],
)
def test_load_report_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CompressorError, match=match) as exc:
        load_report(path)
    assert "\n" not in str(exc.value)


def test_load_report_rejects_binary_files(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_bytes(np.random.default_rng(0).bytes(64) + b"\xff")
    with pytest.raises(CompressorError, match="baseline .* is not"):
        load_report(path)


# --- command line -------------------------------------------------------------------


def _invoke(arts, *args):
    paths = [str(p) for p in arts["paths"]]
    return CliRunner().invoke(app, ["bench", *paths, *FAST, *map(str, args)])


def test_cli_exit_3_on_regression(arts, tmp_path):
    baseline = _write(tmp_path, "fast.json", _scaled(arts["report"], [1 / FAR, 1.0 / FAR]))

    result = _invoke(arts, "--baseline", baseline)

    assert result.exit_code == 3, result.output
    assert "slower" in result.stdout and "baseline" in result.stdout
    assert "latency regression:" in result.stderr and "allowed +10%" in " ".join(result.stderr.split())


def test_cli_exit_0_below_threshold_and_new_artifacts_pass(arts, tmp_path):
    baseline = _scaled(arts["report"], [FAR, FAR])
    del baseline["results"][1]

    result = _invoke(arts, "--baseline", _write(tmp_path, "slow.json", baseline))

    assert result.exit_code == 0, result.output
    assert "new (not in baseline)" in result.stdout
    assert "latency regression" not in result.stderr


def test_cli_json_carries_the_gate(arts, tmp_path):
    baseline = _write(tmp_path, "fast.json", _scaled(arts["report"], [1 / FAR, FAR]))

    result = _invoke(arts, "--baseline", baseline, "--json")

    assert result.exit_code == 3
    payload = json.loads(result.stdout)  # still exactly one JSON document on stdout
    assert payload["gate"]["passed"] is False
    assert payload["gate"]["regressions"] == [str(arts["paths"][0])]
    assert [c["regressed"] for c in payload["gate"]["compared"]] == [True, False]


def test_cli_output_is_the_next_baseline(arts, tmp_path):
    output = tmp_path / "runs" / "bench.json"

    first = _invoke(arts, "--output", output, "--json")

    assert first.exit_code == 0, first.output
    assert json.loads(output.read_text()) == json.loads(first.stdout)
    assert not [p for p in output.parent.iterdir() if p != output]  # no temporary file left
    # The same artifacts against their own report, with room for machine noise.
    second = _invoke(arts, "--baseline", output, "--max-regression", FAR, "--quiet")
    assert second.exit_code == 0, second.output
    assert second.stdout == ""


def test_cli_quiet_still_reports_a_regression(arts, tmp_path):
    baseline = _write(tmp_path, "fast.json", _scaled(arts["report"], [1 / FAR, 1 / FAR]))
    result = _invoke(arts, "--baseline", baseline, "--quiet")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert "latency regression:" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "missing.json"], "baseline not found: missing.json"),
        (["--baseline", "invalid.json"], "is not valid JSON"),
        (["--baseline", "wide.tflite"], "baseline wide.tflite is not"),
        (["--max-regression", "-0.5"], "max_regression must be a fraction >= 0"),
        (["--remote-python", "python3"], "apply only with --remote"),
    ],
)
def test_cli_bad_gate_input_exits_1(arts, monkeypatch, args, message):
    monkeypatch.chdir(arts["folder"])
    _write(arts["folder"], "invalid.json", '{"results": [')

    result = _invoke(arts, *args)

    assert result.exit_code == 1
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
