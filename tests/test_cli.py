"""The CLI as a user meets it: instant help, JSON that parses, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from conftest import build_residual, build_sequential, write_npz

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout, result.stderr


def test_help_does_not_import_tensorflow():
    code = (
        "import sys, time; t = time.perf_counter();"
        "from compressor.cli.app import app;"
        "from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['--help']);"
        "assert r.exit_code == 0, r.output;"
        "assert 'inspect' in r.output and 'export' in r.output and 'bench' in r.output;"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf_keras', 'onnx', 'tf2onnx') if m in sys.modules];"
        "assert not heavy, heavy;"
        "print(time.perf_counter() - t)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Generous bound for a loaded 2-core machine; typically ~0.2 s.
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("command", ["inspect", "export", "bench", "example"])
def test_subcommand_help(command):
    result, out, _ = _run(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in out


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = build_residual()
    model.save(folder / "model.keras")
    write_npz(folder / "val.npz", model, n=16)
    return folder


def test_export_json(saved_model, tmp_path):
    result, out, _ = _run(
        "export", saved_model / "model.keras", "--out", tmp_path / "out", "--data", saved_model / "val.npz", "--json"
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out)
    assert [a["format"] for a in payload["artifacts"]] == ["tflite", "onnx", "keras"]
    for artifact in payload["artifacts"]:
        assert artifact["bytes"] > 0 and artifact["max_abs_diff"] <= 1e-4 and artifact["top1_agreement"] == 1.0
        assert artifact["passed"] is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.keras", "model.onnx", "model.tflite"]


def test_export_table_mentions_each_artifact(saved_model, tmp_path):
    result, out, _ = _run("export", saved_model / "model.keras", "-o", tmp_path, "--format", "tflite")
    assert result.exit_code == 0, result.output
    assert "tflite" in out and "ok" in out and "generated" in out


def test_export_quiet_prints_nothing_but_still_fails_on_parity(saved_model, tmp_path, monkeypatch):
    from compressor.export import verify

    result, out, _ = _run("export", saved_model / "model.keras", "-o", tmp_path / "a", "--format", "tflite", "--quiet")
    assert result.exit_code == 0 and out == "" and (tmp_path / "a" / "model.tflite").is_file()
    real = verify.artifact_outputs
    monkeypatch.setattr(verify, "artifact_outputs", lambda fmt, path, x, **kw: real(fmt, path, x, **kw) + 0.5)
    result, out, err = _run("export", saved_model / "model.keras", "-o", tmp_path / "b", "--format", "tflite", "--quiet")
    assert result.exit_code == 1 and out == "" and "max_abs_diff" in err


def test_export_parity_failure_exits_1_with_numbers(saved_model, tmp_path, monkeypatch):
    from compressor.export import verify

    real = verify.artifact_outputs
    monkeypatch.setattr(verify, "artifact_outputs", lambda fmt, path, x, **kw: real(fmt, path, x, **kw) + 0.5)
    result, _, err = _run("export", saved_model / "model.keras", "-o", tmp_path, "--format", "onnx", "--json")
    assert result.exit_code == 1
    assert "max_abs_diff=0.5" in err and "atol 0.0001" in err
    assert (tmp_path / "model.onnx").exists()  # kept for inspection


def _assert_one_line_error(result, err, fragment):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert fragment in " ".join(err.split()), err


def test_export_missing_model(tmp_path):
    result, _, err = _run("export", tmp_path / "nope.keras", "-o", tmp_path / "out")
    _assert_one_line_error(result, err, "model not found")


def test_export_corrupt_model(tmp_path):
    (tmp_path / "broken.keras").write_bytes(b"\x00" * 100)
    result, _, err = _run("export", tmp_path / "broken.keras", "-o", tmp_path / "out")
    _assert_one_line_error(result, err, "not a valid .keras file")


def test_export_wrong_data_shape(saved_model, tmp_path):
    import numpy as np

    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 28, 28), np.float32), y=np.zeros(4, int))
    result, _, err = _run("export", saved_model / "model.keras", "-o", tmp_path / "out", "--data", tmp_path / "bad.npz")
    _assert_one_line_error(result, err, "shape (28, 28), but the model expects (16, 16, 3)")


def test_export_unwritable_output_folder(saved_model, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    result, _, err = _run("export", saved_model / "model.keras", "-o", tmp_path / "file" / "out")
    _assert_one_line_error(result, err, "cannot create output folder")


def test_export_refuses_to_overwrite_its_input(tmp_path):
    build_sequential().save(tmp_path / "model.keras")
    before = (tmp_path / "model.keras").read_bytes()
    result, _, err = _run("export", tmp_path / "model.keras", "-o", tmp_path, "--format", "keras")
    _assert_one_line_error(result, err, "would overwrite the input model")
    assert (tmp_path / "model.keras").read_bytes() == before


def test_export_unknown_format(saved_model, tmp_path):
    result, _, err = _run("export", saved_model / "model.keras", "-o", tmp_path, "--format", "tflite,coreml")
    _assert_one_line_error(result, err, "invalid export format coreml")


def test_a_runtime_only_install_is_told_how_to_get_tensorflow(tmp_path):
    """Where TensorFlow is missing, `compress` ends with one line naming the extra to install."""
    build_sequential().save(tmp_path / "m.keras")  # an intact model: a missing one is reported first
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from compressor.cli.app import main\n"
        f"sys.argv = ['compressor', 'compress', {str(tmp_path / 'm.keras')!r}, '--method', 'fixed_params', "
        f"'--compression-factor', '0.5', '--out', {str(tmp_path / 'o')!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "pip install 'compressor[full]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["compress", "inspect", "export", "example", "bench"])
def test_ctrl_c_exits_130_in_every_command(command, tmp_path, monkeypatch):
    """Ctrl-C while TensorFlow loads (or, in bench, while timing) ends in exit 130 and one line."""
    import importlib

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    model = tmp_path / "model.keras"
    build_sequential().save(model)
    if command == "bench":
        import compressor.bench.benchmark as benchmark

        monkeypatch.setattr(benchmark, "benchmark", interrupt)
        (tmp_path / "a.tflite").write_bytes(b"x")
        args = ["bench", tmp_path / "a.tflite"]
    else:
        monkeypatch.setattr(importlib.import_module(f"compressor.cli.{command}"), "load_tensorflow", interrupt)
        args = {
            "compress": ["compress", model, "--method", "fixed_params", "--compression-factor", "0.5", "--out", tmp_path / "o"],
            "inspect": ["inspect", model],
            "export": ["export", model, "--out", tmp_path / "o"],
            "example": ["example", "digits-resnet20", "--out", tmp_path / "o"],
        }[command]
    result, stdout, stderr = _run(*args)
    assert result.exit_code == 130, result.output
    assert "interrupted" in stderr and "Traceback" not in result.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_ctrl_c_in_the_board_side_benchmark_exits_130(monkeypatch, capsys):
    import compressor.bench.__main__ as board
    import compressor.bench.benchmark as benchmark

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "benchmark", interrupt)
    assert board.main(["model.tflite"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


# --- bad inputs end before TensorFlow loads --------------------------------------------------


def _run_without_tensorflow(*args):
    """Run the app in a fresh process; return (exit code, stderr, heavy modules it imported)."""
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from compressor.cli.app import app\n"
        f"result = CliRunner().invoke(app, {[str(a) for a in args]!r})\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]\n"
        "print(json.dumps({'code': result.exit_code, 'stderr': result.stderr, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    return result["code"], result["stderr"], result["heavy"]


FAST_COMPRESS = ["--method", "fixed_params", "--compression-factor", "0.5"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "MISSING", *FAST_COMPRESS, "--out", "OUT"], "model not found"),
        (["export", "MISSING", "--out", "OUT"], "model not found"),
        (["inspect", "MISSING"], "model not found"),
        (["inspect", "CORRUPT"], "is corrupt: its config.json is not valid JSON"),
        (["export", "MODEL", "--out", "OUT", "--data", "ABSENT"], "data file not found"),
        (["compress", "MODEL", *FAST_COMPRESS, "--out", "OUT", "--data", "ABSENT"], "data file not found"),
        (["compress", "MODEL", *FAST_COMPRESS, "--out", "OUT", "--test-data", "no/such/place"], "given as --test-data"),
        (["compress", "MODEL", *FAST_COMPRESS, "--out", "OUT", "--train-data", "ABSENT"], "given as --train-data"),
        (["compress", "MODEL", "--plan", "ABSENT", "--out", "OUT"], "plan not found"),
        (["compress", "MODEL", "--config", "ABSENT", "--out", "OUT"], "config file not found"),
        (["compress", "MODEL", "--config", "CODE", "--out", "OUT"], "custom-objects imports Python modules"),
    ],
)
def test_bad_inputs_end_before_tensorflow_loads(tmp_path, args, message):
    """A missing or damaged input is one line and exit 1, and TensorFlow is never imported."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "corrupt.keras", "w") as archive:
        archive.writestr("config.json", "{broken")
    (tmp_path / "code.toml").write_text('custom-objects = ["evil.layers"]\n')
    replace = {
        "MISSING": tmp_path / "absent.keras", "CORRUPT": tmp_path / "corrupt.keras", "ABSENT": tmp_path / "absent.npz",
        "OUT": tmp_path / "out", "CODE": tmp_path / "code.toml", "MODEL": tmp_path / "model.keras",
    }
    if "MODEL" in args:  # the model must pass its checks for the later input to be the one refused
        build_sequential().save(tmp_path / "model.keras")
    code, err, heavy = _run_without_tensorflow(*[replace.get(a, a) for a in args])
    assert code == 1 and err.startswith("error:") and "Traceback" not in err, err
    assert message in " ".join(err.split())
    assert heavy == []
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_finite_data_naming_the_file(saved_model, tmp_path):
    import numpy as np

    x = np.zeros((4, 16, 16, 3), np.float32)
    x[2, 5, 6, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(4, int))
    result, _, err = _run("export", saved_model / "model.keras", "-o", tmp_path / "out", "--data", tmp_path / "nan.npz")
    _assert_one_line_error(result, err, "nan.npz: x holds nan at sample 2 (index (2, 5, 6, 1)); data must be finite")


