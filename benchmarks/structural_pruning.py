"""Structural pruning on the built-in examples: each criterion and technique, with and without fine-tuning, and tfmot.

    python benchmarks/structural_pruning.py [--work DIR] [--examples digits-resnet20,digits-mobilenet]
        [--epochs 2] [--budget 0.02] [--quick]

Each row is one `compress --method fixed_loss --max-acc-loss BUDGET` run in a fresh
process, searched on val.npz, fine-tuned (where it says so) on train.npz with the
original model as teacher, and measured on test.npz, which nothing saw before. The
last row of a model is tfmot's `prune_low_magnitude` on the same architecture rebuilt
in tf_keras, pruned to the parameter count of the first fine-tuned channel row with
as many fine-tuning epochs as that row spent in all its steps (see
benchmarks/tfmot_baseline.py). Latency is the TFLite
artifact's median at batch 1, 1 thread, interleaved with the original's file in one
run (`compressor bench`); the tfmot files are timed in one run with our row's file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# (label, techniques, criterion, fine-tune?)
CONFIGS = [
    ("tucker (no fine-tuning)", "tucker", "magnitude", False),
    ("channels magnitude (no fine-tuning)", "channels", "magnitude", False),
    ("channels magnitude", "channels", "magnitude", True),
    ("channels snip", "channels", "snip", True),
    ("channels synflow", "channels", "synflow", True),
    ("channels fpgm", "channels", "fpgm", True),
    ("channels hessian", "channels", "hessian", True),
    ("hessian (EigenDamage)", "hessian", "magnitude", True),
    ("tucker", "tucker", "magnitude", True),
    ("channels,tucker", "channels,tucker", "magnitude", True),
    ("channels,hessian", "channels,hessian", "magnitude", True),
]
QUICK = {"channels magnitude", "channels fpgm", "hessian (EigenDamage)", "channels,tucker"}


def ensure_example(name: str, work: Path) -> Path:
    folder = work / name
    if not (folder / "model.keras").exists():
        subprocess.run([sys.executable, "-m", "compressor", "example", name, "--out", str(folder)], check=True)
    return folder


def compress(folder: Path, out: Path, techniques: str, criterion: str, epochs: int, budget: float) -> dict:
    command = [
        sys.executable, "-m", "compressor", "compress", str(folder / "model.keras"),
        "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
        "--method", "fixed_loss", "--max-acc-loss", str(budget), "--techniques", techniques,
        "--criterion", criterion, "--out", str(out), "--cache-dir", str(out.parent / "cache"),
        "--runs", "100", "--export", "tflite,keras", "--json", "--overwrite",
    ]
    if epochs:
        command += ["--train-data", str(folder / "train.npz"), "--finetune-epochs", str(epochs)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 2):
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "seconds": time.perf_counter() - started}
    report = json.loads(done.stdout)
    report["seconds"] = time.perf_counter() - started
    return report


def row(name: str, label: str, report: dict) -> str:
    if "error" in report:
        return f"| {name} | {label} | error: {report['error']} | | | | | | |"
    base, comp = report["baseline"], report["compressed"]
    tfl = next(a for a in report["artifacts"] if a["format"] == "tflite")
    epochs = (report.get("finetune") or {}).get("epochs", 0)
    return (
        f"| {name} | {label} | {report['status']} | {comp['params'] / base['params']:.2f} "
        f"| {base['flops'] / comp['flops']:.2f}× | {base['accuracy']:.2%} → {comp['accuracy']:.2%} "
        f"| {tfl['baseline_latency_ms']['median']:.3f} → {tfl['latency_ms']['median']:.3f} "
        f"(**{1 / tfl['latency_ratio']:.2f}× faster**) | {tfl['baseline_bytes'] / 1024:.0f} → {tfl['bytes'] / 1024:.0f} "
        f"| {epochs} | {report['seconds']:.0f} |"
    )


def tfmot_rows(name: str, folder: Path, reference: dict, work: Path) -> list[str]:
    """tfmot at our reference row's stored-parameter count and total fine-tuning epochs, timed against our artifact."""
    from benchmarks.tfmot_baseline import tfmot_prune

    from compressor.bench.benchmark import benchmark
    from compressor.io.data import load_data

    train, test = load_data(str(folder / "train.npz")), load_data(str(folder / "test.npz"))
    target = int(reference["compressed"]["params"])
    epochs = max(1, int(reference["finetune"]["epochs"]))
    result = tfmot_prune(folder / "model.keras", train, test, target, epochs, work / f"{name}-tfmot")
    ours = next(a for a in reference["artifacts"] if a["format"] == "tflite")
    timing = benchmark([ours["baseline_path"], ours["path"], result["tflite"], result["sparse_tflite"]], data=test, runs=100, warmup=10)
    original, mine, dense, sparse = timing.results
    kept = reference["compressed"]["params"] / reference["baseline"]["params"]
    rows = []
    for label, entry, size, seconds in (
        ("ours (channels magnitude, re-timed)", mine, ours["bytes"], ""),
        ("tfmot prune_low_magnitude", dense, result["bytes"], round(result["seconds"])),
        ("tfmot + sparse TFLite storage", sparse, result["sparse_bytes"], ""),
    ):
        speedup = original.latency_ms.median / entry.latency_ms.median
        rows.append(
            f"| {name} | {label} | same params | {kept:.2f} | | {original.accuracy:.2%} → {entry.accuracy:.2%} "
            f"| {original.latency_ms.median:.3f} → {entry.latency_ms.median:.3f} (**{speedup:.2f}× faster**) "
            f"| {ours['baseline_bytes'] / 1024:.0f} → {size / 1024:.0f} | {epochs} | {seconds} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    parser.add_argument("--examples", default="digits-resnet20,digits-mobilenet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--quick", action="store_true", help="only " + ", ".join(sorted(QUICK)) + " (and tfmot)")
    parser.add_argument("--only", help="only these row labels, separated by ';' (e.g. 'channels snip;channels,tucker')")
    parser.add_argument("--no-tfmot", action="store_true")
    parser.add_argument("--tfmot-from", type=Path, help="only the tfmot rows, against this earlier compress output folder")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"fixed_loss --max-acc-loss {args.budget}; fine-tuning {args.epochs} epoch(s) per step; "
        "TFLite latency at batch 1, 1 thread, 100 interleaved runs.\n"
    )
    print("| example | technique / criterion | status | params kept | FLOPs reduction | TFLite test accuracy | TFLite ms | TFLite KiB | fine-tune epochs | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.tfmot_from is not None:
        reference = json.loads((args.tfmot_from / "report.json").read_text())
        name = args.examples.split(",")[0]
        for line in tfmot_rows(name, ensure_example(name, args.work), reference, args.work):
            print(line, flush=True)
        return
    for name in args.examples.split(","):
        folder = ensure_example(name, args.work)
        reference = None
        for i, (label, techniques, criterion, tuned) in enumerate(CONFIGS):
            if args.quick and label not in QUICK and not label.endswith("(no fine-tuning)"):
                continue
            if args.only and label not in args.only.split(";"):
                continue
            epochs = args.epochs if tuned else 0
            report = compress(folder, args.work / f"{name}-prune{i}", techniques, criterion, epochs, args.budget)
            print(row(name, label, report), flush=True)
            if reference is None and tuned and techniques == "channels" and "error" not in report:
                reference = report
        if reference is not None and not args.no_tfmot:
            for line in tfmot_rows(name, folder, reference, args.work):
                print(line, flush=True)


if __name__ == "__main__":
    main()
