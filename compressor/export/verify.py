"""Load every written artifact back and compare it with the Keras model on real inputs.

TFLite runs in the LiteRT interpreter and ONNX in onnxruntime (the runtimes users
deploy with); the `.keras` file is reloaded with Keras. Parity is the largest absolute
difference of the outputs, plus top-1 agreement for classifiers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np

from compressor.bench.runtime import open_artifact
from compressor.errors import ExportError, VerificationError
from compressor.export.writers import SUFFIXES, export_keras, export_onnx, export_tflite, single_input_shape
from compressor.io.data import Dataset

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
        atol: Tolerance on max_abs_diff.
    """

    format: str
    path: str
    bytes: int
    max_abs_diff: float
    top1_agreement: Optional[float]
    samples: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        out = asdict(self)
        out["max_abs_diff"] = self.max_abs_diff if math.isfinite(self.max_abs_diff) else None
        out["passed"] = self.passed
        return out

    def describe(self) -> str:
        agreement = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.2%}"
        return (
            f"{self.format} artifact {self.path} differs from the Keras model by "
            f"max_abs_diff={self.max_abs_diff:.3g} (atol {self.atol:g}), "
            f"top-1 agreement {agreement} on {self.samples} samples"
        )


def verification_inputs(
    model: keras.Model, data: Optional[Dataset], samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> np.ndarray:
    """Inputs to compare on: the first samples of the data, or seeded generated ones.

    Raises:
        ExportError: No data and an input shape with free dimensions besides the batch.
    """
    if samples < 1:
        raise ExportError(f"need at least 1 verification sample, got {samples}")
    shape = single_input_shape(model)[1:]
    if data is not None:
        return data.x[:samples]
    if any(d is None for d in shape):
        raise ExportError(
            f"the model input {tuple(shape)} has free dimensions; pass --data so artifacts "
            "can be checked on real inputs"
        )
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, *shape)).astype(np.float32)


def keras_outputs(model: keras.Model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's outputs in inference mode, in batches."""
    parts = [np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts, axis=0)


def compare(
    fmt: str, path: Path, expected: np.ndarray, got: np.ndarray, atol: float
) -> ArtifactCheck:
    """Build the parity record of two output arrays."""
    got = np.asarray(got, dtype=np.float64).reshape(expected.shape)
    diff = np.abs(got - expected)
    max_diff = float(diff.max()) if np.all(np.isfinite(diff)) else math.inf
    agreement = None
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    return ArtifactCheck(fmt, str(path), path.stat().st_size, max_diff, agreement, len(expected), atol)


def artifact_outputs(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Run an artifact on x with the runtime that format deploys with."""
    if fmt == "keras":
        return keras_outputs(keras.saving.load_model(path, compile=False), x)
    return open_artifact(path, threads=0).predict(x)


def export_and_verify(
    model: keras.Model,
    out_dir: Path,
    formats: Sequence[str],
    x: np.ndarray,
    *,
    atol: float = DEFAULT_ATOL,
    opset: int = 17,
    stem: str = "model",
    sparse_tflite: bool = False,
) -> list[ArtifactCheck]:
    """Write each format into out_dir and check it against the model.

    Args:
        model: The Keras model.
        out_dir: Output folder (created if missing).
        formats: Names from `writers.FORMATS`.
        x: Inputs to compare on.
        atol: Tolerance on the largest absolute output difference.
        opset: ONNX opset.
        stem: File name without suffix.
        sparse_tflite: Store mostly-zero TFLite weights sparsely (see `export_tflite`).

    Returns:
        One check per format, in order.

    Raises:
        ExportError: A conversion failed.
    """
    if not atol >= 0:
        raise ExportError(f"atol must be >= 0, got {atol}")
    single_input_shape(model)
    expected = keras_outputs(model, x).astype(np.float64)
    checks = []
    for fmt in formats:
        path = Path(out_dir) / f"{stem}{SUFFIXES[fmt]}"
        if fmt == "onnx":
            written = export_onnx(model, path, opset=opset)
        elif fmt == "tflite":
            written = export_tflite(model, path, sparse=sparse_tflite)
        else:
            written = export_keras(model, path)
        checks.append(compare(fmt, written, expected, artifact_outputs(fmt, written, x), atol))
    return checks


def ensure_passed(checks: Sequence[ArtifactCheck]) -> None:
    """Raise VerificationError naming every artifact outside tolerance, with its numbers."""
    failed = [check for check in checks if not check.passed]
    if failed:
        raise VerificationError("; ".join(check.describe() for check in failed))
