"""Quantized TFLite and ONNX artifacts: dynamic-range, float16 and full-integer int8.

    export_tflite_quantized(model, "model.int8.tflite", "int8", calibration=x[:200])
    export_onnx_quantized("model.onnx", "model.int8.onnx", "int8", calibration=x[:200])

Modes:
    dynamic: int8 weights, float activations (quantized on the fly by the kernels).
    float16: float16 weights; runtimes compute in float32 or float16.
    int8:    int8 weights and activations, with activation ranges calibrated on real
             inputs. TFLite can also take and return int8 tensors (`int8_io`).

TFLite goes through the TFLite converter's Keras path, like `writers.export_tflite`;
ONNX starts from the float ONNX file and uses `onnxruntime.quantization`. Quantization
error is by design, so these artifacts are judged by accuracy on held-out data, not
by parity with the Keras model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from compressor.errors import ExportError, first_line
from compressor.io.atomic import atomic_path, write_bytes_atomic
from compressor.quiet import muted_stderr

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
QUANTIZED_FORMATS = ("tflite", "onnx")
DEFAULT_CALIBRATION_SAMPLES = 200


def parse_quantize(value: str) -> str:
    """Normalize a quantization mode name.

    Args:
        value: One of `QUANTIZE_MODES`, in any case.

    Returns:
        The lower-case mode.

    Raises:
        ExportError: An unknown mode.
    """
    mode = str(value).strip().lower()
    if mode not in QUANTIZE_MODES:
        raise ExportError(
            f"Invalid quantization mode. Expected one of {QUANTIZE_MODES}. Received: quantize={value!r}"
        )
    return mode


def check_quantize_options(mode: str, calibration: Optional[np.ndarray], int8_io: bool) -> str:
    """Validate a mode with its calibration data and I/O choice before anything is written.

    Returns:
        The normalized mode.

    Raises:
        ExportError: Unknown mode, int8 without calibration data, or `int8_io` with a
            mode other than int8.
    """
    mode = parse_quantize(mode)
    if int8_io and mode != "int8":
        raise ExportError(f"int8 input/output tensors need quantize='int8'. Received: quantize={mode!r}")
    if mode == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError("int8 quantization calibrates on real inputs: pass data (no calibration samples given)")
    return mode


def calibration_set(x: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """A seeded random subset of rows to calibrate int8 activation ranges on.

    Args:
        x: Inputs, batch first.
        samples: Rows to keep; all rows when there are fewer.
        seed: Seed of the choice.

    Returns:
        The chosen rows, in their original order.

    Raises:
        ExportError: samples < 1, or x has no rows.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ExportError(f"Invalid calibration samples. Expected an integer >= 1. Received: samples={samples!r}")
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise ExportError(f"no calibration samples: the data has shape {x.shape}")
    if samples >= len(x):
        return x
    rows = np.random.default_rng(seed).choice(len(x), size=samples, replace=False)
    return x[np.sort(rows)]


def quantized_name(stem: str, mode: str, suffix: str) -> str:
    """File name of a quantized artifact: ("model", "int8", ".tflite") -> "model.int8.tflite".

    Mode "none" names the float artifact ("model.tflite").
    """
    mode = parse_quantize(mode)
    suffix = suffix if suffix.startswith(".") else f".{suffix}"
    return f"{stem}{suffix}" if mode == "none" else f"{stem}.{mode}{suffix}"


def export_tflite_quantized(
    model,
    path: Path | str,
    mode: str,
    calibration: Optional[np.ndarray] = None,
    int8_io: bool = False,
) -> Path:
    """Convert a Keras model to a quantized .tflite file (batch 1) and write it atomically.

    Args:
        model: The Keras model (single input, single output).
        path: Where to write.
        mode: "dynamic", "float16" or "int8".
        calibration: Real inputs (batch first) that calibrate the int8 activation
            ranges; needed for int8, ignored otherwise.
        int8_io: With int8, the input and output tensors are int8 too (the runner
            in `compressor.bench.runtime` quantizes float data for them); otherwise
            they stay float32.

    Returns:
        The written path.

    Raises:
        ExportError: Bad options, calibration data of the wrong shape, or the
            converter rejects the model (e.g. an op without an int8 kernel).
    """
    import tensorflow as tf

    from compressor.export.writers import single_input_shape, tflite_model

    mode = _quantized_mode(mode, calibration, int8_io)
    if mode == "int8":
        check_calibration_shape(calibration, single_input_shape(model)[1:])
    try:
        with _quiet_tflite_converter():
            converter = tf.lite.TFLiteConverter.from_keras_model(tflite_model(model))
            _configure_tflite(tf, converter, mode, calibration, int8_io)
            flatbuffer = converter.convert()
    except Exception as exc:
        raise ExportError(f"TFLite {mode} quantization failed: {first_line(exc)}") from exc
    return write_bytes_atomic(path, flatbuffer)


def _configure_tflite(tf, converter, mode: str, calibration: Optional[np.ndarray], int8_io: bool) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        samples = np.asarray(calibration, dtype=np.float32)
        # The converter traces at batch 1, so it calibrates one sample at a time.
        converter.representative_dataset = lambda: ([sample[np.newaxis]] for sample in samples)
        # Builtin int8 ops only: a model that cannot run fully in int8 fails here
        # instead of silently keeping float ops.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8


