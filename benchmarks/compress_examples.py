"""Compress the built-in examples with both methods at several budgets; print one table.

    python benchmarks/compress_examples.py [--work DIR] [--examples digits-resnet20,digits-mobilenet]

Each row is one `compress` run in a fresh process (sensitivity tables cached per
model, as a user's second run would find them; the first fixed_loss row of a model
pays for them). Accuracy is top-1 of the TFLite artifact on the held-out test split
(test.npz, never seen by the search); latency is the TFLite artifact's median at
batch 1, 1 thread, timed interleaved with the original's TFLite file in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RUNS = [
    ("fixed_loss", ["--max-acc-loss", "0.01"]),
    ("fixed_loss", ["--max-acc-loss", "0.02"]),
    ("fixed_loss", ["--max-acc-loss", "0.05"]),
    ("fixed_params", ["--compression-factor", "0.5"]),
    ("fixed_params", ["--compression-factor", "0.25", "--budget-on", "flops"]),
]


def ensure_example(name: str, work: Path) -> Path:
    folder = work / name
    if not (folder / "model.keras").exists():
        subprocess.run([sys.executable, "-m", "compressor", "example", name, "--out", str(folder)], check=True)
    return folder


def compress(folder: Path, method: str, budget: list[str], out: Path, cache: Path, techniques: str) -> dict:
    command = [
        sys.executable, "-m", "compressor", "compress", str(folder / "model.keras"),
        "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
        "--method", method, *budget, "--techniques", techniques, "--out", str(out),
        "--cache-dir", str(cache), "--runs", "100", "--json", "--overwrite",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 2):
        raise SystemExit(f"compress failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def row(name: str, method: str, budget: list[str], report: dict) -> str:
    base, comp = report["baseline"], report["compressed"]
    tfl = next(a for a in report["artifacts"] if a["format"] == "tflite")
    return (
        f"| {name} | {method} {' '.join(budget).replace('--', '')} | {report['status']} "
        f"| {comp['params'] / base['params']:.2f} | {base['flops'] / comp['flops']:.2f}× "
        f"| {base['accuracy']:.2%} → {comp['accuracy']:.2%} "
        f"| {tfl['baseline_latency_ms']['median']:.3f} → {tfl['latency_ms']['median']:.3f} ({tfl['latency_ratio']:.2f}×) "
        f"| {tfl['baseline_bytes'] / 1024:.0f} → {tfl['bytes'] / 1024:.0f} "
        f"| {report['timings_s']['search']:.0f} | {report['search']['evaluations']} ({report['search']['cached_evaluations']} cached) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--examples", default="digits-resnet20,digits-mobilenet")
    parser.add_argument("--techniques", default="tucker")
    args = parser.parse_args()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"techniques {args.techniques}; TFLite latency at batch 1, 1 thread, 100 interleaved runs.\n"
    )
    print("| example | budget | status | params kept | FLOPs reduction | TFLite test accuracy | TFLite ms (× original) | TFLite KiB | search s | evaluations |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.examples.split(","):
        folder = ensure_example(name, args.work)
        for i, (method, budget) in enumerate(RUNS):
            report = compress(folder, method, budget, args.work / f"{name}-out{i}", args.work / "cache", args.techniques)
            print(row(name, method, budget, report), flush=True)


if __name__ == "__main__":
    main()
