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
from compressor.cli.options import CustomObjectsOpt, DataOpt, JsonOpt, ModelArg, OutDirOpt


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
    custom_objects: CustomObjectsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export MODEL to TFLite, ONNX and .keras, load each artifact back and check parity.

    Exits 1 when an artifact differs from the Keras model by more than --atol
    (the artifacts stay written, so they can be inspected).
    """
    load_tensorflow()
    from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs
    from compressor.export.writers import parse_formats, single_input_shape
    from compressor.io.atomic import ensure_dir
    from compressor.io.data import load_data
    from compressor.io.models import load_model

    wanted = parse_formats(formats)
    if "keras" in wanted and (Path(out) / f"{Path(model).stem}.keras").resolve() == Path(model).resolve():
        raise CompressorError(f"exporting .keras into {out} would overwrite the input model; choose another --out")
    ensure_dir(out)
    with stdout_to_stderr():
        keras_model = load_model(model, custom_objects)
        shape = single_input_shape(keras_model)[1:]
        dataset = load_data(data, input_shape=shape) if data else None
        x = verification_inputs(keras_model, dataset, samples)
        checks = export_and_verify(keras_model, out, wanted, x, atol=atol, opset=opset, stem=Path(model).stem)
    if json_out:
        print_json({"artifacts": [check.to_dict() for check in checks]})
    else:
        _render(checks, source="samples of --data" if dataset else "generated inputs")
    ensure_passed(checks)


def _render(checks, source: str) -> None:
    from rich.table import Table

    table = Table(title=f"Artifacts, compared with the Keras model on {checks[0].samples} {source}")
    for column in ("format", "path", "size", "max |diff|", "top-1 agreement", "parity"):
        numeric = column in ("size", "max |diff|", "top-1 agreement")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)
    for check in checks:
        agreement = "n/a" if check.top1_agreement is None else f"{check.top1_agreement:.2%}"
        verdict = "[green]ok[/]" if check.passed else f"[red]over atol {check.atol:g}[/]"
        table.add_row(check.format, check.path, human_bytes(check.bytes), f"{check.max_abs_diff:.2e}", agreement, verdict)
    console.print(table)
