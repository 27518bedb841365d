"""`compress`: shrink a model under a budget, export verified artifacts, measure them.

Exit codes (stable): 0 budget met; 2 budget not met (the best candidate is still
written and reported); 1 any other failure (a fresh output folder then gets a
report.json that says "status": "error"); 130 interrupted (Ctrl-C), nothing written.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from compressor.cli.console import (
    EXIT_INTERRUPTED,
    console,
    err_console,
    fail,
    handle_errors,
    human_bytes,
    interrupted,
    load_tensorflow,
    print_json,
    stdout_to_stderr,
)
from compressor.cli.options import ModelArg, option_parameters, with_signature
from compressor.config import CompressOptions, check_names
from compressor.config_file import build_options
from compressor.errors import CompressorError

EXIT_BUDGET_NOT_MET = 2


def _parameters() -> list[inspect.Parameter]:
    """MODEL, then a flag per declared option (`compressor.config.CompressOptions`), and the two flags of the command itself."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    config = inspect.Parameter("config", keyword, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", help="TOML file with the same keys as these flags (flags win).")])
    allow_config_code = inspect.Parameter("allow_config_code", keyword, default=False, annotation=Annotated[
        bool, typer.Option("--allow-config-code", show_default=False, help="Let --config set options that import Python "
                           "code (custom-objects, pkg.module:function data hooks); only for config files you trust.")])
    options = option_parameters(CompressOptions)
    names = [parameter.name for parameter in options]
    options.insert(names.index("out") + 1, config)
    options.insert(names.index("allow_model_code") + 2, allow_config_code)
    return [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ModelArg), *options]


@with_signature(_parameters())
@handle_errors
def compress_command(model: Path, config: Optional[Path] = None, allow_config_code: bool = False, **flags: Any) -> None:
    """Compress MODEL under a budget and write model.keras/.tflite/.onnx, plan.json and report.json into --out.

    Final accuracy is measured on the exported TFLite artifact, on held-out data.
    """
    options = build_options(model, flags, config, allow_config_code=allow_config_code)
    from compressor.io.outdir import check_output_folder, holds_results
    from compressor.pipeline import check_inputs

    check_inputs(options)  # a missing or damaged file ends here, before TensorFlow loads

    check_output_folder(options.out, options.overwrite, [*options.input_files(), *([config] if config else [])])
    may_report_error = not holds_results(options.out)
    load_tensorflow()
    check_names(options)
    from compressor.pipeline import compress

    try:
        if options.json or options.quiet:
            with stdout_to_stderr():
                report = compress(options)
        else:
            report = _run_with_progress(compress, options)
    except KeyboardInterrupt:
        raise fail(f"interrupted; {options.out} is as it was before this run", code=EXIT_INTERRUPTED) from None
    except Exception as exc:
        if interrupted():  # native code turned Ctrl-C into another error: still an interruption
            raise fail(f"interrupted; {options.out} is as it was before this run", code=EXIT_INTERRUPTED) from None
        if may_report_error:
            _write_error_report(options, exc)
        raise
    if options.json:
        print_json(report)
    elif not options.quiet:
        _render(report)
    if report["status"] == "budget_not_met":
        budget = report["budget"]
        raise fail(
            f"budget not met: {budget['kind']} achieved {budget['achieved']:.4g} against limit "
            f"{budget['limit']:g}; the best candidate is in {options.out}",
            code=EXIT_BUDGET_NOT_MET,
        )


def _write_error_report(options: Any, exc: Exception) -> None:
    """Tell a pipeline that reads report.json what went wrong (only where no earlier results would be lost).

    The folder's manifest records it as an error report, so rerunning the corrected
    command needs no --overwrite.
    """
    import json

    from compressor.errors import first_line, flag_name
    from compressor.io.outdir import write_error_report
    from compressor.report.schema import SCHEMA

    message = first_line(exc.render(flag_name)) if isinstance(exc, CompressorError) else first_line(exc)
    error = {"schema": SCHEMA, "status": "error", "method": options.method, "error": message}
    try:
        write_error_report(options.out, (json.dumps(error, indent=2) + "\n").encode())
    except (OSError, CompressorError):
        pass


def _run_with_progress(compress: Any, options: Any) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, transient=False,
    ) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            elif done < bars.tasks[tasks[stage]].completed:  # a new run of the stage (a search's next step)
                bars.reset(tasks[stage], total=total)
            bars.update(tasks[stage], completed=done, total=total)

        def log(message: str) -> None:
            bars.console.print(f"[dim]{message}[/]")

        return compress(options, progress=progress, log=log)


