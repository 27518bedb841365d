"""Budgets on real data: the Fashion-MNIST examples at 1 and 2 points, over seeds; one table.

    python benchmarks/fashion.py [--work DIR] [--examples fashion-resnet20,fashion-mobilenet]
        [--budgets 0.01,0.02] [--seeds 5] [--seeds-for fashion-mobilenet=2] [--tfmot]
        [--compress-args "..."] [--jobs 2] > benchmarks/fashion.md

Needs Debian's dataset-fashion-mnist (or `--source DIR` of the four idx files). Each
example is trained once (`compressor example NAME`, seed 0); then each (budget, seed)
is one `compress` run in a fresh process, with `--seed` changing the selection/guard
split, the scores' samples and the fine-tuning order. The search sees `val.npz` (12,000
images carved from the training set); every accuracy figure is the TFLite artifact's on
the official 10,000-image test set, which no search sees.

`--jobs N` runs N compress runs at a time. On an idle 2-core machine one run's
fine-tuning uses both cores (2 threads train 1.5x as fast as one:
`benchmarks/finetune_throughput.py --threads 1|2`), so `--jobs 1` (the default) gives the
wall time a lone run takes; `--jobs 2` halves the benchmark's wall time at the cost of
each run's (each then trains on about one core, and its latencies are timed while another
run trains, the original and ours alike, interleaved).

Runs already done (their report.json in the work folder) are read back, not rerun, so
an interrupted benchmark resumes, and `--seeds` can grow later.

Per (example, budget): runs that met the budget on the test set; the held-out drop
(mean, worst) and its 90% interval from the worst run; FLOPs and params kept (median,
range); TFLite and ONNX latency of the original over ours (median, range; batch 1, one
thread, timed interleaved in the same run); compress wall time. With `--tfmot`, a peer
row per example: tfmot's `prune_low_magnitude` to the parameter count of our 2-point
run of seed 0, fine-tuned for as many epochs of the training set as that run spent in
all, at its initial learning rate (`benchmarks/tfmot_baseline.py`).

With `--quantize int8` among the compress arguments, the budget counts the int8 TFLite
artifact (every drop above is its); the table adds its speed-up and each seed's line the
float artifact's drop, and a last table separates quantization from pruning: the original
quantized to int8 the same way, timed interleaved with the original and every run's float
and int8 files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

DEFAULT_COMPRESS_ARGS = "--techniques channels --finetune-epochs 1 --runs 100 --warmup 10"


def ensure_example(name: str, work: Path, source: Optional[str]) -> tuple[Path, dict[str, Any]]:
    """The example's folder, trained once; its build record (test accuracy, training time)."""
    folder = work / name
    record = folder / "example.json"
    if not record.exists():
        command = [sys.executable, "-m", "compressor", "example", name, "--out", str(folder), "--json"]
        if source:
            command += ["--source", source]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        record.write_text(result.stdout)
    return folder, json.loads(record.read_text())


