"""Load every written artifact back and compare it with the Keras model on real inputs.

TFLite runs in the LiteRT interpreter and ONNX in onnxruntime (the runtimes users
deploy with); the `.keras` file is reloaded with Keras. Parity is the largest absolute
difference of the outputs, plus top-1 agreement for classifiers. A model with several
outputs is compared output by output, matched by name: the check holds the largest
difference over all outputs and each output's own.

Quantized artifacts (`quantize` other than "none") are checked too, but their
quantization error is by design: they pass when their outputs are finite, and their
real check is accuracy on held-out data.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import keras
import numpy as np

from compressor.bench.runtime import open_artifact
from compressor.errors import ExportError, VerificationError
from compressor.export.quantize import (
    QUANTIZED_FORMATS,
    check_calibration_shape,
    check_quantize_options,
    export_onnx_quantized,
    export_tflite_quantized,
    quantized_name,
)
from compressor.export.writers import SUFFIXES, export_keras, export_onnx, export_tflite, single_input_shape
from compressor.graph.signature import output_names, sample_shapes
from compressor.io.data import Dataset, Samples, sample_count, sample_rows

DEFAULT_ATOL = 1e-4
DEFAULT_SAMPLES = 64


@dataclass(frozen=True)
class ArtifactCheck:
    """How one artifact compares with the Keras model it came from.

    Attributes:
        format: "tflite", "onnx" or "keras".
        path: The artifact file.
        bytes: File size.
        max_abs_diff: Largest absolute output difference (inf if the artifact gave NaN/inf).
        top1_agreement: Fraction of samples with the same argmax; None when the output
            is not a class-score vector.
        samples: Number of inputs compared.
        atol: Tolerance on max_abs_diff (float artifacts only).
        quantize: "none" for a float artifact, else its quantization mode.
        output_diffs: For a model with several outputs, each output's largest absolute
            difference, by output name; None for one output.
    """

    format: str
    path: str
    bytes: int
    max_abs_diff: float
    top1_agreement: Optional[float]
    samples: int
    atol: float
    quantize: str = "none"
    output_diffs: Optional[dict[str, float]] = None

    @property
    def quantized(self) -> bool:
        """Whether this is a quantized artifact."""
        return self.quantize != "none"

    @property
    def passed(self) -> bool:
        """Float artifacts: within atol. Quantized ones: finite outputs (their error is by design)."""
        if self.quantized:
            return math.isfinite(self.max_abs_diff)
        return self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        out = asdict(self)
        out["max_abs_diff"] = self.max_abs_diff if math.isfinite(self.max_abs_diff) else None
        out["passed"] = self.passed
        if self.output_diffs is None:
            del out["output_diffs"]
        else:
            out["output_diffs"] = {k: v if math.isfinite(v) else None for k, v in self.output_diffs.items()}
        return out

    def describe(self) -> str:
        agreement = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.2%}"
        if self.quantized:
            kind = f"{self.quantize}-quantized {self.format}"
            bound = "not held to atol" if self.passed else "non-finite outputs"
        else:
            kind, bound = self.format, f"atol {self.atol:g}"
        per_output = "" if self.output_diffs is None else " (" + ", ".join(
            f"{name} {diff:.3g}" for name, diff in self.output_diffs.items()) + ")"
        return (
            f"{kind} artifact {self.path} differs from the Keras model by "
            f"max_abs_diff={self.max_abs_diff:.3g}{per_output} ({bound}), "
            f"top-1 agreement {agreement} on {self.samples} samples"
        )


def verification_inputs(
    model: keras.Model, data: Optional[Dataset], samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> Samples:
    """Inputs to compare on: the first samples of the data, or seeded generated ones (one array per input).

    Raises:
        ExportError: No data and an input shape with free dimensions besides the batch.
    """
    if samples < 1:
        raise ExportError(f"need at least 1 verification sample, got {samples}")
    if data is not None:
        return sample_rows(data.x, slice(0, samples))
    shapes = sample_shapes(model)
    named = shapes if isinstance(shapes, dict) else {"": shapes}
    for shape in named.values():
        if any(d is None for d in shape):
            raise ExportError.naming(
                "the model input {shape} has free dimensions; pass {data} so artifacts can be checked on real inputs",
                shape=tuple(shape),
            )
    rng = np.random.default_rng(seed)
    generated = {name: rng.standard_normal((samples, *shape)).astype(np.float32) for name, shape in named.items()}
    return generated if isinstance(shapes, dict) else generated[""]


def keras_outputs(model: keras.Model, x: Samples, batch_size: int = 64) -> Any:
    """The model's outputs in inference mode, in batches: one array, or a dict output name -> array for several outputs."""
    n = sample_count(x)
    parts = [keras.tree.flatten(model(sample_rows(x, slice(i, i + batch_size)), training=False))
             for i in range(0, n, batch_size)]
    joined = [np.concatenate([np.asarray(part[k]) for part in parts], axis=0) for k in range(len(parts[0]))]
    if len(joined) == 1:
        return joined[0]
    return dict(zip(output_names(model), joined))


