"""One compression, end to end: inputs → model stages (search or replay) → export → timing → report.

The model stages (`compressor.pipeline.stages`) make the compressed model and the plan;
the output stages run the same way after a search or a replay: the export stage writes
and verifies the artifacts, the timing stage times and scores them against the
original's on held-out data, and the report is assembled from every stage's record
(`compressor.report.build`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.pipeline import stages
from compressor.pipeline.context import Log, Progress, RunContext
from compressor.pipeline.data import Inputs, check_data_and_plan, load_model, load_splits
from compressor.pipeline.early_exit import measure_exits
from compressor.pipeline.export import calibration, export_artifacts, export_baselines
from compressor.pipeline.gating import measure_gates
from compressor.pipeline.records import Measured
from compressor.pipeline.techniques import resolve_techniques
from compressor.pipeline.timing import time_artifacts
from compressor.report.build import Timings, build_report, relocate, write_report

if TYPE_CHECKING:
    import keras

    from compressor.config import CompressOptions


def compress_into(options: CompressOptions, staging: Path, progress: Progress, log: Log,
                  inputs: Inputs) -> tuple[dict[str, Any], keras.Model]:
    """Run one compression, writing every output into `staging`.

    Returns:
        The report (paths as they will be in `options.out`) and the compressed model.
    """
    from compressor.surgery.plan import Plan

    started = time.perf_counter()
    check_data_and_plan(options, inputs)  # before the model loads; loading checks the model file
    metric = options.metric_spec()  # a hook imports here, before the model loads
    model = load_model(options, inputs, log)
    splits = load_splits(model, options, inputs, metric, log)
    deadline = None if options.time_limit is None else started + 60 * options.time_limit
    ctx = RunContext(options, model, splits, options.budget(), staging, log, progress, metric, deadline)
    load_s = time.perf_counter() - started
    log("converting the original model")  # the export preflight: a layer no format takes fails here, before the search
    baselines = export_baselines(ctx)
    preflight_s = time.perf_counter() - started - load_s  # export work: counted in the export's time
    gc.collect()  # the converters' graphs are garbage now: collect them here, outside every timed stage
    ctx = resolve_techniques(ctx)  # --techniques auto: what this model and budget need

    log("searching" if options.plan is None else f"replaying {options.plan}")
    search_started = time.perf_counter()
    run = stages.search(ctx) if options.plan is None else stages.replay(ctx, Plan.load(options.plan))
    search_s = time.perf_counter() - search_started

    log("exporting, verifying and timing artifacts")
    export_started = time.perf_counter()
    run.plan().save(staging / "plan.json")
    samples = calibration(ctx)
    exported = export_artifacts(ctx, run, samples, baselines)
    timing_started = time.perf_counter()
    artifacts, static_tflite = time_artifacts(ctx, run, exported)
    timing_s = time.perf_counter() - timing_started
    export_s = time.perf_counter() - export_started + preflight_s

    measured = Measured(artifacts, static_tflite, samples, measure_gates(ctx, run), measure_exits(ctx, run, artifacts))
    stages_s = {"load": load_s, **run.seconds, **exported.seconds, "timing": timing_s}
    report = build_report(ctx, run, measured, Timings(search_s, export_s, started, stages_s))
    relocate(report, staging, options.out)
    write_report(staging / "report.json", report)
    _write_markdown(report, staging, log)
    return report, run.compressed


def _write_markdown(report: dict[str, Any], folder: Path, log: Log) -> None:
    from compressor.report.markdown import write_markdown_report

    log("writing report.md and plots")
    write_markdown_report(report, folder)