def compress(folder: Path, budget: float, seed: int, out: Path, extra: str) -> dict[str, Any]:
    """One run (or its report, when it was done before), with its wall time."""
    timing = out / "wall_s.txt"
    if (out / "report.json").exists() and timing.exists():
        return {"report": json.loads((out / "report.json").read_text()), "wall_s": float(timing.read_text())}
    command = [
        sys.executable, "-m", "compressor", "compress", str(folder / "model.keras"),
        "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
        "--train-data", str(folder / "train.npz"), "--method", "fixed_loss", "--max-acc-loss", str(budget),
        "--seed", str(seed), "--out", str(out), "--overwrite", "--quiet", "--cache-dir", str(folder / "cache"),
        *shlex.split(extra),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode not in (0, 2):
        raise SystemExit(f"compress failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    timing.write_text(f"{wall:.1f}\n")
    return {"report": json.loads((out / "report.json").read_text()), "wall_s": wall}


def ended(report: dict[str, Any]) -> Optional[str]:
    """Why a run's search ended before its own end: the channel search's record, or the guard at a block step."""
    channels, blocks = report.get("channels") or {}, report.get("blocks") or {}
    if channels.get("stopped"):
        return channels["stopped"]
    return "guard" if blocks.get("stopped") == "guard" else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of one (example, budget) from its runs."""
    reports = [run["report"] for run in runs]
    drops = [r["budget"]["achieved"] for r in reports]
    worst = max(range(len(reports)), key=lambda i: drops[i])

    def kept(kind: str) -> list[float]:
        return [r["compressed"][kind] / r["baseline"][kind] for r in reports]

    def artifact(report: dict[str, Any], fmt: str, quantize: str = "none") -> dict[str, Any]:
        return next((a for a in report["artifacts"] if a["format"] == fmt and a["quantize"] == quantize), {})

    def faster(report: dict[str, Any], fmt: str, quantize: str = "none") -> Optional[float]:
        ratio = artifact(report, fmt, quantize).get("latency_ratio")
        return 1 / ratio if ratio else None

    def speedup(fmt: str, quantize: str = "none") -> list[float]:
        return [value for value in (faster(r, fmt, quantize) for r in reports) if value]

    def float_drop(report: dict[str, Any]) -> Optional[float]:
        """The float TFLite artifact's held-out drop when the budget counts a quantized one (else None)."""
        accuracy = artifact(report, "tflite").get("accuracy")
        return None if report["quantize"] == "none" or accuracy is None else report["baseline"]["accuracy"] - accuracy

    return {
        "runs": len(runs),
        "met": sum(bool(r["budget"]["met"]) for r in reports),
        "ok": sum(r["status"] == "ok" for r in reports),
        "drop_mean": statistics.mean(drops),
        "drop_worst": drops[worst],
        "ci_worst": reports[worst]["budget"].get("ci"),
        "baseline_accuracy": statistics.mean(r["baseline"]["accuracy"] for r in reports),
        "flops": kept("flops"),
        "params": kept("params"),
        "tflite": speedup("tflite"),
        "onnx": speedup("onnx"),
        "tflite_int8": speedup("tflite", "int8"),
        "wall_s": [run["wall_s"] for run in runs],
        "epochs": [r["finetune"]["epochs"] for r in reports],
        "seeds": [{
            "seed": r["options"]["seed"], "drop": drops[i], "ci": r["budget"].get("ci"), "met": r["budget"]["met"],
            "flops": kept("flops")[i], "tflite": faster(r, "tflite"), "onnx": faster(r, "onnx"),
            "tflite_int8": faster(r, "tflite", "int8"), "float_drop": float_drop(r),
            "steps": r["finetune"].get("steps"),
            "stopped": ended(r),
            "wall_s": runs[i]["wall_s"],
        } for i, r in enumerate(reports)],
    }


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def tfmot_row(folder: Path, report: dict[str, Any], train_samples: int, work: Path) -> Optional[dict[str, Any]]:
    """tfmot's prune_low_magnitude at our run's parameter count and fine-tuning budget (in epochs of the train set)."""
    from compressor.finetune import FinetuneConfig

    steps = report["finetune"].get("steps")  # every fine-tuning run's optimizer steps, in all
    epochs = report["finetune"]["epochs"]
    if steps:  # runs bounded in steps: the same number of samples seen, as whole epochs (at least one)
        epochs = max(1, round(steps * FinetuneConfig.batch_size / train_samples))
    out = work / f"tfmot-{folder.name}"
    done = out / "row.json"  # read back, not rerun, as the compress runs are
    if done.exists():
        return json.loads(done.read_text())
    command = [sys.executable, str(Path(__file__).with_name("tfmot_baseline.py")), str(folder),
               "--target-params", str(report["compressed"]["params"]), "--epochs", str(max(1, epochs)),
               "--learning-rate", str(report["options"].get("finetune_lr", 1e-3)), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["failed"]}
    row = {"output": result.stdout, "epochs": epochs}
    done.write_text(json.dumps(row))
    return row


def int8_control(folder: Path, runs: list[Path], work: Path) -> Optional[str]:
    """How much of the int8 artifacts' speed is quantization's: the original quantized to int8 as our runs are,
    timed interleaved with the original and every run's float and int8 TFLite files (a table; None: no int8 runs)."""
    from compressor.export.quantize import quantized_name

    int8_file = quantized_name("model", "int8", ".tflite")  # what --quantize int8 writes beside model.tflite
    runs = [run for run in runs if (run / int8_file).exists()]
    if not runs:
        return None
    out = work / f"int8-{folder.name}"
    done, timed = out / "table.md", out / "runs.json"  # read back, not rerun, while it times the same runs
    names = json.dumps(sorted(str(run) for run in runs))
    if done.exists() and timed.exists() and timed.read_text() == names:
        return done.read_text()
    export = [sys.executable, "-m", "compressor", "export", str(folder / "model.keras"), "--format", "tflite",
              "--data", str(folder / "val.npz"), "--quantize", "int8", "--out", str(out), "--quiet"]
    result = subprocess.run(export, capture_output=True, text=True)
    if result.returncode != 0:
        return f"Did not run: {(result.stderr.strip().splitlines() or ['export failed'])[-1]}"
    artifacts = {"original": out / "model.tflite", "original, int8": out / int8_file}
    for run in runs:
        artifacts[run.name] = run / "model.tflite"
        artifacts[f"{run.name}, int8"] = run / int8_file
    bench = [sys.executable, "-m", "compressor", "bench", *map(str, artifacts.values()), "--data", str(folder / "test.npz"),
             "--runs", "200", "--warmup", "20", "--json"]
    result = subprocess.run(bench, capture_output=True, text=True)
    if result.returncode != 0:
        return f"Did not run: {(result.stderr.strip().splitlines() or ['bench failed'])[-1]}"
    results = json.loads(result.stdout)["results"]
    float_ms, int8_ms = (results[i]["latency_ms"]["median"] for i in (0, 1))
    shown = " ".join(["compressor", *export[3:-1]]).replace(str(work), "WORK")  # no paths of this machine
    lines = [f"Command: `{shown}` (quantizes the original as `--quantize int8` does, calibrated on 200 images of "
             "val.npz where the runs take theirs from train.npz), then "
             "`compressor bench` on the original's two files and every run's, interleaved, 200 runs after 20 warm-up, "
             "batch 1, one thread, accuracy on the 10,000 test images.\n",
             "| artifact | test acc. | median ms | × original | × original int8 |", "|---|---:|---:|---:|---:|"]
    for label, entry in zip(artifacts, results):
        median = entry["latency_ms"]["median"]
        versus_int8 = f"{int8_ms / median:.2f}" if label.endswith("int8") else "–"
        lines.append(f"| {label} | {entry['accuracy']:.2%} | {median:.3f} | {float_ms / median:.2f} | {versus_int8} |")
    table = "\n".join(lines) + "\n"
    done.write_text(table)
    timed.write_text(names)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/fashion"))
    parser.add_argument("--examples", default="fashion-resnet20,fashion-mobilenet")
    parser.add_argument("--budgets", default="0.01,0.02")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seeds-for", action="append", default=[],
                        help="NAME=N or NAME@BUDGET=N: fewer (or more) seeds for one example or one of its budgets")
    parser.add_argument("--source", default=None, help="folder of the four Fashion-MNIST idx files")
    parser.add_argument("--compress-args", default=DEFAULT_COMPRESS_ARGS)
    parser.add_argument("--tfmot", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="compress runs at a time (a lone run trains on every core)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.seeds_for)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, builds, peers, jobs = [], {}, {}, {}
    for name in args.examples.split(","):
        folder, builds[name] = ensure_example(name, args.work, args.source)
        for budget in budgets:
            seeds = int(overrides.get(f"{name}@{budget:g}", overrides.get(name, args.seeds)))
            jobs[name, budget] = [(folder, budget, seed, args.work / "runs" / f"{name}-{budget:g}-s{seed}", args.compress_args)
                                  for seed in range(seeds)]
    # A lone run trains on both cores of an idle 2-core machine; --jobs 2 trades each
    # run's wall time for the benchmark's.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: [pool.submit(compress, *job) for job in runs] for key, runs in jobs.items()}
        for (name, budget), pending in futures.items():
            rows.append((name, budget, summarize([future.result() for future in pending])))
            print(f"{name} at {budget:g}: done {len(pending)} runs", file=sys.stderr)
    for name in builds:
        folder = args.work / name  # where ensure_example put it
        if args.tfmot and 0.02 in budgets:
            first = args.work / "runs" / f"{name}-0.02-s0" / "report.json"
            peers[name] = tfmot_row(folder, json.loads(first.read_text()), builds[name]["samples"]["train"], args.work)
    controls = {name: int8_control(args.work / name, [job[3] for (example, _), runs in jobs.items() if example == name
                                                      for job in runs], args.work) for name in builds}
    print_table(rows, builds, peers, args)
    for name, control in controls.items():
        if control:
            print(f"\n## int8: what quantization alone buys on {name}\n")
            print(control)


def _split_text(compress_args: str) -> str:
    """How the runs split val.npz, from `--guard-fraction` among the compress arguments (compress's default 0.5)."""
    words = shlex.split(compress_args)
    guard = float(words[words.index("--guard-fraction") + 1]) if "--guard-fraction" in words[:-1] else 0.5
    return "half selection, half guard" if guard == 0.5 else f"{1 - guard:.0%} selection, {guard:.0%} guard"


def print_table(rows, builds, peers, args) -> None:
    print("# Budgets on real data: Fashion-MNIST\n")
    print(f"Command: `python benchmarks/fashion.py --examples {args.examples} --budgets {args.budgets} "
          f"--seeds {args.seeds}{''.join(f' --seeds-for {s}' for s in args.seeds_for)}"
          f"{' --tfmot' if args.tfmot else ''}{f' --jobs {args.jobs}' if args.jobs > 1 else ''}` (compress arguments: `{args.compress_args}`)\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
          f"Search on val.npz (12,000 images from the training set: {_split_text(args.compress_args)}); every accuracy "
          "figure is the TFLite artifact's on the official 10,000-image test set. Speed-ups are the original's "
          "median latency over ours (batch 1, one thread, timed interleaved in the same run): median (range) over "
          "seeds.\n")
    print("| example | trained | test acc. |")
    print("|---|---:|---:|")
    for name, build in builds.items():
        print(f"| {name} | {build['epochs']} epochs, {build['train_seconds'] / 60:.1f} min | {build['test_accuracy']:.2%} |")
    print()
    int8 = any(row["tflite_int8"] for _, _, row in rows)
    print("| example | budget | runs met | held-out drop mean / worst (pts) | worst run's 90% CI (pts) | FLOPs kept | "
          f"params kept | TFLite speed-up |{' int8 TFLite speed-up |' if int8 else ''} ONNX speed-up | compress (min) |")
    print(f"|---|---:|---:|---:|---:|---:|---:|---:|{'---:|' if int8 else ''}---:|---:|")
    for name, budget, row in rows:
        ci = row["ci_worst"]
        ci_text = f"{100 * ci[0]:.2f} – {100 * ci[1]:.2f}" if ci else "–"
        int8_cell = f" {spread(row['tflite_int8'], '.2f')}× |" if int8 else ""
        print(f"| {name} | {100 * budget:g} pts | {row['met']}/{row['runs']} | {100 * row['drop_mean']:.2f} / "
              f"{100 * row['drop_worst']:.2f} | {ci_text} | {spread(row['flops'], '.3f')} | {spread(row['params'], '.3f')} | "
              f"{spread(row['tflite'], '.2f')}× |{int8_cell} {spread(row['onnx'], '.2f')}× | "
              f"{spread([w / 60 for w in row['wall_s']], '.1f')} |")
    for name, budget, row in rows:
        print(f"\n{name} at {100 * budget:g} points, per seed (held-out drop with its 90% interval, FLOPs kept, "
              f"TFLite{' / int8 TFLite' if int8 else ''} / ONNX speed-up, fine-tuning steps in all, compress wall time):\n")
        for seed in row["seeds"]:
            ci = f" ({100 * seed['ci'][0]:.2f}–{100 * seed['ci'][1]:.2f})" if seed["ci"] else ""
            float_drop = f" (float TFLite: {100 * seed['float_drop']:.2f})" if seed["float_drop"] is not None else ""
            steps = f"{seed['steps']:,} steps, " if seed["steps"] else ""
            stopped = {None: "", "guard": ", ended at the guard"}.get(seed["stopped"], f", stopped at its {seed['stopped']}")
            speeds = (seed["tflite"], seed["tflite_int8"], seed["onnx"]) if int8 else (seed["tflite"], seed["onnx"])
            speed = " / ".join(f"{value:.2f}×" if value else "–" for value in speeds)
            print(f"- seed {seed['seed']}: {100 * seed['drop']:.2f}{ci}{'' if seed['met'] else ' (missed)'}{float_drop}, "
                  f"{seed['flops']:.3f}, {speed}, {steps}{seed['wall_s'] / 60:.1f} min{stopped}.")
    for name, peer in peers.items():
        print(f"\n## tfmot `prune_low_magnitude` on {name}\n")
        if peer is None or "error" in peer:
            print(f"Did not run: {(peer or {}).get('error')}")
        else:
            print(f"Same parameter count as our 2-point run of seed 0, {peer['epochs']} epoch(s) of fine-tuning:\n")
            print(peer["output"])


if __name__ == "__main__":
    main()
