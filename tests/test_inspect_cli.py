"""`compressor inspect`: the per-layer table, the --json document, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from conftest import build_nested, build_residual  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from compressor.cli.app import app  # noqa: E402
from compressor.cli.inspect import human_count  # noqa: E402


def _invoke(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The residual and nested tiny models, saved as .keras, with their expected totals."""
    folder = tmp_path_factory.mktemp("inspect")
    out = {}
    for model in (build_residual(), build_nested()):
        path = folder / f"{model.name}.keras"
        model.save(path)
        out[model.name] = (path, model.count_params())
    return out


def test_json_document_totals_match(saved):
    path, params = saved["tiny_residual"]
    result = _invoke(path, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert set(payload) == {"params", "flops", "layers"}
    assert payload["params"] == params == sum(layer["params"] for layer in payload["layers"])
    assert payload["flops"] == sum(layer["flops"] for layer in payload["layers"]) > 0


def test_table_lists_every_layer(saved):
    path, params = saved["tiny_nested"]
    result = _invoke(path)
    assert result.exit_code == 0, result.output
    payload = json.loads(_invoke(path, "--json").stdout)
    for layer in payload["layers"]:
        # the table folds long names over lines; each piece is still there
        assert layer["name"][:12] in result.stdout
    assert "backbone/" in result.stdout
    assert f"Total: {params:,} parameters" in result.stdout


def test_missing_model_is_one_line_error(tmp_path):
    result = _invoke(tmp_path / "missing.keras")
    assert result.exit_code != 0
    assert "model not found" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_importing_the_command_does_not_import_tensorflow():
    code = "import sys, compressor.cli.inspect; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "value, text", [(0, "0"), (999, "999"), (1000, "1K"), (867_464, "867K"), (1_234_567, "1.23M"), (4.1e9, "4.1G")]
)
def test_human_count(value, text):
    assert human_count(int(value)) == text
