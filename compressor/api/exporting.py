"""`compressor.export_model`: write TFLite/ONNX/Keras artifacts and prove they match the model.

    checks = compressor.export_model("model.keras", "build", formats=("tflite", "onnx"), data="val.npz")
    for check in checks:
        print(check.path, check.max_abs_diff, check.passed)

(`compressor.export` is the package of the writers, so the call has a name of its own.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from compressor.api.inputs import as_dataset, as_model, is_path
from compressor.errors import OptionError

if TYPE_CHECKING:
    from compressor.export.verify import ArtifactCheck

FORMATS = ("tflite", "onnx", "keras")


def check_export(model: Any, data: Any, quantize: str, int8_io: bool) -> str:
    """Refuse, before TensorFlow loads, a request that cannot work; return the quantization mode.

    Args:
        model, data, quantize, int8_io: As `export_model` takes them.

    Raises:
        OptionError: int8 I/O without int8 quantization, or int8 without data to calibrate on.
        ExportError: An unknown quantization mode.
        ModelLoadError, DataError: A model or data path that is missing or damaged.
    """
    from compressor.export.quantize import parse_quantize
    from compressor.io.data import check_data_spec
    from compressor.io.model_files import check_model_path

    mode = parse_quantize(quantize)
    if int8_io and mode != "int8":
        raise OptionError("{int8_io} needs {quantize} int8. Received: quantize={mode!r}", mode=mode)
    if mode == "int8" and data is None:
        raise OptionError("{quantize} int8 calibrates on real inputs: pass {data}")
    if is_path(model):
        check_model_path(Path(model))
    if is_path(data):
        check_data_spec(data, "data")
    return mode


def export_model(
    model: Any,
    out: str | Path,
    formats: str | Sequence[str] = FORMATS,
    *,
    data: Any = None,
    samples: int = 64,
    atol: float = 1e-4,
    opset: int = 17,
    quantize: str = "none",
    calibration_samples: int = 200,
    int8_io: bool = False,
    custom_objects: Sequence[str] = (),
    allow_model_code: bool = False,
    strict: bool = True,
) -> tuple[ArtifactCheck, ...]:
    """Export a model, load each artifact back and compare its outputs with the model's.

    Args:
        model: A keras.Model (Functional or Sequential), or the path of a model file.
        out: Output folder (created if missing); files are named after the model file
            (or the model's name).
        formats: "tflite", "onnx", "keras": a sequence or "tflite,onnx".
        data: Inputs to compare on (and to calibrate int8 on): a path, a hook, (x, y)
            arrays, x alone or a tf.data.Dataset; None compares on generated inputs.
        samples: How many inputs to compare on.
        atol: Largest absolute output difference a float artifact may show.
        opset: ONNX opset.
        quantize: Also write quantized tflite/onnx artifacts: "none", "dynamic", "float16", "int8".
        calibration_samples: Samples of `data` that calibrate int8.
        int8_io: With int8: the TFLite artifact takes and returns int8 tensors.
        custom_objects: Modules to import first, which register custom layers (for a path).
        allow_model_code: Run code stored in the model file; only for files you trust.
        strict: Raise when a float artifact is outside `atol` (the artifacts stay written).

    Returns:
        One `compressor.export.verify.ArtifactCheck` per artifact (`to_dict()` is what
        `compressor export --json` lists), float ones first.

    Raises:
        OptionError: Options that cannot work together.
        VerificationError: With `strict`, an artifact outside tolerance (or with non-finite outputs).
        CompressorError: The model, data or a conversion failed (subclasses say which).
    """
    mode = check_export(model, data, quantize, int8_io)
    from compressor.export.quantize import QUANTIZED_FORMATS, calibration_set
    from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs
    from compressor.export.writers import parse_formats
    from compressor.graph.signature import sample_shapes
    from compressor.io.atomic import ensure_dir

    wanted = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    if mode != "none" and not set(QUANTIZED_FORMATS) & set(wanted):
        raise OptionError("{quantize} {mode} quantizes tflite and onnx artifacts; {formats} {names} has neither",
                          mode=mode, names=",".join(wanted))
    if is_path(model) and "keras" in wanted and (Path(out) / f"{Path(model).stem}.keras").resolve() == Path(model).resolve():
        raise OptionError("exporting .keras into {folder} would overwrite the input model; choose another {out}", folder=out)
    ensure_dir(out)
    keras_model = as_model(model, custom_objects, allow_model_code)
    dataset = as_dataset("data", data, sample_shapes(keras_model))
    checks = export_and_verify(
        keras_model, Path(out), wanted, verification_inputs(keras_model, dataset, samples), atol=atol, opset=opset,
        stem=Path(model).stem if is_path(model) else keras_model.name, quantize=mode,
        calibration=calibration_set(dataset.x, calibration_samples) if mode == "int8" else None,
        int8_io=int8_io, allow_model_code=allow_model_code,
    )
    if strict:
        ensure_passed(checks)
    return tuple(checks)