def compare(
    fmt: str, path: Path, expected: Any, got: Any, atol: float, quantize: str = "none"
) -> ArtifactCheck:
    """Build the parity record of two outputs: arrays, or dicts output name -> array (matched by name)."""
    if not isinstance(expected, dict):
        max_diff, agreement = _difference(np.asarray(expected, dtype=np.float64), got)
        return ArtifactCheck(fmt, str(path), path.stat().st_size, max_diff, agreement, len(expected), atol, quantize)
    missing = [name for name in expected if name not in got]
    if missing:
        raise ExportError(f"{path.name} has no output named {missing[0]!r} (it has {', '.join(got)}); "
                          f"expected the model's outputs {', '.join(expected)}")
    diffs, agreement = {}, None
    for name, values in expected.items():
        diffs[name], output_agreement = _difference(np.asarray(values, dtype=np.float64), got[name])
        agreement = output_agreement if agreement is None else agreement
    samples = len(next(iter(expected.values())))
    return ArtifactCheck(fmt, str(path), path.stat().st_size, max(diffs.values()), agreement, samples, atol,
                         quantize, output_diffs=diffs)


def _difference(expected: np.ndarray, got: Any) -> tuple[float, Optional[float]]:
    """Largest absolute difference (inf when not finite), and top-1 agreement for class scores."""
    got = np.asarray(got, dtype=np.float64).reshape(expected.shape)
    diff = np.abs(got - expected)
    max_diff = float(diff.max()) if np.all(np.isfinite(diff)) else math.inf
    agreement = None
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    return max_diff, agreement


def artifact_outputs(fmt: str, path: Path, x: Samples, allow_model_code: bool = False) -> Any:
    """Run an artifact on x with the runtime that format deploys with (a dict by output name for several outputs).

    `allow_model_code` reloads a `.keras` artifact with Keras' safe mode off, for a
    model whose code (a Lambda layer's function) its loader allowed.
    """
    if fmt == "keras":
        return keras_outputs(keras.saving.load_model(path, compile=False, safe_mode=not allow_model_code), x)
    runner = open_artifact(path, threads=0)
    if len(runner.output_names) > 1:
        return runner.predict_outputs(x)
    return runner.predict(x)


