"""Tests for benchmarking through a command prefix (`bench_remote`, `compressor bench --remote`)
and for `python -m compressor.bench`, the entry point that runs on the board.

The "remote machine" is this one, reached through local prefixes (`env -C DIR ...`,
`sh -c '...'`), with TMPDIR pointed at a folder the test inspects: whatever the
remote side leaves behind would show up there.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from typer.testing import CliRunner  # noqa: E402

from compressor.bench.benchmark import benchmark  # noqa: E402
from compressor.bench.remote import PACKAGE_FILES, bench_remote, package_files  # noqa: E402
from compressor.cli.app import app  # noqa: E402
from compressor.errors import CompressorError, DataError  # noqa: E402
from conftest import raises_as_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 3)
CLASSES = 4
SAMPLES = 24
FAST = {"runs": 3, "warmup": 1}
# The venv's packages, passed to a Python started with -S: without site processing the
# editable install's import hook is off, so the remote side can import only the package
# files that were shipped, exactly as on a board where compressor is not installed.
SITE = sysconfig.get_paths()["purelib"]
ISOLATED_PYTHON = f"{shlex.quote(sys.executable)} -S"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """A tiny conv net as .tflite and .onnx, a smaller one as .tflite, and labelled data."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    folder = tmp_path_factory.mktemp("remote_arts")
    keras.utils.set_random_seed(0)

    def net(filters):
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(filters, 3, activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))

    big, small = net(8), net(4)
    paths = {"big.tflite": big, "small.tflite": small}
    for name, model in paths.items():
        (folder / name).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    spec = [tf.TensorSpec((None, *SHAPE), tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(big, input_signature=spec, opset=17)
    onnx.save(proto, str(folder / "big.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, *SHAPE)).astype(np.float32)
    np.savez(folder / "val.npz", x=x, y=rng.integers(0, CLASSES, SAMPLES))
    return folder


@pytest.fixture
def board(tmp_path):
    """A working folder and a TMPDIR for the remote side, and the prefix that uses them."""
    work, tmp = tmp_path / "board", tmp_path / "board_tmp"
    work.mkdir()
    tmp.mkdir()
    prefix = f"env -C {shlex.quote(str(work))} PYTHONPATH={shlex.quote(SITE)} TMPDIR={shlex.quote(str(tmp))}"
    return {"work": work, "tmp": tmp, "prefix": prefix}


def _left_behind(board) -> list[str]:
    return sorted(p.name for folder in (board["work"], board["tmp"]) for p in folder.iterdir())


def _paths(arts, *names):
    return [arts / name for name in names]


# --- the remote run -----------------------------------------------------------------


def test_remote_report_matches_a_local_run(arts, board):
    paths = _paths(arts, "big.tflite", "small.tflite", "big.onnx")
    local = benchmark(paths, data=arts / "val.npz", **FAST).to_dict()

    remote = bench_remote(paths, board["prefix"], data=arts / "val.npz", python=ISOLATED_PYTHON, **FAST)

    assert set(remote) == set(local) | {"host"}
    assert len(remote["results"]) == len(local["results"]) == 3
    for path, mine, theirs in zip(paths, local["results"], remote["results"]):
        assert set(theirs) == set(mine)
        # Same samples, same deterministic runtimes: the accuracy is identical.
        assert theirs["accuracy"] == mine["accuracy"]
        assert theirs["path"] == mine["path"] == str(path)
        assert theirs["bytes"] == mine["bytes"] and theirs["format"] == mine["format"]
        lat = theirs["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
    assert remote["input"] == local["input"] == str(arts / "val.npz")
    assert remote["samples"] == SAMPLES and remote["runs"] == FAST["runs"]
    assert remote["host"] == {"machine": platform.machine(), "name": platform.uname().node}
    assert _left_behind(board) == []  # the temp folder and the runtimes' files are gone


def test_remote_without_data_times_a_generated_input(arts, board):
    report = bench_remote(_paths(arts, "small.tflite"), board["prefix"], python=ISOLATED_PYTHON, **FAST)
    assert report["input"] == "generated" and report["samples"] == 0
    assert report["results"][0]["accuracy"] is None
    assert _left_behind(board) == []


def test_quoted_prefix_and_a_login_banner(arts, board):
    # A prefix with shell quoting, which also prints a banner on stdout first (as some
    # login scripts do): the report is read between its markers all the same.
    inner = 'echo "Welcome to the board"; echo "last login: today" >&2; cd "$0" && exec "$@"'
    prefix = (
        f"env PYTHONPATH={shlex.quote(SITE)} TMPDIR={shlex.quote(str(board['tmp']))} "
        f"sh -c {shlex.quote(inner)} {shlex.quote(str(board['work']))}"
    )
    data = np.load(arts / "val.npz")
    from compressor.io.data import Dataset

    dataset = Dataset(data["x"], data["y"], "held-out set")

    report = bench_remote(_paths(arts, "big.onnx"), prefix, data=dataset, python=ISOLATED_PYTHON, **FAST)

    expected = benchmark(_paths(arts, "big.onnx"), data=dataset, **FAST).results[0].accuracy
    assert report["results"][0]["accuracy"] == expected
    assert report["input"] == "held-out set"
    assert _left_behind(board) == []


def test_remote_python_under_the_remote_home(arts, board, tmp_path):
    # "~/..." names the remote user's home: it must not be quoted into a literal "~".
    home = tmp_path / "home"
    (home / "venv").mkdir(parents=True)
    (home / "venv" / "python").symlink_to(sys.executable)
    prefix = f"env HOME={shlex.quote(str(home))} {board['prefix']}"

    report = bench_remote(_paths(arts, "small.tflite"), prefix, python="~/venv/python -S", **FAST)

    assert report["results"][0]["path"] == str(arts / "small.tflite")
    assert _left_behind(board) == []


def test_cli_remote_json(arts, board):
    a, b = _paths(arts, "big.tflite", "small.tflite")
    args = ["bench", str(a), str(b), "--data", str(arts / "val.npz"), "--runs", "3", "--warmup", "1"]
    args += ["--remote", board["prefix"], "--remote-python", ISOLATED_PYTHON, "--json"]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["path"] for r in payload["results"]] == [str(a), str(b)]
    assert payload["host"]["machine"] == platform.machine()
    assert _left_behind(board) == []


# --- failures -----------------------------------------------------------------------


def _fake_python(folder: Path, body: str) -> Path:
    path = folder / "fake_python"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_remote_python_without_numpy(arts, board):
    # -S without the venv's packages on PYTHONPATH: the remote Python has no numpy.
    prefix = f"env -C {shlex.quote(str(board['work']))} TMPDIR={shlex.quote(str(board['tmp']))}"
    with pytest.raises(CompressorError) as exc:
        bench_remote(_paths(arts, "big.tflite"), prefix, python=ISOLATED_PYTHON, **FAST)
    message = _one_line(exc)
    assert "numpy is not installed" in message and "pip install numpy ai-edge-litert onnxruntime" in message
    assert _left_behind(board) == []


def test_remote_runtime_missing_names_the_package_and_the_local_path(arts, board, tmp_path):
    # A package that shadows ai_edge_litert and fails to import, as on a board without it.
    fake = tmp_path / "no_litert" / "ai_edge_litert"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ai_edge_litert'\", name='ai_edge_litert')\n"
    )
    pythonpath = os.pathsep.join([str(fake.parent), SITE])
    prefix = board["prefix"].replace(shlex.quote(SITE), shlex.quote(pythonpath))
    tflite = arts / "big.tflite"

    with pytest.raises(CompressorError) as exc:
        bench_remote([tflite], prefix, python=ISOLATED_PYTHON, **FAST)

    message = _one_line(exc)
    assert "ai-edge-litert" in message and "pip install" in message
    assert str(tflite) in message  # the remote's name for the file is replaced by the user's
    assert _left_behind(board) == []


def test_remote_python_that_fails(arts, board):
    fake = _fake_python(board["tmp"].parent, 'echo "starting" >&2\necho "boom: broken interpreter" >&2\nexit 1\n')
    with pytest.raises(CompressorError, match="failed: boom: broken interpreter$") as exc:
        bench_remote(_paths(arts, "big.tflite"), board["prefix"], python=str(fake), **FAST)
    _one_line(exc)
    assert _left_behind(board) == []


def test_the_remote_heartbeat_ends_with_the_benchmark_even_when_a_signal_is_lost(arts, board):
    """The script's heartbeat loop holds the output open; it used to end only when killed, and dash
    loses a TERM that reaches a subshell it is still setting up: then the run never finished (seen
    under load, with a benchmark that failed at once). Here a remote shell whose `kill` sends nothing
    (but `kill -0`) stands for every lost signal: the run must still end, with the benchmark's error."""
    lossy = board["tmp"].parent / "lossy_shell"
    lossy.write_text(
        "#!/bin/sh\n"
        "{ printf '%s\\n' 'kill() { case \"$1\" in -0) command kill \"$@\";; *) return 0;; esac; }'; cat; } | \"$@\"\n"
    )
    lossy.chmod(0o755)
    fake = _fake_python(board["tmp"].parent, 'echo "boom: broken interpreter" >&2\nexit 1\n')
    start = time.monotonic()
    with pytest.raises(CompressorError, match="failed: boom: broken interpreter$"):
        bench_remote(_paths(arts, "big.tflite"), f"{board['prefix']} {lossy}", python=str(fake), timeout=20, **FAST)
    assert time.monotonic() - start < 15


def test_remote_python_not_found_via_cli(arts, board):
    args = ["bench", str(arts / "big.tflite"), "--remote", board["prefix"], "--remote-python", "no-such-python3"]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 1
    error = " ".join(result.stderr.split())
    assert "no-such-python3 not found on the remote machine" in error and "--remote-python" in error
    assert "Traceback" not in result.output
    assert _left_behind(board) == []


def test_remote_timeout_stops_and_cleans_up(arts, board):
    fake = _fake_python(board["tmp"].parent, "exec sleep 60\n")
    start = time.monotonic()
    with pytest.raises(CompressorError, match="did not finish within 1 s"):
        bench_remote(_paths(arts, "big.tflite"), board["prefix"], python=str(fake), timeout=1, **FAST)
    # 1 s of timeout plus the remote shell's trap; 60 s would mean it waited for `sleep`.
    assert time.monotonic() - start < 20
    assert _left_behind(board) == []


def test_remote_side_stops_when_the_caller_goes_away(arts, board):
    # Like ssh after a timeout: the process here ends, but the shell over there is not
    # its child and gets no signal. Its heartbeat write then fails, and it cleans up.
    # (A background job's stdin is /dev/null unless it is passed on through another fd.)
    detached = f"{board['prefix']} sh -c 'exec 3<&0; sh -s <&3 3<&- & wait' detached"
    fake = _fake_python(board["tmp"].parent, "exec sleep 60\n")
    with pytest.raises(CompressorError, match="did not finish within 1 s"):
        bench_remote(_paths(arts, "big.tflite"), detached, python=str(fake), timeout=1, **FAST)
    deadline = time.monotonic() + 15  # one heartbeat (1 s) and the trap, with room for a busy machine
    while _left_behind(board) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _left_behind(board) == []


def test_remote_without_report_markers(arts, board):
    prefix = "sh -c 'cat >/dev/null; echo \"Permission granted, no shell\"' banner"
    with pytest.raises(CompressorError, match="printed no report .*Permission granted, no shell"):
        bench_remote(_paths(arts, "big.tflite"), prefix, **FAST)


@pytest.mark.parametrize(
    "prefix, kwargs, error, match",
    [
        ("", {}, CompressorError, "expected a --remote command"),
        ("ssh 'board", {}, CompressorError, "cannot parse the --remote command"),
        ("no-such-command-xyz host", {}, CompressorError, "cannot run the remote command"),
        ("env", {"python": ""}, CompressorError, "expected a remote python"),
        ("env", {"runs": 0}, CompressorError, "runs must be an integer >= 1"),
        ("env", {"timeout": -1}, CompressorError, "timeout must be a number of seconds > 0"),
        ("env", {"paths": ["missing.tflite"]}, CompressorError, "artifact not found"),
        ("env", {"paths": ["val.npz"]}, CompressorError, "expected a .tflite or .onnx file"),
        ("env", {"data": "."}, DataError, "not an image folder"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(arts, monkeypatch, prefix, kwargs, error, match):
    monkeypatch.chdir(arts)
    paths = kwargs.pop("paths", ["big.tflite"])
    with raises_as_cli(error, match):
        bench_remote(paths, prefix, **kwargs)


def test_package_files_are_the_declared_set():
    files = package_files()
    assert sorted(files) == sorted(f"compressor/{name}" for name in PACKAGE_FILES)
    assert b"def main" in files["compressor/bench/__main__.py"]


# --- python -m compressor.bench -------------------------------------------------------


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_module_prints_the_report_as_json(arts):
    done = _python("-m", "compressor.bench", "big.tflite", "big.onnx", "--data", "val.npz", "--runs", "3", cwd=arts)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert [r["path"] for r in payload["results"]] == ["big.tflite", "big.onnx"]
    assert payload["samples"] == SAMPLES


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope.tflite"], "error: artifact not found: nope.tflite"),
        (["big.tflite", "--runs", "x"], "error: argument --runs: invalid int value"),
        (["big.tflite", "--runs", "0"], "error: runs must be an integer >= 1"),
        ([], "error: the following arguments are required"),
    ],
)
def test_module_errors_are_one_line_and_exit_1(arts, args, message):
    done = _python("-m", "compressor.bench", *args, cwd=arts)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1


def test_bench_paths_import_no_tensorflow(arts, tmp_path):
    """The module, the CLI's help and its remote and gate paths run where TensorFlow is not."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(benchmark(_paths(arts, "small.tflite"), **FAST).to_dict()))
    work = tmp_path / "work"
    work.mkdir()
    remote = f"env -C {shlex.quote(str(work))} TMPDIR={shlex.quote(str(work))}"
    script = textwrap.dedent(
        f"""
        import io, json, runpy, sys
        from contextlib import redirect_stdout

        sys.argv = ["compressor.bench", "small.tflite", "--data", "val.npz", "--runs", "2"]
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                runpy.run_module("compressor.bench", run_name="__main__")
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert json.loads(out.getvalue())["results"]
        # The module needs no command-line toolkit either: it runs with numpy and the runtimes.
        bare = [m for m in ("tensorflow", "keras", "tf_keras", "typer", "rich") if m in sys.modules]
        assert not bare, bare

        from typer.testing import CliRunner
        from compressor.cli.app import app
        assert CliRunner().invoke(app, ["bench", "--help"]).exit_code == 0
        args = ["bench", "small.tflite", "--runs", "2", "--json", "--baseline", {str(baseline)!r},
                "--max-regression", "1000", "--remote", {remote!r},
                "--remote-python", sys.executable]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["gate"]["passed"]
        leaked = [m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules]
        assert not leaked, leaked
        print("clean")
        """
    )
    done = _python("-c", script, cwd=arts)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout
    assert not list(work.iterdir())
