"""The building blocks from Python: inspect a model, export it with parity checks, time the artifacts.

    python examples/python_api.py example/model.keras example/val.npz build/

Models and data may be files or objects (a keras.Model; (x, y) arrays, as here, or a
tf.data.Dataset). The calls return data (dataclasses and report dicts); printing is up to you.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import compressor


def main(model_path: str, data_path: str, out_dir: str) -> None:
    inspection = compressor.inspect(model_path)
    print(f"{inspection.model}: {inspection.params:,} params, {inspection.flops / 1e6:.1f} MFLOPs")
    for layer in inspection.layers[:5]:
        print(f"  {layer.name}: {layer.params:,} params, techniques {', '.join(layer.techniques) or '-'}")

    with np.load(data_path) as arrays:
        data = (arrays["x"], arrays["y"])
    # Raises VerificationError with the numbers if any artifact drifted from the model.
    checks = compressor.export_model(model_path, out_dir, formats=("tflite", "onnx"), data=data, atol=1e-4)
    for check in checks:
        print(json.dumps(check.to_dict()))

    run = compressor.benchmark([check.path for check in checks], data=data, runs=50, warmup=5)
    for result in run.report["results"]:
        print(f"{result['path']}: median {result['latency_ms']['median']:.3f} ms, accuracy {result['accuracy']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
