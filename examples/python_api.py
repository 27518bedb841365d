"""The library behind the CLI: load, analyse, export with parity checks, benchmark.

    python examples/python_api.py example/model.keras example/val.npz build/

The library returns data (dataclasses with `to_dict()`); printing is up to you.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compressor.bench.benchmark import benchmark
from compressor.export.verify import ensure_passed, export_and_verify
from compressor.graph.cost import model_cost
from compressor.io.data import load_data
from compressor.io.models import load_model


def main(model_path: str, data_path: str, out_dir: str) -> None:
    model = load_model(model_path)
    cost = model_cost(model)
    print(f"{model.name}: {cost.params:,} params, {cost.flops / 1e6:.1f} MFLOPs")

    data = load_data(data_path, input_shape=model.inputs[0].shape[1:])
    checks = export_and_verify(model, Path(out_dir), ("tflite", "onnx"), data.x[:64], atol=1e-4)
    ensure_passed(checks)  # raises VerificationError with the numbers if any artifact drifted
    for check in checks:
        print(json.dumps(check.to_dict()))

    report = benchmark([check.path for check in checks], data=data, runs=50, warmup=5)
    for result in report.results:
        print(f"{result.path}: median {result.latency_ms.median:.3f} ms, accuracy {result.accuracy:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
