"""Quantized artifacts of the built-in examples: size, held-out accuracy and latency per mode.

    python benchmarks/quantization.py [--work DIR] [--examples digits-resnet20,digits-mobilenet]
        [--runs 200] [--calibration-samples 200]

For each example, the original model and its channel-pruned, fine-tuned version (one
`compress --techniques channels --finetune-epochs 3 --max-acc-loss 0.02` run, made once
and kept in --work) are exported float and in each quantization mode, calibrated on
train.npz. All TFLite files of one example are timed in one interleaved run (batch 1,
1 thread), the ONNX files in another, and every file's top-1 accuracy is measured on
test.npz, which neither the search nor the calibration saw.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODES = ("none", "dynamic", "float16", "int8")


def ensure_models(name: str, work: Path) -> tuple[Path, Path]:
    folder = work / name
    if not (folder / "model.keras").exists():
        subprocess.run([sys.executable, "-m", "compressor", "example", name, "--out", str(folder)], check=True)
    compressed = work / f"{name}-channels"
    if not (compressed / "model.keras").exists():
        subprocess.run(
            [sys.executable, "-m", "compressor", "compress", str(folder / "model.keras"),
             "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
             "--train-data", str(folder / "train.npz"), "--method", "fixed_loss", "--max-acc-loss", "0.02",
             "--techniques", "channels", "--finetune-epochs", "3", "--export", "keras", "--overwrite",
             "--cache-dir", str(work / "cache"), "--out", str(compressed), "--quiet"],
            check=False,  # exit 2 (budget missed on held-out data) still leaves a model to quantize
        )
    return folder / "model.keras", compressed / "model.keras"


def export_all(model_path: Path, out: Path, calibration, x) -> list:
    from compressor.export.verify import export_and_verify
    from compressor.io.models import load_model

    model = load_model(model_path)
    checks = []
    for mode in MODES[1:]:
        made = export_and_verify(model, out, ("tflite", "onnx"), x, quantize=mode, calibration=calibration)
        checks += made if not checks else made[2:]  # the float files once
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_work"))
    parser.add_argument("--examples", default="digits-resnet20,digits-mobilenet")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--calibration-samples", type=int, default=200)
    args = parser.parse_args()

    from compressor.bench.benchmark import benchmark
    from compressor.export.quantize import calibration_set
    from compressor.io.data import load_data

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"batch 1, 1 thread, {args.runs} interleaved runs after 20 warm-up; accuracy on test.npz.\n")
    for name in args.examples.split(","):
        original, compressed = ensure_models(name, args.work)
        test = load_data(str(original.parent / "test.npz"))
        train = load_data(str(original.parent / "train.npz"))
        calibration = calibration_set(train.x, args.calibration_samples, seed=0)
        rows = []
        for label, path in (("original", original), ("channels + fine-tuning", compressed)):
            out = args.work / f"{name}-quantized" / label.split()[0]
            for check in export_all(path, out, calibration, test.x[:64]):
                rows.append((label, check))
        print(f"### {name}\n")
        print("| model | format | quantize | size KiB | top-1 (test) | max abs diff | median ms | p90 ms | × original float |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for fmt in ("tflite", "onnx"):
            mine = [(label, check) for label, check in rows if check.format == fmt]
            report = benchmark([check.path for _, check in mine], data=test, runs=args.runs, warmup=20, threads=1)
            for (label, check), result in zip(mine, report.results):
                lat = result.latency_ms
                print(f"| {label} | {fmt} | {check.quantize} | {check.bytes / 1024:.1f} | {result.accuracy:.2%} | "
                      f"{check.max_abs_diff:.2g} | {lat.median:.3f} | {lat.p90:.3f} | {result.ratio_to_first:.2f} |")
        print()


if __name__ == "__main__":
    main()
