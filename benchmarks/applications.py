"""Inspect, export and benchmark Keras application architectures (weights=None).

    python benchmarks/applications.py [--size 224] [--runs 30] > benchmarks/applications.md

For each architecture: parameter total of `compressor inspect` against
`model.count_params()`, FLOPs, export time, parity of the TFLite and ONNX artifacts
(on 8 seeded inputs in the models' [-1, 1] or [0, 255] range), file sizes, and batch-1
latency of both artifacts measured in one interleaved run (1 thread).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

APPLICATIONS = ("MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121")


def run(name: str, size: int, runs: int, out: Path) -> str:
    import keras

    from compressor.bench.benchmark import benchmark
    from compressor.export.verify import export_and_verify
    from compressor.graph.cost import model_cost

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    cost = model_cost(model)
    x = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    if name != "EfficientNetB0":  # EfficientNet rescales inside the model
        x = x / 127.5 - 1.0
    start = time.perf_counter()
    checks = export_and_verify(model, out, ("tflite", "onnx"), x, atol=1e-4, stem=name)
    export_s = time.perf_counter() - start
    bench = benchmark([c.path for c in checks], runs=runs, warmup=3, threads=1)
    tfl, onx = bench.results
    return (
        f"| {name} | {cost.params:,} | {'yes' if cost.params == model.count_params() else 'NO'} "
        f"| {cost.flops / 1e9:.2f} | {export_s:.0f} "
        f"| {checks[0].max_abs_diff:.1e} | {checks[1].max_abs_diff:.1e} "
        f"| {checks[0].bytes / 2**20:.1f} | {checks[1].bytes / 2**20:.1f} "
        f"| {tfl.latency_ms.median:.1f} ± {tfl.latency_ms.p90 - tfl.latency_ms.median:.1f} "
        f"| {onx.latency_ms.median:.1f} ± {onx.latency_ms.p90 - onx.latency_ms.median:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", default=",".join(APPLICATIONS))
    args = parser.parse_args()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"input {args.size}×{args.size}×3, batch 1, 1 thread, {args.runs} interleaved runs.\n")
    print("| model | params | = count_params | GFLOPs | export s | TFLite max diff | ONNX max diff "
          "| TFLite MiB | ONNX MiB | TFLite ms (median ± to p90) | ONNX ms (median ± to p90) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(run(name, args.size, args.runs, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