def test_bench_refuses_non_finite_data(saved_model, tmp_path):
    import numpy as np

    result, _, _ = _run("export", saved_model / "model.keras", "-o", tmp_path, "--format", "tflite", "--quiet")
    assert result.exit_code == 0, result.output
    x = np.ones((4, 16, 16, 3), np.float32)
    x[3, 0, 0, 0] = -np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    result, _, err = _run("bench", tmp_path / "model.tflite", "--data", tmp_path / "inf.npz", "--runs", "1")
    _assert_one_line_error(result, err, "x holds -inf at sample 3 (index (3, 0, 0, 0))")
    result, _, err = _run("bench", tmp_path / "model.tflite", "--data", tmp_path / "no/such/place", "--runs", "1")
    _assert_one_line_error(result, err, "data not found")


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_model_code_runs_only_with_allow_model_code(tmp_path, command):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2.0)(inputs)))
    model.save(tmp_path / "lambda.keras")
    extra = ["-o", tmp_path / "out", "--format", "tflite,keras", "--quiet"] if command == "export" else ["--json"]
    result, _, err = _run(command, tmp_path / "lambda.keras", *extra)
    _assert_one_line_error(result, err, "stores Python code that would run on loading")
    assert "--allow-model-code" in err
    result, _, _ = _run(command, tmp_path / "lambda.keras", *extra, "--allow-model-code")
    assert result.exit_code == 0, result.output
