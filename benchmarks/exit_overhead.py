"""What an early exit costs in TFLite: one early-exit run's model with its exits set each way; one table.

    python benchmarks/exit_overhead.py RUN_DIR [--runs 300] > table.md

RUN_DIR is the output folder of a `compress ... --techniques ...,early-exit` run that kept
exits (its model.keras and static/model.tflite). The early-exit model is converted as
`compress` exports it with its thresholds set each way: every exit closed (each input
pays every head and condition, then runs the whole network), each exit answering every
input that reaches it, and as calibrated. Those files and the run's static model are timed
interleaved in one run (batch 1, one thread), each call on the next input of the run's
held-out data (`--data`, default: the example's test.npz the run names in its report).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()

    from compressor.bench.benchmark import benchmark
    from compressor.export.writers import export_tflite
    from compressor.io.data import Dataset
    from compressor.io.models import load_model
    from compressor.layers.early_exit import CLOSED, exit_layers
    from compressor.techniques.early_exit import set_thresholds

    report = json.loads((args.run / "report.json").read_text())
    data = args.data or Path(report["options"]["test_data"])
    x = np.load(data)["x"][: args.runs]
    model = load_model(args.run / "model.keras")
    branches = exit_layers(model)
    calibrated = [float(np.asarray(b.threshold)) for b in branches]
    variants = {"every exit closed": [CLOSED] * len(branches), "as calibrated": calibrated}
    for k, branch in enumerate(branches):
        variants[f"exit {k} ({branch.point}) answers all it sees"] = [CLOSED] * k + [0.0] + [CLOSED] * (len(branches) - k - 1)
    with tempfile.TemporaryDirectory(prefix="exit-overhead-") as folder:
        paths = [args.run / "static" / "model.tflite"]
        for i, thresholds in enumerate(variants.values()):
            set_thresholds(model, thresholds)
            paths.append(export_tflite(model, Path(folder) / f"variant{i}.tflite"))
        result = benchmark(paths, data=Dataset(x, None, str(data)), runs=args.runs, warmup=20, threads=1, memory=False)
    static_ms = result.results[0].latency_ms.mean
    print(f"Command: `python benchmarks/exit_overhead.py RUN_DIR --runs {args.runs}`, RUN_DIR the run of "
          f"`--techniques {','.join(report['options']['techniques'])}` ({len(branches)} exits).\n")
    print("| file | mean ms per input | median ms | × static |")
    print("|---|---:|---:|---:|")
    for name, timing in zip(["static model (the run's static/model.tflite)", *variants], result.results):
        print(f"| {name} | {timing.latency_ms.mean:.3f} | {timing.latency_ms.median:.3f} | "
              f"{timing.latency_ms.mean / static_ms:.2f} |")


if __name__ == "__main__":
    main()
