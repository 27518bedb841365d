"""report.md: the compression report for people, rendered from the report dict alone.

    write_markdown_report(json.loads(Path("build/report.json").read_text()), Path("build"))

The page reads top-down: did it work (status and budget), what changed (original
against compressed), what was produced (artifacts, with measured accuracy and
latency), how the search got there (plot of its trials), where the parameters went
(per layer), then notes and timings. Every key may be missing or null (an error
report holds only status, method and error); what is missing is left out or shown
as "—", never a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from compressor.errors import CompressorError, first_line
from compressor.io.atomic import ensure_dir, write_bytes_atomic
from compressor.report.cells import (
    MISSING, arrow, change_points, count, integer, ms, percent, points, ratio, size, table, times,
)
from compressor.report.exits import exits_markdown
from compressor.report.plots import Plot, accuracy_vs_compression, is_number, layer_params, list_of, mapping_of

PLOTS_DIR = "plots"
TRACE_PNG = "accuracy_vs_compression.png"
LAYERS_PNG = "layer_params.png"
STATUS_TEXT = {"ok": "ok", "budget_not_met": "budget not met", "error": "error"}
COST_NAMES = {"params": "parameters", "flops": "FLOPs"}
BLOCKED_SHOWN = 12  # layers listed by name under "could not be removed"; report.json has them all


def write_markdown_report(report: Mapping[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.md` and its plots (`out_dir/plots/*.png`), each atomically.

    Args:
        report: The report dict (report.json's content), complete or an error report.
        out_dir: The folder report.json is in; created if missing.

    Returns:
        The path of report.md.

    Raises:
        CompressorError: `report` is not a dict, or the folder cannot be written.
    """
    if not isinstance(report, Mapping):
        raise CompressorError(
            f"Invalid report. Expected a dict (report.json's content). Received: {type(report).__name__}"
        )
    out_dir = ensure_dir(Path(out_dir))
    plots = {} if report.get("status") == "error" else _draw_plots(report, out_dir)
    return write_bytes_atomic(out_dir / "report.md", render_markdown(report, plots, out_dir).encode())


