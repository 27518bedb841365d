"""compressor: smaller, faster, verified edge artifacts from trained Keras models.

The public Python API is what `__all__` lists:

    import compressor

    result = compressor.compress(model, data=(x, y), method="fixed_params", compression_factor=0.5, out="build")
    result.model, result.report, result.artifacts["tflite"]

    compressor.inspect(model)                               # per-layer params, FLOPs, techniques
    compressor.export_model(model, "build", data=(x, y))    # artifacts, loaded back and compared
    compressor.benchmark(["a.tflite", "b.tflite"], data=(x, y))   # interleaved latency, accuracy

Importing this package is cheap: each name is imported on first use, and TensorFlow
only by the calls that need it (loading, analysis, export), never by the CLI entry
point or by the benchmark runtime, which must run on boards without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "compress": "compressor.api.compressing",
    "CompressResult": "compressor.api.compressing",
    "CompressOptions": "compressor.config",
    "inspect": "compressor.api.inspecting",
    "Inspection": "compressor.api.inspecting",
    "export_model": "compressor.api.exporting",
    "benchmark": "compressor.api.benchmarking",
    "BenchRun": "compressor.api.benchmarking",
    "Dataset": "compressor.io.data",
    "CompressorError": "compressor.errors",
    "OptionError": "compressor.errors",
    "ModelLoadError": "compressor.errors",
    "DataError": "compressor.errors",
    "ExportError": "compressor.errors",
    "VerificationError": "compressor.errors",
}
"""Each public name and the module that defines it."""

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
