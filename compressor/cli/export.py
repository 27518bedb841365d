"""`compressor export`: write TFLite/ONNX/Keras artifacts and prove they match the model."""

from __future__ import annotations

from pathlib import Path
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
from compressor.errors import CompressorError
from compressor.cli.options import AllowModelCodeOpt, CustomObjectsOpt, DataOpt, JsonOpt, ModelArg, OutDirOpt


@handle_errors
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
    from compressor.export.quantize import parse_quantize
    from compressor.io.data import check_data_spec
    from compressor.io.model_files import check_model_path

    mode = parse_quantize(quantize)
    _check_quantize_flags(mode, data, int8_io)
    check_model_path(model)  # missing or damaged inputs end here, before TensorFlow loads
    if data:
        check_data_spec(data)
    load_tensorflow()
    from compressor.export.quantize import QUANTIZED_FORMATS, calibration_set
    from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs
    from compressor.export.writers import parse_formats, single_input_shape
    from compressor.io.atomic import ensure_dir
    from compressor.io.data import load_data
    from compressor.io.models import load_model

    wanted = parse_formats(formats)
    if mode != "none" and not set(QUANTIZED_FORMATS) & set(wanted):
        raise CompressorError(
            f"--quantize {mode} quantizes tflite and onnx artifacts; --format {','.join(wanted)} has neither"
        )
    if "keras" in wanted and (Path(out) / f"{Path(model).stem}.keras").resolve() == Path(model).resolve():
        raise CompressorError(f"exporting .keras into {out} would overwrite the input model; choose another --out")
    ensure_dir(out)
    with stdout_to_stderr():
        keras_model = load_model(model, custom_objects, allow_model_code=allow_model_code)
        shape = single_input_shape(keras_model)[1:]
        dataset = load_data(data, input_shape=shape) if data else None
        x = verification_inputs(keras_model, dataset, samples)
        calibration = calibration_set(dataset.x, calibration_samples) if mode == "int8" else None
        checks = export_and_verify(
            keras_model, out, wanted, x, atol=atol, opset=opset, stem=Path(model).stem,
            quantize=mode, calibration=calibration, int8_io=int8_io, allow_model_code=allow_model_code,
        )
    if json_out:
        print_json({"artifacts": [check.to_dict() for check in checks]})
    elif not quiet:
        _render(checks, source="samples of --data" if dataset else "generated inputs")
    ensure_passed(checks)


def _check_quantize_flags(mode: str, data, int8_io: bool) -> None:
    """Refuse flag combinations that cannot work, before TensorFlow loads."""
    if int8_io and mode != "int8":
        raise CompressorError(f"--int8-io needs --quantize int8. Received: --quantize {mode}")
    if mode == "int8" and not data:
        raise CompressorError("--quantize int8 calibrates on real inputs: pass --data")


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
