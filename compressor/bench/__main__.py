"""`python -m compressor.bench ARTIFACT...`: time artifacts and print the report as JSON.

The same measurement as `compressor bench --json`, for machines that have nothing but
numpy and the runtimes (ai-edge-litert, onnxruntime): no typer, no rich, no
TensorFlow. `compressor bench --remote` ships this module to a target board and runs it
there. Stdout carries exactly one JSON document; an error is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn, Optional, Sequence

from compressor.errors import CompressorError, flag_name
from compressor.quiet import stdout_to_stderr

# The import name of each package the benchmark needs, and what pip calls it.
PIP_NAMES = {"numpy": "numpy", "ai_edge_litert": "ai-edge-litert", "onnxruntime": "onnxruntime"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the usage and exit 2; here every error is one line and exit 1.
        sys.stderr.write(f"error: {message} (see python -m compressor.bench --help)\n")
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m compressor.bench`."""
    parser = _Parser(
        prog="python -m compressor.bench",
        description="Time .tflite and .onnx artifacts at batch 1 (interleaved) and print "
        "the report as one JSON document on stdout.",
    )
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help=".tflite or .onnx files")
    parser.add_argument("--data", help="an .npz with arrays x (and y for accuracy)")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per artifact")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per artifact first")
    parser.add_argument("--threads", type=int, default=1, help="threads per runtime (0: default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated input")
    parser.add_argument("--xnnpack", action=argparse.BooleanOptionalAction, default=True,
                        help="let LiteRT apply its default XNNPACK delegate to .tflite artifacts")
    parser.add_argument("--onnx-provider", help="onnxruntime execution provider (default CPUExecutionProvider)")
    # compressor.metrics.BUILTIN, spelled out: numpy is imported only once the run starts (a hook's module is
    # not on a board).
    parser.add_argument("--metric", choices=("top1", "top5", "mse", "mae", "agreement"),
                        help="measure top1 (the default), top5, mse, mae or agreement (with the first artifact) on --data")
    parser.add_argument("--metric-output", help="the output the metric reads, by name (several outputs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and print its JSON report.

    Args:
        argv: Command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 with the report on stdout, 1 with one error line on stderr,
        130 when interrupted (Ctrl-C).
    """
    args = build_parser().parse_args(argv)
    try:
        with stdout_to_stderr():
            report = _run(args)
    except KeyboardInterrupt:
        return _error("interrupted", code=130)
    except ImportError as exc:
        return _error(_missing_package(exc, sys.executable) or f"cannot import what the benchmark needs: {exc}")
    except CompressorError as exc:
        missing = _missing_package(exc.__cause__, sys.executable)
        message = exc.render(flag_name)
        return _error(f"{message} ({missing})" if missing else message)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    sys.stdout.flush()
    return 0


def _run(args: argparse.Namespace) -> dict:
    # Imported here so that a missing numpy ends in one line, not a traceback.
    from compressor.bench.benchmark import benchmark
    from compressor.metrics import resolve_metric

    report = benchmark(
        args.artifacts,
        data=args.data,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        xnnpack=args.xnnpack,
        onnx_provider=args.onnx_provider,
        metric=None if args.metric is None else resolve_metric(args.metric),
        metric_output=args.metric_output,
    )
    return report.to_dict()


def _missing_package(exc: Optional[BaseException], python: str) -> Optional[str]:
    """A hint naming the pip package to install, when `exc` is a missing import."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    pip_name = PIP_NAMES.get(exc.name.split(".")[0])
    if pip_name is None:
        return None
    return (
        f"{pip_name} is not installed for {python}; install the runtimes with: "
        "pip install numpy ai-edge-litert onnxruntime"
    )


def _error(message: str, code: int = 1) -> int:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
