"""`compressor bench`: time .tflite and .onnx artifacts side by side, and check accuracy.

Runs without TensorFlow (numpy, ai-edge-litert and onnxruntime only), so it works on
a target board; with `--remote` it times them on a board reached by a command such as
`ssh user@board`, and with `--baseline` it fails (exit 3) when they got slower.

Exit codes (stable): 0 ok; 1 any error; 3 a median slower than the baseline allows.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich import box
from rich.markup import escape
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
    from compressor.bench.gate import GateResult

EXIT_REGRESSION = 3

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
XnnpackOpt = Annotated[
    bool,
    typer.Option(
        "--xnnpack/--no-xnnpack",
        help="Let LiteRT apply its default XNNPACK delegate to .tflite artifacts, or run its builtin kernels alone.",
    ),
]
OnnxProviderOpt = Annotated[
    Optional[str],
    typer.Option(
        "--onnx-provider",
        help="onnxruntime execution provider for .onnx artifacts (default CPUExecutionProvider); "
        "one of onnxruntime.get_available_providers() where they run.",
        show_default=False,
    ),
]
RunsOpt = Annotated[int, typer.Option("--runs", help="Timed calls per artifact.")]
WarmupOpt = Annotated[
    int, typer.Option("--warmup", help="Untimed calls per artifact before timing.")
]
RemoteOpt = Annotated[
    Optional[str],
    typer.Option(
        "--remote",
        help="Time on another machine: the command that reaches it, e.g. 'ssh user@board' or "
        "'docker exec -i ctr'. It needs sh and Python 3.10+ with numpy, ai-edge-litert and "
        "onnxruntime there; the artifacts travel with the call and are removed after.",
        show_default=False,
    ),
]
RemotePythonOpt = Annotated[
    Optional[str],
    typer.Option(
        "--remote-python",
        help="The Python to run on the remote machine (default python3), e.g. ~/venv/bin/python.",
        show_default=False,
    ),
]
RemoteTimeoutOpt = Annotated[
    Optional[float],
    typer.Option(
        "--remote-timeout",
        help="Seconds to wait for the remote run before giving up (default: no limit).",
        show_default=False,
    ),
]
BaselineOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--baseline",
        help="A JSON report of an earlier run (--output, --json, or compress's report.json): "
        "exit 3 when an artifact's median is slower than it by more than --max-regression.",
        show_default=False,
    ),
]
MaxRegressionOpt = Annotated[
    float,
    typer.Option(
        "--max-regression",
        help="Allowed slow-down against --baseline, as a fraction of its median (0.10: 10%).",
    ),
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Also write the JSON report to this file (atomically), e.g. as the next --baseline.",
        show_default=False,
    ),
]
MetricOpt = Annotated[
    Optional[str],
    typer.Option(
        "--metric",
        help="Also measure on --data: top1 (default), top5, mse or mae (mean error against the targets in y), "
        "agreement (share of samples whose top-1 class is the FIRST artifact's; no labels needed), or a "
        "pkg.module:function(y_true, y_pred) -> float hook (its mean; not with --remote).",
        show_default=False,
    ),
]
MetricOutputOpt = Annotated[
    Optional[str],
    typer.Option(
        "--metric-output",
        help="The output --metric reads, by name, for artifacts with several (required for mse, mae and hooks).",
        show_default=False,
    ),
]
MetricDirectionOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--metric-higher-is-better/--metric-lower-is-better",
        help="With a --metric hook: whether larger values are better (required for a hook).",
        show_default=False,
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No tables or progress; errors still print.")
]


@handle_errors
def bench_command(
    artifacts: ArtifactsArg,
    data: DataOpt = None,
    threads: ThreadsOpt = 1,
    xnnpack: XnnpackOpt = True,
    onnx_provider: OnnxProviderOpt = None,
    runs: RunsOpt = 100,
    warmup: WarmupOpt = 10,
    remote: RemoteOpt = None,
    remote_python: RemotePythonOpt = None,
    remote_timeout: RemoteTimeoutOpt = None,
    baseline: BaselineOpt = None,
    max_regression: MaxRegressionOpt = 0.10,
    metric: MetricOpt = None,
    metric_output: MetricOutputOpt = None,
    metric_higher_is_better: MetricDirectionOpt = None,
    output: OutputOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Time artifacts at batch 1 (interleaved, so ratios are fair) and measure accuracy (or --metric) on --data.

    With --remote they run on another machine (a target board); with --baseline the
    command exits 3 when a median got slower than --max-regression allows.
    """
    from compressor.api.benchmarking import benchmark, check_bench

    previous = check_bench(data, remote, remote_python, remote_timeout, baseline, max_regression, metric,
                           metric_higher_is_better)  # before timing
    measure = functools.partial(
        benchmark, artifacts, data, runs=runs, warmup=warmup, threads=threads, xnnpack=xnnpack,
        onnx_provider=onnx_provider, remote=remote,
        remote_python=remote_python, remote_timeout=remote_timeout, baseline=previous, max_regression=max_regression,
        metric=metric, metric_output=metric_output, metric_higher_is_better=metric_higher_is_better,
    )
    run = _measure_showing_progress(measure, len(artifacts), runs, remote, not (json_output or quiet), json_output)
    report, gate = run.report, run.gate
    if output is not None:
        _write_report(output, report)
    _render(report, gate, baseline, json_output, quiet)
    if gate is not None and not gate.passed:
        err_console.print(f"[bold red]latency regression:[/] {escape(_regression_line(gate))}", soft_wrap=True)
        raise typer.Exit(EXIT_REGRESSION)


