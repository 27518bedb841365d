"""`compressor export`: write TFLite/ONNX/Keras artifacts and prove they match the model."""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.cli.console import (
    console,
    handle_errors,
    human_bytes,
    load_tensorflow,
    print_json,
    stdout_to_stderr,
)
from compressor.cli.options import AllowModelCodeOpt, CustomObjectsOpt, DataOpt, JsonOpt, ModelArg, OutDirOpt


@handle_errors(flags={"formats": "--format"})
def export_command(
    model: ModelArg,
    out: OutDirOpt,
    formats: Annotated[
        str, typer.Option("--format", "-f", help="Comma-separated formats: tflite, onnx, keras.")
    ] = "tflite,onnx,keras",
    data: DataOpt = None,
    samples: Annotated[
        int, typer.Option(help="Inputs to compare each artifact on (from --data, else generated).", min=1)
    ] = 64,
    atol: Annotated[
        float, typer.Option(help="Largest absolute output difference an artifact may show.", min=0.0)
    ] = 1e-4,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="Also write a quantized MODEL.MODE.tflite/.onnx: none, dynamic (int8 weights), "
            "float16, int8 (int8 weights and activations, calibrated on --data).",
        ),
    ] = "none",
    calibration_samples: Annotated[
        int, typer.Option(help="Samples of --data (seeded random choice) that calibrate --quantize int8.", min=1)
    ] = 200,
    int8_io: Annotated[
        bool,
        typer.Option("--int8-io", help="With --quantize int8: the TFLite artifact takes and returns int8 tensors."),
    ] = False,
    custom_objects: CustomObjectsOpt = None,
    allow_model_code: AllowModelCodeOpt = False,
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table; errors only (the exit code tells the rest).")] = False,
) -> None:
    """Export MODEL to TFLite, ONNX and .keras, load each artifact back and check parity.

    Exits 1 when a float artifact differs from the Keras model by more than --atol
    (the artifacts stay written, so they can be inspected). Quantized artifacts
    differ by design: they are listed with their numbers and fail only on
    non-finite outputs; judge them by accuracy (`compressor bench --data`).
    """
    from compressor.api.exporting import check_export

    check_export(model, data, quantize, int8_io)  # bad combinations and missing files end here, before TensorFlow loads
    load_tensorflow()
    from compressor.api.exporting import export_model
    from compressor.export.verify import ensure_passed

    with stdout_to_stderr():
        checks = export_model(
            model, out, formats, data=data, samples=samples, atol=atol, opset=opset, quantize=quantize,
            calibration_samples=calibration_samples, int8_io=int8_io, custom_objects=custom_objects or (),
            allow_model_code=allow_model_code, strict=False,
        )
    if json_out:
        print_json({"artifacts": [check.to_dict() for check in checks]})
    elif not quiet:
        _render(checks, source="samples of --data" if data else "generated inputs")
    ensure_passed(checks)


def _render(checks, source: str) -> None:
    from rich.table import Table

    quantized = any(check.quantized for check in checks)
    table = Table(
        title=f"Artifacts, compared with the Keras model on {checks[0].samples} {source}",
        caption="Quantized artifacts differ by design: measure their accuracy with `compressor bench --data`."
        if quantized
        else None,
    )
    for column in ("format", "path", "size", "max |diff|", "top-1 agreement", "parity"):
        numeric = column in ("size", "max |diff|", "top-1 agreement")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)
    for check in checks:
        agreement = "n/a" if check.top1_agreement is None else f"{check.top1_agreement:.2%}"
        name = f"{check.format} {check.quantize}" if check.quantized else check.format
        table.add_row(name, check.path, human_bytes(check.bytes), f"{check.max_abs_diff:.2e}", agreement, _verdict(check))
    console.print(table)


def _verdict(check) -> str:
    if check.quantized:
        return "[yellow]quantized[/]" if check.passed else "[red]non-finite[/]"
    return "[green]ok[/]" if check.passed else f"[red]over atol {check.atol:g}[/]"
