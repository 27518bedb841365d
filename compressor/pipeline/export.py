"""The export stage: write every artifact, and the original's of each runtime format, and verify each.

Every artifact is loaded back and compared with the Keras model it came from
(`compressor.export.verify`): a run whose artifact does not match stops here. The
original model is exported too, so the timing stage compares like with like, and it
is exported first, before the search (`export_baselines`): a layer a runtime format
cannot take fails the run in one line naming the layer and the format before any
search time is spent. With gates, the model before them is exported as TFLite to
`static/`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from compressor.pipeline.context import Run, RunContext
from compressor.pipeline.records import Baselines, Calibration, Exported, LayerRecord

if TYPE_CHECKING:
    from compressor.export.verify import ArtifactCheck

RUNTIME_FORMATS = ("tflite", "onnx")
"""Formats that run outside Keras: timed, and quantized when quantization is asked for."""


def runtime_formats(formats: Sequence[str]) -> list[str]:
    """The formats among `formats` that are timed against the original's artifact."""
    return [fmt for fmt in formats if fmt in RUNTIME_FORMATS]


def calibration(ctx: RunContext) -> Calibration:
    """Samples that calibrate int8 quantization: training data first, held-out data only as a last resort."""
    options = ctx.options
    if options.quantize != "int8":
        return Calibration()  # dynamic-range and float16 need no activation ranges
    from compressor.export.quantize import calibration_set

    data = ctx.data
    for split, name in ((data.train, "train"), (data.search, "search"), (data.held_out, "held-out")):
        if split is not None:
            return Calibration(calibration_set(split.x, options.calibration_samples, seed=options.seed), name)
    return Calibration()


def export_baselines(ctx: RunContext) -> Baselines:
    """Write and verify the original model's artifact of each runtime format asked for (the export preflight).

    Raises:
        ExportError: The original model does not convert: one line naming the layer and format.
        VerificationError: An artifact of the original does not match it within tolerance.
    """
    from compressor.export.verify import ensure_passed, export_and_verify, keras_outputs, verification_inputs

    options = ctx.options
    runtime = runtime_formats(options.export)
    if not runtime:
        return Baselines()
    seconds: dict[str, float] = {"writing": 0.0, "verification": 0.0}
    x = verification_inputs(ctx.model, ctx.data.held_out, samples=64, seed=options.seed)
    started = time.perf_counter()
    original = keras_outputs(ctx.model, x)
    seconds["verification"] += time.perf_counter() - started
    checks: dict[str, ArtifactCheck] = {}
    for done, fmt in enumerate(runtime):
        ctx.progress("converting the original model", done, len(runtime))
        found = export_and_verify(ctx.model, ctx.staging / "baseline", [fmt], x, atol=options.atol, expected=original,
                                  seconds=seconds)
        checks.update({check.format: check for check in found})
    ctx.progress("converting the original model", len(runtime), len(runtime))
    ensure_passed(list(checks.values()))
    return Baselines(checks, seconds)


def export_artifacts(ctx: RunContext, run: Run, calibration: Calibration, baselines: Baselines) -> Exported:
    """Write and verify the artifacts (float, then quantized) and the model before gates.

    Args:
        baselines: The original's artifacts (`export_baselines`), kept in the record.

    Raises:
        ExportError: An artifact could not be written.
        VerificationError: An artifact does not match its Keras model within tolerance.
    """
    from compressor.export.verify import ensure_passed, export_and_verify, keras_outputs, verification_inputs

    options, out = ctx.options, ctx.staging
    x = verification_inputs(run.compressed, ctx.data.held_out, samples=64, seed=options.seed)
    layers = run.record(LayerRecord)
    sparse = layers is not None and layers.sparse_weights
    steps = len(options.export)
    seconds = dict(baselines.seconds) or {"writing": 0.0, "verification": 0.0}
    # The Keras outputs are computed once, not once per format (a real cost on large models).
    started = time.perf_counter()
    expected = keras_outputs(run.compressed, x) if options.export else None
    seconds["verification"] += time.perf_counter() - started
    checks: list[ArtifactCheck] = []
    for done, fmt in enumerate(options.export):
        ctx.progress("exporting artifacts", done, steps)
        checks += export_and_verify(
            run.compressed, out, [fmt], x, atol=options.atol, sparse_tflite=sparse,
            quantize=options.quantize if fmt in RUNTIME_FORMATS else "none", calibration=calibration.samples,
            int8_io=options.int8_io and fmt == "tflite", allow_model_code=options.allow_model_code,
            expected=expected, seconds=seconds,
        )
    static = None
    if run.static is not None and "tflite" in runtime_formats(options.export):
        static = export_and_verify(run.static, out / "static", ["tflite"], x, atol=options.atol, sparse_tflite=sparse,
                                   seconds=seconds)[0]
    ctx.progress("exporting artifacts", steps, steps)
    ensure_passed(checks + ([static] if static is not None else []))
    return Exported(tuple(checks), dict(baselines.checks), static, seconds)