def _measure_showing_progress(
    measure: Callable[[], Any], count: int, runs: int, remote: Optional[str], progress: bool, json_output: bool
) -> Any:
    if json_output:
        with stdout_to_stderr():  # stdout carries the JSON document alone
            return measure()
    if not progress:
        return measure()
    where = "" if remote is None else escape(f" on {remote!r}")
    with err_console.status(f"Timing {count} artifact(s){where}, {runs} runs each..."):
        return measure()


def _write_report(path: Path, report: dict[str, Any]) -> None:
    from compressor.io.atomic import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


def _render(
    report: dict[str, Any], gate: Optional[GateResult], baseline: Optional[Path], json_output: bool, quiet: bool
) -> None:
    if json_output:
        print_json(report)
        return
    if quiet:
        return
    console.print(_table(report))
    console.print(_runtime_table(report))
    if gate is not None:
        console.print(_gate_table(report, gate, baseline))
        if gate.warning:
            err_console.print(f"[yellow]warning:[/] {escape(gate.warning)}", soft_wrap=True)


def _table(report: dict[str, Any]) -> Table:
    results = report["results"]
    source = "generated input" if report["input"] == "generated" else f"inputs from {report['input']}"
    batch = "batch 1" if all(r["batch"] == 1 for r in results) else "batch 1 unless noted"
    caption = (
        f"latency in ms at {batch}: {report['runs']} interleaved runs after {report['warmup']} "
        f"warm-up, threads {report['threads'] or 'default'}, {source}"
    )
    metric = report.get("metric") or {"name": "top1"}
    if report["samples"]:
        read = f" (output {metric['output']})" if metric.get("output") else ""
        what = "accuracy" if metric["name"] == "top1" else _metric_label(metric)
        caption += f"; {what}{read} on {report['samples']} samples"
    host = report.get("host")
    if isinstance(host, dict) and host.get("name"):
        caption += f"; on {host['name']} ({host.get('machine', '?')})"
    # Fits 80 columns (CI logs): two spaces between columns, long paths fold.
    table = Table(caption=escape(caption), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("artifact", overflow="fold", min_width=12)
    table.add_column("format", no_wrap=True)
    # The mean (not the max, which is in the JSON) is the expected latency per input when inputs
    # take different paths through the model (dynamic gating).
    # top-1 as always; another metric's column beside it (in its place when nothing has a top-1
    # accuracy), for which `min` (still in the JSON) makes room within 80 columns.
    other = metric["name"] != "top1"
    top1 = not other or any(r["accuracy"] is not None for r in results)
    times = ("median", "mean", "p90") if other else ("median", "mean", "p90", "min")
    for name in ("size", *times, "× first", *(["top-1"] if top1 else [])):
        table.add_column(name, justify="right", no_wrap=True)
    if other:
        label = _metric_label(metric)
        table.add_column(escape(label), justify="right", no_wrap=True, min_width=min(len(label), 12))
    for result in results:
        latency = result["latency_ms"]
        note = f" (batch {result['batch']})" if result["batch"] != 1 else ""
        ratio, accuracy = result["ratio_to_first"], result["accuracy"]
        table.add_row(
            escape(result["path"] + note),
            result["format"],
            human_bytes(result["bytes"]),
            *(_ms(latency[key]) for key in times),
            "-" if ratio is None else f"{ratio:.2f}×",
            *(["-" if accuracy is None else f"{accuracy:.1%}"] if top1 else []),
            *([_metric_cell(metric, result.get("metric_value"))] if other else []),
        )
    return table


def _metric_label(metric: dict[str, Any]) -> str:
    """A metric's column name: "top-1", "top-5", "agreement", "mse", or a hook's function name."""
    name = str(metric["name"])
    if name in ("top1", "top5"):
        return f"top-{name[3:]}"
    return name.rsplit(":", 1)[-1]


def _metric_cell(metric: dict[str, Any], value: Optional[float]) -> str:
    """A share for the class metrics (94.5%), about four significant digits for the others."""
    if value is None:
        return "-"
    return f"{value:.1%}" if metric["name"] in ("top1", "top5", "agreement") else f"{value:.4g}"


def _runtime_table(report: dict[str, Any]) -> Table:
    """Per artifact: what it ran on, its load and first call, the spread of its timed runs, its peak memory."""
    caption = (
        "ms; init: load into the runtime (LiteRT: interpreter + allocate, onnxruntime: session); "
        "1st call: the first after it, before warm-up; std, p5, p95: over the timed runs; "
        "peak memory: loading and running it, in a fresh process"
    )
    table = Table(caption=escape(caption), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("artifact", overflow="fold", min_width=12)
    table.add_column("runs on", no_wrap=True)
    for name in ("init", "1st call", "std", "p5", "p95", "peak memory"):
        table.add_column(name, justify="right", no_wrap=True)
    for result in report["results"]:
        latency, peak = result["latency_ms"], result.get("peak_memory_bytes")
        table.add_row(
            escape(result["path"]),
            escape(runs_on(result)),
            *(_ms_or_dash(value) for value in (result.get("init_ms"), result.get("first_inference_ms"))),
            *(_ms_or_dash(latency.get(key)) for key in ("std", "p5", "p95")),
            "-" if peak is None else human_bytes(peak),
        )
    return table


def runs_on(result: dict[str, Any]) -> str:
    """What an artifact ran on, in a few words: "xnnpack", "no delegate", "CPU" (onnxruntime's provider)."""
    if result.get("provider"):
        return str(result["provider"]).removesuffix("ExecutionProvider") or str(result["provider"])
    delegate = result.get("delegate")
    if delegate is None:
        return "-"
    return "no delegate" if delegate == "none" else str(delegate)


def _ms_or_dash(value: Any) -> str:
    return "-" if value is None else _ms(value)


def _gate_table(report: dict[str, Any], gate: GateResult, baseline: Optional[Path]) -> Table:
    caption = (
        f"median latency in ms against {baseline}; slower by more than "
        f"{gate.max_regression:.0%} fails (exit {EXIT_REGRESSION})"
    )
    table = Table(caption=escape(caption), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("artifact", overflow="fold", min_width=12)
    for name in ("baseline", "now", "change"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    slow = {r.name for r in gate.regressions}
    for row in gate.compared:
        verdict = "[bold red]slower[/]" if row.name in slow else "ok"
        table.add_row(escape(row.name), _ms(row.baseline_ms), _ms(row.ms), f"{row.change:+.1%}", verdict)
    now = {r["path"]: r["latency_ms"]["median"] for r in report["results"]}
    for name in gate.missing:
        table.add_row(escape(name), "-", _ms(now[name]), "-", "new (not in baseline)")
    return table


def _regression_line(gate: GateResult) -> str:
    slower = ", ".join(f"{r.name} {r.change:+.1%} ({_ms(r.baseline_ms)} → {_ms(r.ms)} ms)" for r in gate.regressions)
    return f"{slower}; allowed +{gate.max_regression:.0%}"


def _ms(value: float) -> str:
    """About three significant digits: 152, 12.3, 1.23, 0.0812 (at most 4 decimals)."""
    if value <= 0:
        return "0"
    decimals = min(4, max(0, 2 - math.floor(math.log10(value))))
    return f"{value:.{decimals}f}"
