"""Benchmark artifacts on another machine, such as a target board, through a command prefix.

    report = bench_remote(["model.tflite", "small.tflite"], "ssh pi@board", data="val.npz")
    report["host"]        # {"machine": "aarch64", "name": "raspberrypi"}

Everything travels in ONE call of `PREFIX sh -s` (`ssh user@board`, `docker exec -i ctr`,
`env -C /some/dir`, ...): a shell script on stdin that makes a temporary folder, unpacks
a base64 tar.gz holding the artifacts, the data and the few package files the benchmark
needs, runs `python -m compressor.bench` there and removes the folder again, also when
something fails. The board needs only sh, mktemp, base64, tar and a Python 3.10+ with
numpy, ai-edge-litert and onnxruntime; nothing of this package has to be installed
there. The report comes back between marker lines, so login banners and runtime notices
on stdout cannot break it.

No TensorFlow here, and no runtime either: this side only packs files and reads JSON.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import shlex
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from compressor.bench.benchmark import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    DEFAULT_WARMUP,
    check_options,
)
from compressor.bench.runtime import FORMATS
from compressor.errors import CompressorError, DataError, OptionError
from compressor.io.data import Dataset, dataset_arrays, load_data
from compressor.metrics import BUILTIN, Metric, resolve_metric

# What `python -m compressor.bench` imports, relative to the package folder: the only
# files of this package that go to the board. A file missing here fails the remote
# import, and tests/test_remote_bench.py runs exactly this set.
PACKAGE_FILES = (
    "__init__.py",
    "errors.py",
    "quiet.py",
    "bench/__init__.py",
    "bench/__main__.py",
    "bench/runtime.py",
    "bench/latency.py",
    "bench/memory.py",
    "bench/benchmark.py",
    "bench/scoring.py",
    "io/__init__.py",
    "io/data.py",
    "metrics.py",
)

DEFAULT_PYTHON = "python3"
DATA_NAME = "data.npz"

_SCRIPT = """\
m=__MARKER__
d=$(mktemp -d "${TMPDIR:-/tmp}/compressor-bench.XXXXXX") || exit 1
pid= beat=
trap 'kill $pid $beat 2>/dev/null; rm -rf "$d"' EXIT
trap 'exit 143' HUP INT TERM PIPE
if ! command -v __PYTHON0__ >/dev/null 2>&1; then
  printf 'error: %s not found on the remote machine\\n' __PYTHON0__ >&2
  exit 127