def _render(report: dict) -> None:
    from rich import box
    from rich.table import Table

    base, comp, budget = report["baseline"], report["compressed"], report["budget"]
    rows = [row for row in report["layers"] if row["technique"] != "channels"]
    edited = [row for row in rows if row["technique"] not in ("skipped", "none")]
    channels = report.get("channels")
    if channels:
        console.print(
            f"{channels['channels_removed']} channel(s) removed from {channels['groups_pruned']} group(s), "
            f"{len(channels['groups_blocked'])} group(s) kept whole"
        )
    if rows:
        console.print(f"{len(edited)} layer(s) compressed, {len(rows) - len(edited)} left as they were (see report.json)")
    table = Table(title=f"compress · {report['method']} · status: {report['status']}")
    for column in ("", "params", "FLOPs", "accuracy (held-out)"):
        table.add_column(column, justify="right" if column else "left")

    def acc(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2%}"

    table.add_row("original", f"{base['params']:,}", f"{base['flops']:,}", acc(base["accuracy"]))
    table.add_row("compressed", f"{comp['params']:,}", f"{comp['flops']:,}", acc(comp["accuracy"]))
    table.add_row(
        "ratio", f"{comp['params'] / max(base['params'], 1):.3f}", f"{comp['flops'] / max(base['flops'], 1):.3f}",
        "-" if comp["accuracy"] is None or base["accuracy"] is None else f"{comp['accuracy'] - base['accuracy']:+.2%}",
    )
    console.print(table)
    folder = Path(report["artifacts"][0]["path"]).parent if report["artifacts"] else Path(".")
    # Fits 80 columns (CI logs): the file name says the format, long names fold.
    artifacts = Table(
        caption=f"artifacts in {folder}; latency at batch 1, interleaved with the original's",
        box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False,
    )
    artifacts.add_column("file", overflow="fold", min_width=12)
    for column in ("quant", "size", "accuracy", "ms", "orig. ms", "ratio"):
        artifacts.add_column(column, no_wrap=True, justify="left" if column == "quant" else "right")
    for entry in report["artifacts"]:
        lat, base_lat = entry.get("latency_ms"), entry.get("baseline_latency_ms")
        artifacts.add_row(
            Path(entry["path"]).name, entry.get("quantize", "none"), human_bytes(entry["bytes"]), acc(entry.get("accuracy")),
            "-" if not lat else f"{lat['median']:.3f}", "-" if not base_lat else f"{base_lat['median']:.3f}",
            "-" if entry.get("latency_ratio") is None else f"{entry['latency_ratio']:.2f}×",
        )
    console.print(artifacts)
    if budget["kind"]:
        verdict = "[green]met[/]" if budget["met"] else "[red]NOT met[/]"
        console.print(f"budget {budget['kind']} ≤ {budget['limit']:g}: achieved {budget['achieved']:.4g} ({budget['measured_on']}) → {verdict}")
    search = report["search"]
    evaluations = search["evaluations"] + (channels["evaluations"] if channels else 0)
    epochs = (report.get("finetune") or {}).get("epochs", 0)
    console.print(
        f"search: {evaluations} whole-model evaluations ({search['cached_evaluations']} from cache)"
        + (f", {epochs} fine-tuning epoch(s)" if epochs else "")
        + f", {report['timings_s']['search']:.1f} s; total {report['timings_s']['total']:.1f} s"
    )
    _render_gating(report.get("gating"))
    _render_exits(report.get("early_exit"))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"report for people: {folder / 'report.md'}")


def _render_gating(gating: Optional[dict]) -> None:
    """Two lines: what the gates skip per input, and what that does to the TFLite latency."""
    if not gating:
        return
    if not gating["applied"]:
        console.print(f"[yellow]gating not applied:[/] {gating['reason']}")
        return
    flops = gating.get("flops_per_input")
    if flops:
        console.print(
            f"gating: {len(gating['blocks'])} gated block(s); FLOPs per input {flops['mean']:,.0f} on average "
            f"({gating['expected_flops_fraction']:.2f} of the static model; p10–p90 {flops['p10']:,.0f}–{flops['p90']:,.0f})"
        )
    tflite = gating.get("tflite")
    if tflite:
        console.print(
            f"gated TFLite: {tflite['latency_ms']['mean']:.3f} ms per input on average against "
            f"{tflite['static_latency_ms']['mean']:.3f} ms without gates ({tflite['mean_latency_ratio']:.2f}×, same run)"
        )


def _render_exits(exits: Optional[dict]) -> None:
    """Two lines: where the inputs left and the FLOPs they ran, and what that does to the TFLite latency."""
    if not exits:
        return
    if not exits["applied"]:
        console.print(f"[yellow]early exits not applied:[/] {exits['reason']}")
        return
    flops = exits.get("flops_per_input")
    if flops:
        left = ", ".join(f"{e['rate']:.0%} after {e['point']}" for e in exits["exits"])
        console.print(f"early exits: {left}; FLOPs per input {flops['mean']:,.0f} on average "
                      f"({exits['expected_flops_fraction']:.2f} of the static model)")
    tflite = exits.get("tflite")
    if tflite:
        console.print(
            f"early-exit TFLite: {tflite['latency_ms']['mean']:.3f} ms per input on average against "
            f"{tflite['static_latency_ms']['mean']:.3f} ms without exits ({tflite['mean_latency_ratio']:.2f}×, same run)"
        )


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
app.command(help=compress_command.__doc__)(compress_command)


def main() -> None:
    """Console-script entry point of `compress`."""
    from compressor.cli.console import quiet_tensorflow

    quiet_tensorflow()
    app()
