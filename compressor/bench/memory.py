"""Peak memory of running one artifact, measured in a fresh process.

A runtime keeps what it allocates (LiteRT's tensor arena and XNNPACK's packed weights,
onnxruntime's memory pools) for the life of the process, and a process's peak resident
memory only ever grows: measured in the benchmark's own process, the first artifact
would hide the next one. So each artifact gets a fresh Python that imports its runtime,
reads its peak resident memory as the baseline, loads the artifact, runs it a few times,
and reports how far the peak rose above the baseline: what loading and running the
model cost, without the interpreter and the runtime's libraries.

The peak is Linux's VmHWM (/proc/self/status), reset to the current resident memory
just before loading (/proc/self/clear_refs), so what the imports held for a moment does
not count. `getrusage(RUSAGE_SELF).ru_maxrss` is the fallback elsewhere, but on Linux it
cannot serve: it keeps the peak of the process the child was forked from (the whole
benchmark) across exec, and would hide the artifact under it.

    peak_memory_bytes("model.tflite", batch, threads=1)      # 5373952

    python -m compressor.bench.memory model.tflite --input batch.npy
    {"peak_memory_bytes": 5373952}

Numpy and the runtimes only, like the rest of the benchmark: this runs on target boards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import numpy as np

from compressor.errors import CompressorError, first_line, flag_name

CALLS = 3
"""Inferences the measuring process runs: the first one allocates what a runtime defers."""

TIMEOUT_S = 600.0


def peak_memory_bytes(
    path: str | Path,
    batch: np.ndarray | dict,
    threads: int = 1,
    xnnpack: bool = True,
    onnx_provider: Optional[str] = None,
    calls: int = CALLS,
) -> int:
    """How far a fresh process's peak resident memory rises to load and run an artifact.

    Args:
        path: A .tflite or .onnx file.
        batch: One input batch, as the artifact's runner takes it (`ArtifactRunner.prepare`):
            an array, or a dict input name -> array for several inputs.
        threads, xnnpack, onnx_provider: As in `open_artifact`.
        calls: Inferences to run on `batch`.

    Returns:
        Bytes: the process's peak resident memory after the runs, less its resident
        memory after importing the runtime (see the module's doc).

    Raises:
        CompressorError: The measuring process failed (its error line is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="compressor-memory-") as folder:
        if isinstance(batch, dict):  # several inputs: an .npz, one array per input name
            sample = Path(folder) / "input.npz"
            np.savez(sample, **batch)
        else:
            sample = Path(folder) / "input.npy"
            np.save(sample, batch)
        # The same Python, started the same way (-S: without site packages, as a board may run it).
        command = [sys.executable, *(["-S"] if sys.flags.no_site else []), "-m", "compressor.bench.memory",
                   str(path), "--input", str(sample), "--threads", str(threads), "--calls", str(calls)]
        if not xnnpack:
            command.append("--no-xnnpack")
        if onnx_provider is not None:
            command += ["--onnx-provider", onnx_provider]
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompressorError(f"cannot measure the peak memory of {Path(path).name}: {first_line(exc)}") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        cause = lines[-1].removeprefix("error: ") if lines else f"exit status {done.returncode}"
        raise CompressorError(f"cannot measure the peak memory of {Path(path).name}: {cause}")
    try:
        return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_bytes"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CompressorError(
            f"cannot measure the peak memory of {Path(path).name}: unexpected output {done.stdout[:200]!r}"
        ) from exc


def _environment() -> dict[str, str]:
    """The child imports this very package, wherever it was loaded from (a checkout, a remote folder)."""
    root = str(Path(__file__).resolve().parents[2])
    environment = dict(os.environ)
    previous = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = root + (os.pathsep + previous if previous else "")
    return environment


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM where /proc has it, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  13640 kB"
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def reset_peak() -> None:
    """Let VmHWM start again from the current resident memory (Linux 4.0+; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def measure(path: str, batch: np.ndarray | dict, threads: int, xnnpack: bool, onnx_provider: Optional[str],
            calls: int) -> int:
    """In this (fresh) process: import the runtime, note the peak, load and run the artifact, return the rise."""
    from compressor.bench.runtime import FORMATS, open_artifact

    if FORMATS.get(Path(path).suffix.lower()) == "tflite":
        import ai_edge_litert.interpreter  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    reset_peak()
    baseline = peak_rss_bytes()
    runner = open_artifact(path, threads, xnnpack=xnnpack, onnx_provider=onnx_provider)
    for _ in range(calls):
        runner.invoke(batch)
    return max(0, peak_rss_bytes() - baseline)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure one artifact; print {"peak_memory_bytes": N} on stdout, or one error line on stderr (exit 1)."""
    parser = _Parser(prog="python -m compressor.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--input", required=True, help="an .npy file: one batch, as the artifact takes it "
                        "(an .npz with one array per input name for several inputs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--xnnpack", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--onnx-provider")
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args(argv)
    try:
        if args.input.endswith(".npz"):
            with np.load(args.input) as archive:
                batch = {name: archive[name] for name in archive.files}
        else:
            batch = np.load(args.input)
        peak = measure(args.artifact, batch, args.threads, args.xnnpack, args.onnx_provider, args.calls)
    except CompressorError as exc:
        sys.stderr.write(f"error: {exc.render(flag_name)}\n")
        return 1
    except Exception as exc:  # a runtime's own error: one line, as everywhere else
        sys.stderr.write(f"error: {type(exc).__name__}: {first_line(exc)}\n")
        return 1
    sys.stdout.write(json.dumps({"peak_memory_bytes": peak}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