fi
base64 -d <<'__EOF__' | tar -xzf - -C "$d" || exit 1
__PAYLOAD__
__EOF__
cd "$d" || exit 1
# TMPDIR too: what the runtimes leave there (onnxruntime writes a session file) goes with "$d".
TMPDIR="$d" PYTHONPATH="$d${PYTHONPATH:+:$PYTHONPATH}" __PYTHON__ -m compressor.bench __ARGS__ </dev/null >"$d/report.json" &
pid=$!
# An empty line each second: once the caller is gone (ssh closed after a timeout), the
# write fails and the benchmark stops, instead of running on without anyone waiting. The
# loop also ends by itself once the benchmark has: a TERM sent while the subshell is still
# being set up can be lost, and a loop left running would hold the output open for ever.
( trap '' PIPE; while kill -0 "$pid" 2>/dev/null && sleep 1 </dev/null >/dev/null 2>&1; do printf '\\n' 2>/dev/null || kill -TERM $$; done ) &
beat=$!
wait "$pid"
rc=$?
kill "$beat" 2>/dev/null
wait "$beat" 2>/dev/null
pid= beat=
[ "$rc" -eq 0 ] || exit "$rc"
printf '%s host %s %s\\n' "$m" "$(uname -m)" "$(uname -n)"
printf '%s begin\\n' "$m"
cat "$d/report.json"
printf '\\n%s end\\n' "$m"
"""


def bench_remote(
    paths: Sequence[str | Path],
    prefix: str,
    data: str | Path | Dataset | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = DEFAULT_THREADS,
    seed: int = 0,
    python: str = DEFAULT_PYTHON,
    timeout: Optional[float] = None,
    xnnpack: bool = True,
    onnx_provider: Optional[str] = None,
    metric: Optional[str] = None,
    metric_output: Optional[str] = None,
) -> dict[str, Any]:
    """Time artifacts on the machine a command prefix reaches, like `benchmark` does here.

    Args:
        paths: Local .tflite and .onnx files of the same model; the first is the reference.
        prefix: The command that runs a program over there, e.g. "ssh pi@board" or
            "docker exec -i ctr"; `sh -s` is appended and the script goes to its stdin.
        data: An .npz file or a hook (loaded here), or a loaded Dataset; it is sent
            along as an .npz. Without data the remote side times a generated input.
        runs: Timed calls per artifact (>= 1).
        warmup: Untimed calls per artifact first (>= 0).
        threads: Threads per runtime (>= 0; 0 lets the runtime choose).
        seed: Seed of the generated input.
        python: The remote Python command (a name, a path, or a command with options).
        timeout: Seconds to wait for the whole remote run; None waits for ever.
        xnnpack: Let LiteRT apply its default XNNPACK delegate to TFLite artifacts.
        onnx_provider: onnxruntime's execution provider there (checked there; default
            CPUExecutionProvider).
        metric: A built-in metric to measure on `data` there (`compressor.metrics.BUILTIN`;
            a hook's module is not on the board); None: top-1 on labelled data.
        metric_output: The output the metric reads, by name.

    Returns:
        The dict of `BenchReport.to_dict()` as measured remotely, with the paths
        (and the data source) given here, plus "host": {"machine", "name"} from `uname`.

    Raises:
        CompressorError: Bad options or artifacts; the remote command failed, lacked
            Python or a runtime, printed no report, or ran past `timeout`.
        DataError: The data cannot be read here.
    """
    check_options(paths, runs, warmup, threads, xnnpack, onnx_provider)
    command = _split("{remote} command", prefix, "e.g. 'ssh user@board'")
    launcher = _split("remote python", python, "e.g. 'python3'")
    _check_timeout(timeout)
    artifacts = [_local_artifact(path) for path in paths]
    dataset = _dataset(data, numeric=metric is not None and _builtin(metric).labels != "classes")
    options = ["--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads), "--seed", str(seed),
               "--xnnpack" if xnnpack else "--no-xnnpack"]
    if onnx_provider is not None:
        options += ["--onnx-provider", onnx_provider]
    for flag, value in (("--metric", metric), ("--metric-output", metric_output)):
        options += [] if value is None else [flag, value]
    files, args, local = _bundle(paths, artifacts, dataset, options)
    marker = f"@@compressor-bench-{secrets.token_hex(8)}@@"
    script = remote_script(_payload(files), launcher, args, marker)
    returncode, stdout, stderr = _run([*command, "sh", "-s"], script, timeout, prefix)
    if returncode != 0:
        raise _failure(prefix, returncode, stderr, local)
    report, host = _parse(stdout, marker, prefix)
    return _localized(report, paths, dataset, host, prefix)


def package_files() -> dict[str, bytes]:
    """The package files `python -m compressor.bench` needs, keyed by their import path.

    Raises:
        CompressorError: The installed package lacks one of them.
    """
    import compressor

    root = Path(compressor.__file__).parent
    files = {}
    for name in PACKAGE_FILES:
        try:
            files[f"compressor/{name}"] = (root / name).read_bytes()
        except OSError as exc:
            raise CompressorError(
                f"the installed compressor package lacks {name} ({exc.strerror or exc}); reinstall it"
            ) from exc
    return files


def remote_script(payload: str, python: Sequence[str], args: Sequence[str], marker: str) -> str:
    """The shell script that unpacks, runs and cleans up on the remote side.

    Args:
        payload: The base64 text of the tar.gz (lines of at most 76 characters).
        python: The remote Python command, already split into words.
        args: Arguments of `python -m compressor.bench`, relative to the unpacked folder.
        marker: A token unique to this run; it brackets the report on stdout.

    Returns:
        The script, for `sh -s`.
    """
    quoted = " ".join(_shell_word(word) for word in python)
    return (
        _SCRIPT.replace("__MARKER__", shlex.quote(marker))
        .replace("__PYTHON0__", _shell_word(python[0]))
        .replace("__PYTHON__", quoted)
        .replace("__ARGS__", " ".join(shlex.quote(arg) for arg in args))
        .replace("__PAYLOAD__", payload.rstrip("\n"))
    )


def _shell_word(word: str) -> str:
    """Quote a word for the remote shell, keeping a leading ~/ as the remote home."""
    if word.startswith("~/"):
        return '"$HOME"/' + shlex.quote(word[2:])
    return shlex.quote(word)


def _split(what: str, text: str, example: str) -> list[str]:
    """The words of a command; `what` names it in messages (an option as `{placeholder}`)."""
    try:
        words = shlex.split(text) if isinstance(text, str) else []
    except ValueError as exc:
        raise CompressorError.naming("cannot parse the %s {text!r}: {exc}" % what, text=text, exc=exc) from exc
    if not words:
        raise CompressorError.naming("expected a %s ({example}). Received: {text!r}" % what, example=example, text=text)
    return words


def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise CompressorError(f"timeout must be a number of seconds > 0. Received: timeout={timeout!r}")


def _local_artifact(path: str | Path) -> Path:
    # The same checks (and messages) as a local run, before anything is sent.
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"artifact not found: {path}")
    if path.suffix.lower() not in FORMATS:
        raise CompressorError(
            f"cannot run {path.name}: expected a .tflite or .onnx file, got '{path.suffix}'"
        )
    return path


def _builtin(name: str) -> Metric:
    """A built-in metric by name: a hook would need the user's module on the board."""
    if not isinstance(name, str) or name.strip().lower() not in BUILTIN:
        raise OptionError("a remote bench measures {known}; metric {name} is a function of a module the board "
                          "does not have (measure it without {remote})", known=", ".join(BUILTIN), name=name)
    return resolve_metric(name)


def _dataset(data: str | Path | Dataset | None, numeric: bool = False) -> Optional[Dataset]:
    if data is None or isinstance(data, Dataset):
        return data
    if Path(data).is_dir():
        # Resizing images needs the artifact's input shape, which only the runtimes know.
        raise DataError.naming(
            "a remote bench takes {data} as an .npz file or a hook, not an image folder ({folder}); "
            "save the images as x (and labels as y) in an .npz", folder=data,
        )
    return load_data(data, numeric=numeric)


def _bundle(
    paths: Sequence[str | Path], artifacts: list[Path], dataset: Optional[Dataset], options: list[str]
) -> tuple[dict[str, bytes], list[str], dict[str, str]]:
    """The files to send, the arguments naming them, and each name's local counterpart."""
    # One folder per artifact: two files of the same name from different folders stay apart.
    names = [f"artifacts/{i}/{path.name}" for i, path in enumerate(artifacts)]
    files = {name: path.read_bytes() for name, path in zip(names, artifacts)}
    local = {name: str(path) for name, path in zip(names, paths)}
    args = [*names, *options]
    if dataset is not None:
        files[DATA_NAME] = _npz_bytes(dataset)
        local[DATA_NAME] = dataset.source
        args += ["--data", DATA_NAME]
    files.update(package_files())
    return files, args, local


def _npz_bytes(dataset: Dataset) -> bytes:
    arrays = dataset_arrays(dataset)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _payload(files: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(content))
    return base64.encodebytes(buffer.getvalue()).decode("ascii")


def _run(command: list[str], script: str, timeout: Optional[float], prefix: str) -> tuple[int, str, str]:
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise CompressorError(
            f"cannot run the remote command {prefix!r}: {command[0]}: {exc.strerror or exc}"
        ) from exc
    try:
        stdout, stderr = process.communicate(script.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise CompressorError.naming(
            "the bench through {prefix!r} did not finish within {timeout:g} s; "
            "allow more time ({remote_timeout}) or time fewer runs ({runs})", prefix=prefix, timeout=timeout,
        ) from None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def _stop(process: subprocess.Popen) -> None:
    # SIGTERM first: a local shell's trap stops the benchmark and removes its folder. A
    # remote one learns from the closed pipes (its next write fails) and does the same.
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def _failure(prefix: str, returncode: int, stderr: str, local: dict[str, str]) -> CompressorError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    cause = lines[-1] if lines else f"exit status {returncode} and no error message"
    cause = _local_names(cause.removeprefix("error: "), local)
    hint = _hint(prefix, returncode, cause)
    return CompressorError.naming("bench through {prefix!r} failed: {cause}" + (f" ({hint})" if hint else ""),
                                  prefix=prefix, cause=cause)


def _hint(prefix: str, returncode: int, cause: str) -> Optional[str]:
    """What to do about a failed remote run, as a message template (options as `{placeholders}`); None: nothing to add."""
    if "SyntaxError" in cause or "not subscriptable" in cause:
        return "the remote Python is too old: 3.10 or newer is needed"
    if "not installed for" in cause or "No module named" in cause:
        return None if "pip install" in cause else "install numpy, ai-edge-litert and onnxruntime there"
    if returncode == 127:
        return "install Python 3 with numpy, ai-edge-litert and onnxruntime there, or name it with {remote_python}"
    if returncode == 255 and Path(shlex.split(prefix)[0]).name == "ssh":
        return "check that '{prefix} true' connects without a prompt, e.g. with -o BatchMode=yes"
    return None


def _local_names(text: str, local: dict[str, str]) -> str:
    """Replace the names used over there by the paths the user gave."""
    pattern = "|".join(re.escape(name) for name in sorted(local, key=len, reverse=True))
    return re.sub(pattern, lambda match: local[match.group(0)], text)


def _parse(stdout: str, marker: str, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    begin, end = f"{marker} begin\n", f"\n{marker} end"
    start, stop = stdout.find(begin), stdout.rfind(end)
    if start < 0 or stop < start:
        tail = [line for line in stdout.splitlines() if line.strip()][-1:] or ["nothing"]
        raise CompressorError(
            f"the bench through {prefix!r} printed no report (its last output: {tail[0][:200]!r})"
        )
    host = {"machine": "unknown", "name": "unknown"}
    for line in stdout[:start].splitlines():
        words = line.split()
        if words[:2] == [marker, "host"] and len(words) >= 4:
            host = {"machine": words[2], "name": words[3]}
    try:
        report = json.loads(stdout[start + len(begin) : stop])
    except ValueError as exc:
        raise CompressorError(f"the bench through {prefix!r} returned a broken report: {exc}") from exc
    return report, host


def _localized(
    report: Any, paths: Sequence[str | Path], dataset: Optional[Dataset], host: dict[str, str], prefix: str
) -> dict[str, Any]:
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or len(results) != len(paths):
        raise CompressorError(
            f"the bench through {prefix!r} returned a report without one result per artifact"
        )
    for result, path in zip(results, paths):
        result["path"] = str(path)
    if dataset is not None:
        report["input"] = dataset.source
    report["host"] = host
    return report