def export_onnx_quantized(
    float_onnx: Path | str,
    path: Path | str,
    mode: str,
    calibration: Optional[np.ndarray] = None,
) -> Path:
    """Quantize an already written float ONNX file and write the result atomically.

    dynamic: `quantize_dynamic` with int8 weights. int8: `quantize_static` in QDQ
    format, int8 activations and per-channel int8 weights (7-bit range, see
    `_quantize_onnx`), calibrated (min/max) on `calibration`. float16:
    `convert_float_to_float16`, keeping float32 inputs and outputs. The graph is
    pre-processed first (shape inference; leftover BatchNormalization scales folded
    into convolutions) so fewer ops need their own quantization.

    Args:
        float_onnx: The float32 ONNX model (single input).
        path: Where to write.
        mode: "dynamic", "float16" or "int8".
        calibration: Real inputs (batch first); needed for int8, ignored otherwise.

    Returns:
        The written path.

    Raises:
        ExportError: Bad options, a missing or unreadable ONNX file, calibration data
            of the wrong shape, or the quantizer fails.
    """
    import onnx

    mode = _quantized_mode(mode, calibration, False)
    float_onnx = Path(float_onnx)
    try:
        proto = onnx.load(str(float_onnx))
    except Exception as exc:
        raise ExportError(f"cannot read ONNX model {float_onnx}: {first_line(exc)}") from exc
    if any(node.op_type == "If" for node in proto.graph.node):
        raise ExportError(
            f"ONNX {mode} quantization of a gated model is not supported: onnxruntime's quantization tools "
            "leave the weights inside If branches as they are (quantize the TFLite artifact instead)"
        )
    input_name, input_shape = _onnx_input(proto, float_onnx)
    if mode == "int8":
        check_calibration_shape(calibration, input_shape)
    try:
        with _quiet_onnx_quantizer(), tempfile.TemporaryDirectory(prefix="compressor-quant-") as work:
            source = _preprocessed(float_onnx, Path(work) / "preprocessed.onnx")
            with atomic_path(path) as tmp:
                _quantize_onnx(mode, source, tmp, input_name, calibration)
    except Exception as exc:
        raise ExportError(f"ONNX {mode} quantization failed: {first_line(exc)}") from exc
    return Path(path)


def _quantize_onnx(mode: str, source: Path, out: Path, input_name: str, calibration: Optional[np.ndarray]) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
    elif mode == "int8":
        quantize_static(
            str(source),
            str(out),
            _CalibrationReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            # Top-1 agreement with the float model on digits test images (small CNN /
            # MobileNet): per-tensor 8-bit weights 97.5% / 98.9%, per-channel 8-bit
            # 96.1% / 97.2%, per-channel 7-bit 99.4% / 99.4%. 8-bit weights overflow
            # the 16-bit pair sums of x86 AVX2 int8 kernels (CPUs without VNNI:
            # 2 * 255 * 127 > 32767); 7-bit ones cannot, on any CPU.
            per_channel=True,
            reduce_range=True,
        )
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(out))


def _preprocessed(float_onnx: Path, out: Path) -> Path:
    """The float model after onnxruntime's pre-quantization pass, or as it is if that fails.

    The pass is an improvement, not a requirement: the quantizers run its shape
    inference again anyway. Symbolic shape inference (transformer graphs) needs sympy
    and is skipped.
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(float_onnx), str(out), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - fall back to the graph as tf2onnx wrote it
        return float_onnx
    return out


class _CalibrationReader:
    """Feeds calibration samples to onnxruntime's calibrator, one per batch.

    Duck-types `onnxruntime.quantization.CalibrationDataReader` (get_next returning
    a feed dict, then None), so this module loads without onnxruntime.
    """

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._name = input_name
        self._samples = np.asarray(samples, dtype=np.float32)
        self._next = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._next >= len(self._samples):
            return None
        sample = self._samples[self._next : self._next + 1]
        self._next += 1
        return {self._name: sample}

    def __len__(self) -> int:
        return len(self._samples)


def _onnx_input(proto, path: Path) -> tuple[str, tuple[Optional[int], ...]]:
    """Name and per-sample shape (None for symbolic dimensions) of the one graph input."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{path.name} has {len(inputs)} inputs; quantization supports single-input models")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
    return inputs[0].name, shape[1:]


def check_calibration_shape(calibration: np.ndarray, sample_shape: Sequence[Optional[int]]) -> None:
    """Raise ExportError unless every calibration row has the model's per-sample shape.

    Args:
        calibration: Inputs, batch first.
        sample_shape: The model's input shape without the batch; None matches any size.
    """
    got = tuple(np.shape(calibration)[1:])
    expected = tuple(sample_shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        shown = tuple("?" if d is None else d for d in expected)
        raise ExportError(f"calibration samples have shape {got} but the model expects {shown}")


def _quantized_mode(mode: str, calibration: Optional[np.ndarray], int8_io: bool) -> str:
    mode = check_quantize_options(mode, calibration, int8_io)
    if mode == "none":
        raise ExportError("quantize='none' has no quantized artifact; write the float one with writers.export_*")
    return mode


@contextlib.contextmanager
def _quiet_tflite_converter() -> Iterator[None]:
    """Keep the converter's notices off the terminal.

    Keras prints the traced signature to stdout, the calibrator warns that input
    statistics were not given (the representative dataset replaces them), and the
    MLIR quantizer prints its settings to file descriptor 2.
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), muted_stderr():
        warnings.simplefilter("ignore")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        yield


@contextlib.contextmanager
def _quiet_onnx_quantizer() -> Iterator[None]:
    """Keep onnxruntime.quantization's warnings and prints off the terminal.

    It warns through the root logger ("consider pre-processing", which is done),
    and the first `logging.warning` call on an unconfigured root logger installs a
    stderr handler for good; a temporary NullHandler prevents that.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), muted_stderr():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        root.removeHandler(guard)
