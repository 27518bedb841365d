"""The files in examples/ work: the pipeline script end to end, the workflow's commands and flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_residual, write_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    model = build_residual()
    model.save(folder / "model.keras")
    write_npz(folder / "val.npz", model, n=64, seed=1)
    write_npz(folder / "test.npz", model, n=48, seed=2)
    return folder


def _pipeline(tiny, *args):
    command = [sys.executable, str(ROOT / "examples" / "pipeline.py"), str(tiny / "model.keras"), str(tiny / "val.npz"),
               str(tiny / "test.npz"), str(tiny / "build"), "--max-acc-loss", "0.5", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={"XDG_CACHE_HOME": str(tiny / "cache"), **_env()})


def _env():
    import os

    return {key: value for key, value in os.environ.items() if key != "XDG_CACHE_HOME"}


def test_pipeline_script_compresses_times_and_gates(tiny):
    first = _pipeline(tiny)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ok: accuracy drop")
    timing = json.loads((tiny / "build" / "bench.json").read_text())
    assert timing["results"][0]["latency_ms"]["median"] > 0

    # A baseline 1000x faster than anything this machine can do: the gate must fail with 3.
    for result in timing["results"]:
        result["latency_ms"] = {key: value / 1000 for key, value in result["latency_ms"].items()}
    (tiny / "fast.json").write_text(json.dumps(timing))
    gated = _pipeline(tiny, "--baseline", tiny / "fast.json")
    assert gated.returncode == 3, gated.stderr
    assert "latency regression" in gated.stderr


def _flags(command: str) -> list[str]:
    return re.findall(r"(--[a-z][a-z0-9-]*)", command)


def _help(*command: str) -> str:
    from typer.testing import CliRunner

    from compressor.cli.app import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    return result.stdout


def test_workflow_uses_real_flags_and_exit_codes():
    workflow = (ROOT / "examples" / "github" / "compress.yml").read_text()
    compress_lines = [line for line in workflow.splitlines() if re.search(r"^\s*compress ", line)]
    bench_lines = re.findall(r"compressor bench[^\n]*\n[^\n]*", workflow)
    assert compress_lines and bench_lines
    compress_help, bench_help = _help("compress"), _help("bench")
    for flag in {f for line in compress_lines for f in _flags(line)}:
        assert flag in compress_help, flag
    for flag in {f for text in bench_lines for f in _flags(text)} | {"--baseline", "--max-regression"}:
        assert flag in bench_help, flag
    # The budget step tolerates exit 2 long enough to upload, then fails the job.
    assert '-eq 2' in workflow and "exit_code != '0'" in workflow


def test_the_workflow_is_valid_yaml():
    import yaml
    workflow = yaml.safe_load((ROOT / "examples" / "github" / "compress.yml").read_text())
    assert set(workflow["jobs"]) == {"compress", "bench-on-board"}
    assert workflow["jobs"]["bench-on-board"]["needs"] == "compress"