def render_markdown(
    report: Mapping[str, Any], plots: Optional[Mapping[str, Plot]] = None, out_dir: Optional[Path] = None
) -> str:
    """The report.md text.

    Args:
        report: The report dict.
        plots: "trace" and "layers" → `compressor.report.plots.Plot`, as drawn into
            `out_dir/plots`; missing plots are not linked.
        out_dir: The folder report.md goes into. Artifacts in the run's output
            folder (`options.out`) or in `out_dir` are linked relative to report.md.

    Returns:
        Markdown text, ending with a newline.
    """
    plots = plots or {}
    sections = [_headline(report)]
    if report.get("status") != "error":
        sections += [
            _summary(report),
            _artifacts(report, out_dir),
            _search(report, plots.get("trace")),
            _gating(report),
            exits_markdown(report),
            _layers(report, plots.get("layers")),
            _notes(report),
            _timings(report),
        ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _draw_plots(report: Mapping[str, Any], out_dir: Path) -> dict[str, Plot]:
    folder = out_dir / PLOTS_DIR
    return {
        "trace": _draw(accuracy_vs_compression, report, folder / TRACE_PNG),
        "layers": _draw(layer_params, report, folder / LAYERS_PNG),
    }


def _draw(draw: Callable[[Mapping[str, Any], Path], Plot], report: Mapping[str, Any], path: Path) -> Plot:
    """A plot, or a note saying why there is none: a plot is never worth losing the report over."""
    try:
        return draw(report, path)
    except ImportError:
        return Plot(None, ("No plot: matplotlib is not installed (pip install matplotlib).",))
    except (OSError, ValueError, RuntimeError) as exc:
        return Plot(None, (f"The plot could not be drawn: {first_line(exc)}",))


# --- sections --------------------------------------------------------------------------------


def _headline(report: Mapping[str, Any]) -> str:
    status = report.get("status")
    status_text = STATUS_TEXT.get(status, str(status)) if isinstance(status, str) else MISSING
    lines = ["# Compression report", "", f"**Status: {status_text}** · method `{report.get('method') or MISSING}`"]
    if status == "error":
        lines += ["", f"The run failed: {report.get('error') or 'no message was recorded'}"]
        return "\n".join(lines)
    budget = mapping_of(report.get("budget"))
    if budget.get("kind"):
        lines += ["", _budget_sentence(budget)]
    quantize = report.get("quantize")
    if quantize and quantize != "none":
        calibration = mapping_of(report.get("calibration"))
        calibrated = ""
        if calibration.get("samples"):
            source = f" {calibration['data']}" if calibration.get("data") else ""
            calibrated = f", calibrated on {calibration['samples']}{source} samples"
        lines += ["", f"Quantization: {quantize}{calibrated}."]
    return "\n".join(lines)


def _budget_sentence(budget: Mapping[str, Any]) -> str:
    kind, limit, achieved = budget["kind"], budget.get("limit"), budget.get("achieved")
    met = {True: "met", False: "**not met**"}.get(budget.get("met"), "not measured")
    where = f", measured on {budget['measured_on']}" if budget.get("measured_on") else ""
    if kind == "accuracy_drop" and isinstance(budget.get("metric"), Mapping):
        return _metric_budget_sentence(budget, mapping_of(budget["metric"]), met, where)
    if kind == "accuracy_drop":
        text = f"Budget: lose at most {points(limit)} of accuracy; lost {points(achieved)} ({met}){where}."
        ci = list_of(budget.get("ci"))
        if len(ci) == 2 and all(is_number(bound) for bound in ci) and is_number(budget.get("confidence")):
            two_sided = 2 * budget["confidence"] - 1
            text += (f" The drop lies between {points(ci[0])} and {points(ci[1])} ({two_sided:.0%} interval; "
                     f"at most {points(ci[1])} with {budget['confidence']:.0%} confidence).")
        if budget.get("search_achieved") is not None:
            text += f" On the search data: {points(budget['search_achieved'])}."
        return text
    name = COST_NAMES.get(kind, kind)
    return f"Budget: keep at most {percent(limit)} of the {name}; kept {percent(achieved)} ({met}){where}."


def _metric_budget_sentence(budget: Mapping[str, Any], metric: Mapping[str, Any], met: str, where: str) -> str:
    """The budget of a metric other than top-1: its name and unit, the drop, its bounds, the metric's own values."""
    name, unit = metric.get("name", MISSING), metric.get("unit", "")
    limit, achieved = budget.get("limit"), budget.get("achieved")
    text = (f"Budget (metric `{name}`, in {unit}): lose at most {_number(limit)}; lost {_number(achieved)} "
            f"({met}){where}.")
    ci = list_of(budget.get("ci"))
    if len(ci) == 2 and all(is_number(bound) for bound in ci) and is_number(budget.get("confidence")):
        text += f" At most {_number(ci[1])} with {budget['confidence']:.0%} confidence."
    if is_number(metric.get("baseline_value")) and is_number(metric.get("value")):
        text += f" {name}: {_number(metric['baseline_value'])} (original) → {_number(metric['value'])}."
    if budget.get("search_achieved") is not None:
        text += f" On the search data: {_number(budget['search_achieved'])}."
    return text


def _number(value: Any) -> str:
    return f"{value:.4g}" if is_number(value) else MISSING


def _summary(report: Mapping[str, Any]) -> str:
    base, comp = mapping_of(report.get("baseline")), mapping_of(report.get("compressed"))
    rows = [
        [name, integer(base.get(key)), integer(comp.get(key)), ratio(comp.get(key), base.get(key))]
        for name, key in (("parameters", "params"), ("FLOPs", "flops"))
    ]
    before, after = base.get("accuracy"), comp.get("accuracy")
    rows.append(["accuracy (held-out)", percent(before, 2), percent(after, 2), change_points(before, after)])
    text = "## Original and compressed\n\n" + table(["", "original", "compressed", "compressed / original"], rows, "lrrr")
    dense = comp.get("dense_params")
    if is_number(dense) and dense != comp.get("params"):
        text += (
            "\n\nParameters count what a sparse-storage artifact keeps; "
            f"stored dense, the compressed model has {integer(dense)}."
        )
    return text


def _artifacts(report: Mapping[str, Any], out_dir: Optional[Path]) -> str:
    artifacts = [mapping_of(entry) for entry in list_of(report.get("artifacts"))]
    if not artifacts:
        return ""
    out = mapping_of(report.get("options")).get("out")
    dynamic = any(mapping_of(report.get(key)).get("applied") for key in ("early_exit", "gating"))
    rows = []
    for entry in artifacts:
        latency, original = mapping_of(entry.get("latency_ms")), mapping_of(entry.get("baseline_latency_ms"))
        rows.append([
            entry.get("format") or MISSING,
            entry.get("quantize") or "none",
            _file_link(entry.get("path"), out_dir, out),
            size(entry.get("bytes")),
            size(entry.get("baseline_bytes")),
            percent(entry.get("accuracy"), 2),
            ms(latency.get("median")),
            ms(original.get("median")),
            times(entry.get("latency_ratio")),
        ] + ([times(entry.get("mean_latency_ratio"))] if dynamic else []))
    headers = ["format", "quantization", "file", "size", "original's size", "accuracy (held-out)",
               "median latency", "original's median", "latency ratio"] + (["mean latency ratio"] if dynamic else [])
    text = "## Artifacts\n\n" + table(headers, rows, "lllrrrrrr" + ("r" if dynamic else ""))
    text += "\n\nLatency ratio: our median over the original's, timed interleaved in one run (below 1: faster)."
    if dynamic:
        text += (" Mean latency ratio: the same over means, the fair figure for a file whose time per input depends on"
                 " the input (early exits, gates): timed calls cycle through the held-out inputs.")
    return text + _runtime_table(artifacts, out_dir, out)


def _runtime_table(artifacts: Sequence[Mapping[str, Any]], out_dir: Optional[Path], out: Optional[str]) -> str:
    """Load time, first call, spread of the runs and peak memory of each timed artifact (reports since these keys)."""
    timed = [entry for entry in artifacts if "init_ms" in entry]
    if not timed:
        return ""
    rows = [[_file_link(entry.get("path"), out_dir, out), _runs_on(entry), ms(entry.get("init_ms")),
             ms(entry.get("first_inference_ms")),
             *(ms(mapping_of(entry.get("latency_ms")).get(key)) for key in ("std", "p5", "p95")),
             size(entry.get("peak_memory_bytes")), size(entry.get("baseline_peak_memory_bytes"))] for entry in timed]
    headers = ["file", "runs on", "load", "first call", "std", "p5", "p95", "peak memory", "original's peak memory"]
    return ("\n\n" + table(headers, rows, "llrrrrrrr") + "\n\nLoad: into the runtime (interpreter and tensors, or "
            "session); first call: the one after it, before warm-up; std, p5, p95: over the timed runs; peak memory: "
            "loading and running it in a fresh process.")


def _runs_on(entry: Mapping[str, Any]) -> str:
    delegate = entry.get("delegate")
    where = entry.get("provider") or ("no delegate" if delegate == "none" else delegate) or MISSING
    threads = entry.get("threads")
    if not is_number(threads):
        return where
    return f"{where}, {threads} thread(s)" if threads else f"{where}, default threads"


def _search(report: Mapping[str, Any], plot: Optional[Plot]) -> str:
    search = mapping_of(report.get("search"))
    trials = [mapping_of(trial) for trial in list_of(search.get("trials"))]
    parts = ["## Search"]
    facts = []
    if search.get("evaluations"):
        cached = search.get("cached_evaluations") or 0
        facts.append(f"{search['evaluations']} whole-model evaluations of the layer search ({cached} from the cache)")
    if trials:
        chosen = sum(1 for trial in trials if trial.get("chosen"))
        stages = " (one per search stage)" if chosen > 1 else ""
        facts.append(f"{count(len(trials), 'candidate model')} in the trace, {chosen} chosen{stages}")
    if search.get("search_samples"):
        facts.append(f"{search['search_samples']} search samples, {search.get('held_out_samples') or 0} held out")
    if facts:
        parts.append("; ".join(facts) + ".")
    blocks = _blocks_sentence(mapping_of(report.get("blocks")))
    if blocks:
        parts.append(blocks)
    channels = _channels_sentence(mapping_of(report.get("channels")))
    if channels:
        parts.append(channels)
    parts += _blocked_layers(mapping_of(report.get("channels")))
    parts += _acceptance(mapping_of(search.get("acceptance")))
    finetune = _finetune_sentence(mapping_of(report.get("finetune")))
    if finetune:
        parts.append(finetune)
    parts += _plot_lines(plot, "Search-data accuracy against the fraction of the cost kept")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _acceptance(acceptance: Mapping[str, Any]) -> list[str]:
    """The guard's looks, in order: what each model measured and whether it was accepted."""
    if not acceptance:
        return []
    confidence = acceptance.get("confidence")
    level = f"{confidence:.0%}" if is_number(confidence) else MISSING
    text = (f"Models were accepted on a guard split of {acceptance.get('samples') or 0} samples the search never saw, "
            f"when their drop was within the budget with {level} confidence; the first rejection ends the sequence.")
    judged = acceptance.get("judged")
    if isinstance(judged, str) and judged != "keras model":
        text += f" Each model was measured as its quantized artifact ({judged}), the file the run ships."
    lines = [text]
    looks = [mapping_of(look) for look in list_of(acceptance.get("looks"))]
    if looks:
        rows = []
        for look in looks:
            ci = list_of(look.get("ci"))
            upper = points(ci[1]) if len(ci) == 2 else "not measured"
            verdict = "accepted" if look.get("accepted") else "rejected"
            rows.append([str(look.get("model") or MISSING), points(look.get("drop")) if "drop" in look else MISSING,
                         upper, verdict])
        lines.append(table(["model shown to the guard", "drop", "upper bound", "verdict"], rows, "lrrl"))
    return lines


def _finetune_sentence(finetune: Mapping[str, Any]) -> str:
    """Fine-tuning's epochs and optimizer steps in all, its cap per run and its devices (reports with steps)."""
    if not finetune.get("steps"):
        return ""
    text = (f"Fine-tuning took {count(finetune['steps'], 'optimizer step')} in "
            f"{count(finetune.get('epochs') or 0, 'epoch')} in all")
    if finetune.get("steps_per_run"):
        text += f", at most {integer(finetune['steps_per_run'])} per run"
    if (finetune.get("replicas") or 1) > 1:
        text += f", on {finetune['replicas']} devices (mirrored)"
    return text + "."


def _blocks_sentence(blocks: Mapping[str, Any]) -> str:
    if not blocks:
        return ""
    removed = list_of(blocks.get("removed"))
    candidates = len(list_of(blocks.get("candidates")))
    text = f"Block removal took out {count(len(removed), 'residual block')} of {candidates}"
    if removed:
        text += " (" + ", ".join(f"`{name}`" for name in removed) + ")"
    before, after = blocks.get("baseline_flops"), blocks.get("flops")
    if removed and before and after is not None:
        text += f", keeping {after / before:.3f} of the FLOPs"
    if blocks.get("finetune_epochs"):
        text += f", fine-tuning {count(blocks['finetune_epochs'], 'epoch')} along the way"
    share = blocks.get("budget_share")
    if share is not None and share < 1:
        text += f"; it could spend {share:g} of the budget, the channel search the rest"
    return text + _ended(blocks) + "."


def _channels_sentence(channels: Mapping[str, Any]) -> str:
    if not channels:
        return ""
    removed = count(channels.get("channels_removed") or 0, "channel")
    text = f"Channel pruning removed {removed} from {count(channels.get('groups_pruned') or 0, 'group')}"
    if channels.get("finetune_epochs"):
        text += f", fine-tuning {count(channels['finetune_epochs'], 'epoch')} along the way"
    if channels.get("evaluations"):
        text += f" ({count(channels['evaluations'], 'search-data evaluation')})"
    blocked = list_of(channels.get("groups_blocked"))
    if blocked:
        text += f"; {count(len(blocked), 'group')} could not be pruned"
    return text + _ended(channels) + "."


def _ended(search: Mapping[str, Any]) -> str:
    """Why a block or channel search ended before its own end (its record's "stopped"), as a clause."""
    stopped = search.get("stopped")
    if stopped == "guard":
        return "; the guard rejected its last step, so nothing after it could be accepted"
    return f"; it stopped at its {stopped}" if stopped else ""


def _blocked_layers(channels: Mapping[str, Any]) -> list[str]:
    """Each layer with weights channel pruning had to leave whole, and why (the first BLOCKED_SHOWN)."""
    rows = [mapping_of(row) for row in list_of(channels.get("layers_blocked"))]
    if not rows:
        return []
    lines = [f"- `{row.get('layer', '?')}`: {row.get('reason') or MISSING}" for row in rows[:BLOCKED_SHOWN]]
    if len(rows) > BLOCKED_SHOWN:
        lines.append(f"- and {len(rows) - BLOCKED_SHOWN} more (`channels.layers_blocked` in report.json)")
    return ["Layers whose channels could not be removed:\n\n" + "\n".join(lines)]


def _gating(report: Mapping[str, Any]) -> str:
    """What the gates skip: FLOPs per input, TFLite latency per input against the static model, skip rate per block."""
    gating = mapping_of(report.get("gating"))
    if not gating:
        return ""
    if not gating.get("applied"):
        return f"## Dynamic gating\n\nNot applied: {gating.get('reason') or MISSING}."
    rows = dynamic_rows(gating, median=True)
    blocks = [mapping_of(block) for block in list_of(gating.get("blocks"))]
    intro = (
        f"{count(len(blocks), 'residual block')} gated, measured on {gating.get('samples', MISSING)} "
        f"{gating.get('measured_on') or ''} inputs; gates trained {gating.get('epochs', MISSING)} epoch(s) towards "
        f"{percent(gating.get('trained_target'), 0)} of the compute"
        + (" with the network" if gating.get("network") else ", network frozen") + "."
    )
    parts = ["## Dynamic gating", intro, table(["", "without gates", "with gates"], rows, "lrr")]
    if blocks:
        cells = [[f"`{block.get('name', '?')}`", integer(block.get("flops")), percent(block.get("skip_rate"))] for block in blocks]
        parts.append(table(["block", "FLOPs it costs", "skipped for"], cells, "lrr"))
    return "\n\n".join(parts)


def dynamic_rows(entry: Mapping[str, Any], median: bool = False) -> list[list[str]]:
    """A dynamic stage's rows against the static model: FLOPs per input, TFLite latency per input (and its median)."""
    flops = mapping_of(entry.get("flops_per_input"))
    tflite = mapping_of(entry.get("tflite"))
    static_latency, latency = mapping_of(tflite.get("static_latency_ms")), mapping_of(tflite.get("latency_ms"))
    rows = [
        ["FLOPs per input", integer(entry.get("static_flops")),
         f"{integer(_rounded(flops.get('mean')))} mean ({ratio(flops.get('mean'), entry.get('static_flops'))}); "
         f"p10–p90 {integer(_rounded(flops.get('p10')))}–{integer(_rounded(flops.get('p90')))}"],
        ["TFLite latency per input (mean, same run)", ms(static_latency.get("mean")),
         f"{ms(latency.get('mean'))} ({times(tflite.get('mean_latency_ratio'))})"],
    ]
    if median:
        rows.append(["TFLite latency per input (median)", ms(static_latency.get("median")), ms(latency.get("median"))])
    return rows


def _rounded(value: Any) -> Any:
    return round(value) if is_number(value) else value


def _layers(report: Mapping[str, Any], plot: Optional[Plot]) -> str:
    rows = [mapping_of(row) for row in list_of(report.get("layers"))]
    if not rows:
        return ""
    cells = [
        [f"`{row.get('name', '?')}`", row.get("technique") or MISSING,
         arrow(row.get("params_before"), row.get("params_after")),
         arrow(row.get("flops_before"), row.get("flops_after")), _layer_detail(row)]
        for row in rows
    ]
    parts = ["## Layers", *_plot_lines(plot, "Parameters (and channels) per layer, before and after")]
    headers = ["layer", "technique", "params before → after", "FLOPs before → after", "detail"]
    parts.append(table(headers, cells, "llrrl"))
    return "\n\n".join(parts)


def _layer_detail(row: Mapping[str, Any]) -> str:
    """What the layer became, or why it was left alone."""
    if row.get("technique") == "channels":
        if row.get("channels_before") is None:
            return "narrowed: channels of its inputs or outputs went"
        detail = f"group's channels {arrow(row.get('channels_before'), row.get('channels_after'))}"
        return detail + (f" ({row['criterion']})" if row.get("criterion") else "")
    if row.get("reason"):
        return str(row["reason"])
    found = []
    if row.get("ranks"):
        found.append("ranks " + "×".join(str(rank) for rank in list_of(row["ranks"])))
    if row.get("rank") is not None:
        found.append(f"rank {row['rank']}")
    if row.get("sparsity"):
        found.append(_sparsity(mapping_of(row["sparsity"])))
    if row.get("residual"):
        found.append("+ sparse residual, " + _sparsity(mapping_of(row["residual"])))
    return ", ".join(found)


def _sparsity(spec: Mapping[str, Any]) -> str:
    structure = spec.get("structure") or "unstructured"
    if structure == "n:m":
        structure = f"{spec.get('n')}:{spec.get('m')}"
    elif structure == "block" and spec.get("block_size"):
        structure = "block " + "×".join(str(v) for v in list_of(spec["block_size"]))
    density = spec.get("density")
    return f"density {density:.2f} {structure}" if is_number(density) else structure


def _notes(report: Mapping[str, Any]) -> str:
    notes = [str(note) for note in list_of(report.get("notes"))]
    return "## Notes\n\n" + "\n".join(f"- {note}" for note in notes) if notes else ""


def _timings(report: Mapping[str, Any]) -> str:
    timings = mapping_of(report.get("timings_s"))
    if not timings:
        return ""
    rows = [[name, f"{seconds:.1f} s" if is_number(seconds) else MISSING] for name, seconds in timings.items()]
    return "## Timings\n\n" + table(["step", "wall time"], rows, "lr")


def _plot_lines(plot: Optional[Plot], alt: str) -> list[str]:
    if plot is None:
        return []
    lines = [f"![{alt}]({PLOTS_DIR}/{Path(plot.path).name})"] if plot.path is not None else []
    return lines + [f"*{note}*" for note in plot.notes]


# --- formatting ------------------------------------------------------------------------------


def _file_link(path: Optional[str], out_dir: Optional[Path], out: Optional[str]) -> str:
    """The artifact as a link relative to report.md when it lies in the report's folder, else its name.

    Paths in the report point into the run's output folder (`options.out`, as given),
    which is where report.md ends up even when it is written elsewhere first.
    """
    if not path:
        return MISSING
    path, relative = str(path), None
    if out:
        try:
            relative = Path(path).relative_to(Path(str(out)))
        except ValueError:
            pass
    if relative is None and out_dir is not None:
        inside = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir)))
        relative = None if inside.parts[:1] == ("..",) else inside
    if relative is None:
        return Path(path).name
    target = relative.as_posix()
    return f"[{target}]({f'<{target}>' if ' ' in target else target})"  # <…>: a link target with spaces
