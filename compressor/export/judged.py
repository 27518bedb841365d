"""Per-sample metric values of a model's quantized artifact: what the guard judges under `--quantize`.

A run that ships a quantized file is judged on it: `status` counts the quantized
artifact's held-out drop. So the guard (`compressor.pipeline.acceptance`), which
accepts each model before anything is exported, measures the same file: each model it
is shown is quantized as the export will quantize it (same mode, calibration samples
and I/O type), into a temporary folder, and run with the runtime it deploys with. The
confidence bound then covers the quantization error too, instead of leaving it to the
held-out measurement after the search. The channel search checks its steps on the
same file (`compressor.search.channel_search`, `judge`). For a Fashion-MNIST ResNet-20,
converting to int8 and running 6,000 images took 7.7–14.1 s, where Keras took 10.3–10.5 s
for the same images. A step that holds on the search data is shown to the guard
unchanged, so the judge keeps its last file and converts again only for another model
or other weights (`QuantizedJudge.artifact`, by `model_fingerprint`): one conversion per step, not two.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from compressor.errors import ExportError
from compressor.export.quantize import QUANTIZED_FORMATS, parse_quantize, quantized_name
from compressor.io.fingerprint import model_fingerprint

if TYPE_CHECKING:
    import keras

    from compressor.io.data import Dataset
    from compressor.metrics import Metric


@dataclass(frozen=True)
class QuantizedJudge:
    """How to make and read a model's quantized artifact.

    Attributes:
        fmt: "tflite" or "onnx".
        mode: "dynamic", "float16" or "int8" (`compressor.export.quantize`).
        calibration: The int8 calibration samples (None for the other modes).
        int8_io: TFLite int8 with int8 input and output tensors.
    """

    fmt: str
    mode: str
    calibration: Optional[np.ndarray] = None
    int8_io: bool = False
    _last: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fmt not in QUANTIZED_FORMATS:
            raise ExportError(f"Invalid format. Expected one of {QUANTIZED_FORMATS}. Received: fmt={self.fmt!r}")
        if parse_quantize(self.mode) == "none":
            raise ExportError("a quantized artifact needs a quantization mode other than 'none'")

    @property
    def name(self) -> str:
        """The artifact's file name in a run's output ("model.int8.tflite")."""
        return quantized_name("model", self.mode, f".{self.fmt}")

    def values(self, model: keras.Model, data: Dataset, metric: Metric) -> np.ndarray:
        """Per sample of `data`, the metric's value for the model's quantized artifact (`Metric.values`).

        Raises:
            ExportError: The model does not convert or quantize.
        """
        from compressor.bench.runtime import open_artifact
        from compressor.bench.scoring import read_output

        # Not `bench.scoring.score_artifacts`: under the agreement metric it relabels the data with the
        # artifact's own classes, where the guard compares with the original's (already in `data.y`).
        runner = open_artifact(self.artifact(model), threads=0)
        outputs = runner.predict_outputs(data.x)
        name = read_output(runner.output_names, outputs, metric, data.output)
        chosen = outputs[name] if name is not None else next(iter(outputs.values()))
        return metric.values(np.asarray(chosen).reshape(len(data), -1), data.y)

    def artifact(self, model: keras.Model) -> Path:
        """The model's quantized file, converted once per model and weights: the last one is kept.

        Raises:
            ExportError: The model does not convert or quantize.
        """
        key = (id(model), model_fingerprint(model))
        if self._last.get("key") != key:
            if "folder" not in self._last:  # setdefault would make (and drop) a new directory on every call
                self._last["folder"] = tempfile.TemporaryDirectory(prefix="compressor-judge-")
            folder = self._last["folder"]
            self._last.pop("key", None)
            self._last["path"] = self._write(model, Path(folder.name))
            self._last["key"] = key
        return self._last["path"]

    def _write(self, model: keras.Model, folder: Path) -> Path:
        from compressor.export.quantize import export_onnx_quantized, export_tflite_quantized
        from compressor.export.writers import export_onnx

        path = folder / self.name
        if self.fmt == "tflite":
            return export_tflite_quantized(model, path, self.mode, self.calibration, int8_io=self.int8_io)
        float_onnx = export_onnx(model, folder / "model.onnx")
        return export_onnx_quantized(float_onnx, path, self.mode, self.calibration)


def judged_format(formats: Sequence[str]) -> Optional[str]:
    """The quantized format the guard judges among the exported `formats`: TFLite first, else ONNX, else None."""
    return next((fmt for fmt in ("tflite", "onnx") if fmt in formats), None)

