"""`compressor bench`: time .tflite and .onnx artifacts side by side, and check accuracy.

Runs without TensorFlow (numpy, ai-edge-litert and onnxruntime only), so it works on
a target board.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from compressor.cli.console import (
    console,
    err_console,
    handle_errors,
    human_bytes,
    print_json,
    stdout_to_stderr,
)
from compressor.cli.options import DataOpt, JsonOpt

if TYPE_CHECKING:
    from compressor.bench.benchmark import BenchReport

ArtifactsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Artifacts (.tflite, .onnx) of the same model; the first is the reference "
        "the others' latency is compared with.",
        metavar="ARTIFACT...",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", help="Threads per runtime (0: the runtime's default).")
]
RunsOpt = Annotated[int, typer.Option("--runs", help="Timed calls per artifact.")]
WarmupOpt = Annotated[
    int, typer.Option("--warmup", help="Untimed calls per artifact before timing.")
]


@handle_errors
def bench_command(
    artifacts: ArtifactsArg,
    data: DataOpt = None,
    threads: ThreadsOpt = 1,
    runs: RunsOpt = 100,
    warmup: WarmupOpt = 10,
    json_output: JsonOpt = False,
) -> None:
    """Time artifacts at batch 1 (interleaved, so ratios are fair) and measure accuracy on --data."""
    from compressor.bench.benchmark import benchmark

    if json_output:
        with stdout_to_stderr():
            report = benchmark(artifacts, data=data, runs=runs, warmup=warmup, threads=threads)
        print_json(report.to_dict())
        return
    with err_console.status(f"Timing {len(artifacts)} artifact(s), {runs} runs each..."):
        report = benchmark(artifacts, data=data, runs=runs, warmup=warmup, threads=threads)
    console.print(_table(report))


def _table(report: BenchReport) -> Table:
    source = "generated input" if report.input == "generated" else f"inputs from {report.input}"
    batch = "batch 1" if all(r.batch == 1 for r in report.results) else "batch 1 unless noted"
    caption = (
        f"latency in ms at {batch}: {report.runs} interleaved runs after {report.warmup} "
        f"warm-up, threads {report.threads or 'default'}, {source}"
    )
    if report.samples:
        caption += f"; accuracy on {report.samples} samples"
    # Fits 80 columns (CI logs): two spaces between columns, long paths fold.
    table = Table(caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("artifact", overflow="fold", min_width=12)
    table.add_column("format", no_wrap=True)
    for name in ("size", "median", "p90", "min", "max", "× first", "top-1"):
        table.add_column(name, justify="right", no_wrap=True)
    for result in report.results:
        latency = result.latency_ms
        note = f" (batch {result.batch})" if result.batch != 1 else ""
        table.add_row(
            result.path + note,
            result.format,
            human_bytes(result.bytes),
            *(_ms(v) for v in (latency.median, latency.p90, latency.min, latency.max)),
            "-" if result.ratio_to_first is None else f"{result.ratio_to_first:.2f}×",
            "-" if result.accuracy is None else f"{result.accuracy:.1%}",
        )
    return table


def _ms(value: float) -> str:
    """About three significant digits: 152, 12.3, 1.23, 0.0812 (at most 4 decimals)."""
    if value <= 0:
        return "0"
    decimals = min(4, max(0, 2 - math.floor(math.log10(value))))
    return f"{value:.{decimals}f}"