def export_and_verify(
    model: keras.Model,
    out_dir: Path,
    formats: Sequence[str],
    x: Samples,
    *,
    atol: float = DEFAULT_ATOL,
    opset: int = 17,
    stem: str = "model",
    sparse_tflite: bool = False,
    quantize: str = "none",
    calibration: Optional[np.ndarray] = None,
    int8_io: bool = False,
    allow_model_code: bool = False,
    expected: Optional[np.ndarray] = None,
    seconds: Optional[dict[str, float]] = None,
) -> list[ArtifactCheck]:
    """Write each format into out_dir and check it against the model.

    With `quantize`, each TFLite and ONNX format also gets a quantized artifact
    `{stem}.{quantize}.tflite|onnx`, written after all float ones (the ONNX one is
    quantized from the float ONNX file). `.keras` has no quantized form.

    Args:
        model: The Keras model.
        out_dir: Output folder (created if missing).
        formats: Names from `writers.FORMATS`.
        x: Inputs to compare on.
        atol: Tolerance on the largest absolute output difference.
        opset: ONNX opset.
        stem: File name without suffix.
        sparse_tflite: Store mostly-zero TFLite weights sparsely (see `export_tflite`).
        quantize: "none", "dynamic", "float16" or "int8" (see `compressor.export.quantize`).
        calibration: Real inputs that calibrate int8 activation ranges (e.g. from
            `quantize.calibration_set`); needed for int8, ignored otherwise.
        int8_io: With int8, the TFLite artifact takes and returns int8 tensors.
        allow_model_code: The model holds Python code its loader allowed (e.g. a
            Lambda layer): reload the `.keras` artifact with Keras' safe mode off.
        expected: The model's outputs on x (`keras_outputs`), when the caller has
            them already (several calls on one model); default: computed here.
        seconds: Where to add the wall time spent "writing" (converting and
            writing the artifacts) and on "verification" (the Keras outputs, and
            running each artifact back).

    Returns:
        One check per format, in order, then one per quantized artifact.

    Raises:
        ExportError: A conversion failed, or bad quantization options (checked
            before anything is written).
    """
    if not atol >= 0:
        raise ExportError(f"atol must be >= 0, got {atol}")
    mode = check_quantize_options(quantize, calibration, int8_io)
    if mode != "none":
        shape = single_input_shape(model)
        if mode == "int8":
            check_calibration_shape(calibration, shape[1:])
    clock = _Clock(seconds)
    with clock("verification"):
        expected = _as_float64(keras_outputs(model, x) if expected is None else expected)
    checks = []
    for fmt in formats:
        path = Path(out_dir) / f"{stem}{SUFFIXES[fmt]}"
        with clock("writing"):
            if fmt == "onnx":
                written = export_onnx(model, path, opset=opset)
            elif fmt == "tflite":
                written = export_tflite(model, path, sparse=sparse_tflite)
            else:
                written = export_keras(model, path)
        with clock("verification"):
            outputs = artifact_outputs(fmt, written, x, allow_model_code=allow_model_code)
            checks.append(compare(fmt, written, expected, outputs, atol))
    if mode == "none":
        return checks
    for fmt in (f for f in formats if f in QUANTIZED_FORMATS):
        path = Path(out_dir) / quantized_name(stem, mode, SUFFIXES[fmt])
        with clock("writing"):
            if fmt == "onnx":
                written = export_onnx_quantized(Path(out_dir) / f"{stem}.onnx", path, mode, calibration)
            else:
                written = export_tflite_quantized(model, path, mode, calibration, int8_io=int8_io)
        with clock("verification"):
            checks.append(compare(fmt, written, expected, artifact_outputs(fmt, written, x), atol, quantize=mode))
    return checks


def _as_float64(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {name: np.asarray(values, dtype=np.float64) for name, values in outputs.items()}
    return np.asarray(outputs).astype(np.float64)


class _Clock:
    """Adds the wall time of `with clock(name):` blocks to `seconds[name]` (nothing when seconds is None)."""

    def __init__(self, seconds: Optional[dict[str, float]]) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.seconds is not None:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def ensure_passed(checks: Sequence[ArtifactCheck]) -> None:
    """Raise VerificationError naming every artifact outside tolerance, with its numbers."""
    failed = [check for check in checks if not check.passed]
    if failed:
        raise VerificationError("; ".join(check.describe() for check in failed))
