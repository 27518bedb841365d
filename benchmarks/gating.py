"""Static compression alone vs static + dynamic gating: held-out accuracy, FLOPs per input, TFLite latency.

    python benchmarks/gating.py [--work DIR] [--models resnet20,resnet56] [--runs 200]
        [--variants static,gated,gates] [--overhead-repeats 5] [--reuse]

For each model (the digits-resnet20 example, and a deeper ResNet trained here on the
same digits data with the example's recipe), three `compress` runs, each in a fresh
process, all at `--method fixed_loss --max-acc-loss 0.02` with val.npz as search data,
test.npz held out and train.npz for fine-tuning and gate training:

    static   --techniques channels --finetune-epochs 3
    gated    --techniques channels,gating --finetune-epochs 3   (gating defaults; compress
             keeps the gates only if they pay, else the artifacts are the static ones)
    gates    --techniques gating                                (gates on the original)

Accuracy is top-1 of the TFLite artifact on test.npz. FLOPs per input are the gated
model's FLOPs minus those of the blocks its gates skipped, per held-out input. TFLite
latency is the mean of batch-1, 1-thread calls that cycle over held-out inputs (one
input per call), interleaved in one run with the original's TFLite and, for gated rows,
the static model's TFLite (the model before gates were added).

Then, for each gated row, the gate overhead is measured directly: the gated model is
exported twice more with every gate forced open and forced shut, and the four TFLite
files (static, gated, all open, all shut) are timed in --overhead-repeats more
interleaved runs (the median of their means is shown, each run's means listed below).
"all open - static" is what evaluating the gates and the IF ops costs per input when
nothing is skipped; "static - all shut" is the most that skipping can save (both the
median over the runs of the difference within each run).

Trained models, data and outputs stay in --work (reruns skip training; --reuse also
skips `compress` runs whose report.json is there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXAMPLE = "digits-resnet20"
VARIANTS = {
    "static": ("static only", ["--techniques", "channels", "--finetune-epochs", "3"]),
    "gated": ("static + gating", ["--techniques", "channels,gating", "--finetune-epochs", "3"]),
    "gates": ("gating alone", ["--techniques", "gating"]),
}
SPLIT_FILES = ("train.npz", "val.npz", "test.npz")


def ensure_model(name: str, work: Path) -> Path:
    """The folder with model.keras and the digits splits; trains what is missing."""
    example = work / EXAMPLE
    if not (example / "model.keras").exists():
        subprocess.run([sys.executable, "-m", "compressor", "example", EXAMPLE, "--out", str(example)], check=True)
    if name == "resnet20":
        return example
    folder = work / f"digits-{name}"
    if not (folder / "model.keras").exists():
        depth = int(name.removeprefix("resnet"))
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--work", str(work), "--train-depth", str(depth)], check=True)
        print(f"(trained digits-{name} in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return folder


def train_deeper(depth: int, work: Path) -> None:
    """Train resnet{depth} on the digits-resnet20 example's own splits with the example's recipe."""
    import numpy as np

    from compressor.io.atomic import atomic_path, ensure_dir
    from compressor.models.examples import EXAMPLES
    from compressor.models.splits import Splits
    from compressor.models.training import deterministic, train_classifier

    base = EXAMPLES[EXAMPLE]
    spec = dataclasses.replace(base, name=f"digits-resnet{depth}", architecture=f"resnet{depth}",
                               description=f"ResNet-{depth} on the digits-resnet20 example's data")
    source, folder = work / EXAMPLE, ensure_dir(work / spec.name)
    arrays = []
    for split in SPLIT_FILES:
        with np.load(source / split) as data:
            arrays.append((data["x"], data["y"]))
        shutil.copyfile(source / split, folder / split)
    with deterministic(0):
        trained = train_classifier(spec, Splits(*arrays), spec.epochs)
    with atomic_path(folder / "model.keras") as tmp:
        trained.model.save(tmp)
    info = {"architecture": spec.architecture, "epochs": spec.epochs, "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate, "params": int(trained.model.count_params()),
            "val_accuracy": trained.val_accuracy, "test_accuracy": trained.test_accuracy,
            "train_seconds": round(trained.train_seconds, 1)}
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


def compress(folder: Path, out: Path, flags: list[str], runs: int, cache: Path, reuse: bool) -> dict:
    """One `compress` run in a fresh process: its report, wall time, exit code (or the error)."""
    saved = out.with_name(out.name + ".run.json")
    if reuse and (out / "report.json").exists() and saved.exists():
        return json.loads(saved.read_text())
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable, "-m", "compressor", "compress", str(folder / "model.keras"),
        "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
        "--train-data", str(folder / "train.npz"), "--method", "fixed_loss", "--max-acc-loss", "0.02",
        *flags, "--runs", str(runs), "--cache-dir", str(cache), "--out", str(out), "--overwrite", "--json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    run = {"command": command, "returncode": done.returncode, "wall_s": time.perf_counter() - started}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".stderr.log").write_text(done.stderr)
    if done.returncode in (0, 2):
        run["report"] = json.loads(done.stdout)
    else:
        lines = done.stderr.strip().splitlines()
        run["error"] = lines[-1] if lines else f"exit {done.returncode}, no output"
    saved.write_text(json.dumps(run))
    return run


def gate_overhead(out: Path, test, runs: int, repeats: int) -> dict:
    """Time static / gated / all-open / all-shut TFLite files interleaved; median of `repeats` runs' means."""
    import statistics

    from compressor.bench.benchmark import benchmark
    from compressor.export.writers import export_tflite
    from compressor.io.models import load_model
    from compressor.layers.gating import OPEN, gate_layers
    from compressor.techniques.gating import set_offsets

    gated = load_model(out / "model.keras")
    offsets = [float(gate.offset.numpy()) for gate, _ in gate_layers(gated)]
    files = {"static": out / "static" / "model.tflite", "gated": out / "model.tflite"}
    for label, offset in (("open", OPEN), ("shut", -OPEN)):
        set_offsets(gated, offset)
        files[label] = export_tflite(gated, out / "overhead" / f"{label}.tflite")
    set_offsets(gated, offsets)
    reports = [benchmark([str(path) for path in files.values()], data=test, runs=runs, warmup=20, threads=1)
               for _ in range(repeats)]
    means = {label: [report.results[i].latency_ms.mean for report in reports] for i, label in enumerate(files)}
    times = {label: {"mean": statistics.median(values), "means": values, "accuracy": reports[0].results[i].accuracy}
             for i, (label, values) in enumerate(means.items())}
    # Differences within each run (the files of one run share the machine's load), then their median.
    times["overhead"] = statistics.median(o - s for o, s in zip(means["open"], means["static"]))
    times["saving"] = statistics.median(s - z for s, z in zip(means["static"], means["shut"]))
    times["gates"] = len(offsets)
    return times


def mflops(value: float) -> str:
    return f"{value / 1e6:.1f}"


def table_row(model: str, variant: str, run: dict) -> tuple[str, list[str]]:
    """The table row and, for gated rows, the notes under the table."""
    if "report" not in run:
        return f"| {model} | {variant} | failed: {run['error']} | | | | | | | {run['wall_s']:.0f} |", []
    report = run["report"]
    base, comp, gating = report["baseline"], report["compressed"], report.get("gating")
    tfl = next(a for a in report["artifacts"] if a["format"] == "tflite" and a.get("quantize", "none") == "none")
    lat, base_lat = tfl["latency_ms"]["mean"], tfl["baseline_latency_ms"]["mean"]
    applied = bool(gating and gating.get("applied"))
    if applied:
        fpi = gating["flops_per_input"]
        static_flops, mean_flops = gating["static_flops"], fpi["mean"]
        spread = f"{mflops(fpi['p10'])}–{mflops(fpi['p90'])}"
        static_ms = gating["tflite"]["static_latency_ms"]["mean"]
        versus_static = f"{static_ms:.3f} ({lat / static_ms:.2f}×)"
    else:
        static_flops = mean_flops = comp["flops"]
        spread, versus_static = "—", "—"
        if gating is not None:
            versus_static = "gates not kept"
    flops = f"{mflops(static_flops)} / {mflops(mean_flops)} ({mean_flops / base['flops']:.2f})"
    row = (
        f"| {model} | {variant} | {report['status']} | {tfl['accuracy']:.2%} (orig {tfl['baseline_accuracy']:.2%}) "
        f"| {comp['params'] / 1e3:.1f}k ({comp['params'] / base['params']:.2f}) | {flops} | {spread} "
        f"| {lat:.3f} ({lat / base_lat:.2f}×) | {versus_static} | {run['wall_s']:.0f} |"
    )
    notes = []
    if applied:
        blocks = ", ".join(f"{b['name']} {b['skip_rate']:.0%}" for b in gating["blocks"])
        notes.append(
            f"- {model}, {variant}: {len(gating['blocks'])} gated blocks, target {gating['target']} "
            f"(trained at {gating['trained_target']}, offset {gating['offset']:+.2f}, "
            f"{len(gating['attempts'])} training(s)){checked(gating)}; skip rate per block on test.npz: {blocks}"
        )
    elif gating is not None:
        tried = "; ".join(f"target {a.get('target')}: search accuracy {a.get('accuracy', 0):.2%}, "
                          f"compute {a.get('compute') or a.get('train_compute') or 0:.2f}" for a in gating.get("attempts") or [])
        notes.append(f"- {model}, {variant}: gates not kept — {gating.get('reason', '')} (trainings: {tried or 'none'})"
                     f"{checked(gating)}")
    return row, notes


def checked(gating: dict) -> str:
    """compress's own keep-or-drop timing of the gated TFLite against the static one, when it made one."""
    check = gating.get("latency_check")
    if not check:
        return ""
    return (f"; compress's check on {check['samples']} {check['data']} inputs: gated {check['gated_ms']:.3f} ms "
            f"vs static {check['static_ms']:.3f} ms")


def original_row(model: str, run: dict) -> str:
    report = run["report"]
    base = report["baseline"]
    tfl = next(a for a in report["artifacts"] if a["format"] == "tflite")
    return (f"| {model} | original | — | {tfl['baseline_accuracy']:.2%} | {base['params'] / 1e3:.1f}k "
            f"| {mflops(base['flops'])} | — | {tfl['baseline_latency_ms']['mean']:.3f} (1.00×) | — | — |")


def onnx_line(model: str, variant: str, run: dict) -> str | None:
    onnx = next((a for a in run.get("report", {}).get("artifacts", []) if a["format"] == "onnx"), None)
    if onnx is None or not onnx.get("latency_ms"):
        return None
    lat, base = onnx["latency_ms"]["mean"], onnx["baseline_latency_ms"]["mean"]
    return (f"| {model} | {variant} | {onnx['accuracy']:.2%} | {base:.3f} | {lat:.3f} | {lat / base:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/gating"))
    parser.add_argument("--models", default="resnet20,resnet56", help="resnet20 (the example), resnet32, resnet56")
    parser.add_argument("--variants", default="static,gated,gates", help=f"of {','.join(VARIANTS)}")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--overhead-repeats", type=int, default=5, help="interleaved runs of the gate-overhead timing")
    parser.add_argument("--reuse", action="store_true", help="reuse compress runs already in --work")
    parser.add_argument("--train-depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_depth:
        train_deeper(args.train_depth, args.work)
        return

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"TFLite/ONNX latency: mean of {args.runs} batch-1, 1-thread calls cycling over test.npz, "
          f"interleaved with the original's; accuracy on test.npz.\n")
    started = time.perf_counter()
    results = []
    for model in args.models.split(","):
        folder = ensure_model(model, args.work)
        for key in args.variants.split(","):
            label, flags = VARIANTS[key]
            out = args.work / "runs" / f"{model}-{key}"
            run = compress(folder, out, flags, args.runs, args.work / "cache" / f"{model}-{key}", args.reuse)
            results.append((model, label, out, folder, run))
            status = run["report"]["status"] if "report" in run else f"failed: {run['error']}"
            print(f"({model} {label}: {status}, {run['wall_s']:.0f} s)", file=sys.stderr, flush=True)

    print("| model | variant | status | TFLite accuracy (test) | params (× orig) | MFLOPs static / mean per input (× orig) "
          "| MFLOPs per input p10–p90 | TFLite mean ms per input (× orig) | static-only TFLite of the run, mean ms (gated/static) "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|---|---:|")
    notes, shown = [], set()
    for model, label, _, _, run in results:
        if model not in shown and "report" in run:
            print(original_row(model, run))
            shown.add(model)
        row, extra = table_row(model, label, run)
        print(row)
        notes += extra
    print()
    print("\n".join(notes))

    from compressor.io.data import load_data

    overhead = []
    for model, label, out, folder, run in results:
        gating = run.get("report", {}).get("gating") or {}
        if gating.get("applied"):
            times = gate_overhead(out, load_data(str(folder / "test.npz")), args.runs, args.overhead_repeats)
            overhead.append((model, label, gating, times))
    if overhead:
        print(f"\nGate overhead: {args.overhead_repeats} more interleaved runs per gated model; TFLite mean ms per input, "
              f"median over the runs:\n")
        print("| model | variant | gates | static | gated | all gates open | all gates shut | open − static (overhead, per gate) "
              "| static − shut (most skipping saves) | gated accuracy / all-shut accuracy |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for model, label, gating, t in overhead:
            print(f"| {model} | {label} | {t['gates']} | {t['static']['mean']:.3f} | {t['gated']['mean']:.3f} "
                  f"| {t['open']['mean']:.3f} | {t['shut']['mean']:.3f} "
                  f"| {t['overhead']:+.3f} ({t['overhead'] / t['gates'] * 1e3:+.0f} µs) | {t['saving']:.3f} "
                  f"| {t['gated']['accuracy']:.2%} / {t['shut']['accuracy']:.2%} |")
        print("\n(differences: median over the runs of the difference within each run)\n")
        for model, label, _, t in overhead:
            runs = "; ".join(f"{key} " + " ".join(f"{m:.3f}" for m in t[key]["means"])
                             for key in ("static", "gated", "open", "shut"))
            print(f"- {model}, {label}, each run's means (ms): {runs}")

    print("\nONNX (side note; onnxruntime If branches keep batch norm unfused):\n")
    print("| model | variant | ONNX accuracy (test) | original ms | ours ms | × original |")
    print("|---|---|---|---:|---:|---:|")
    for model, label, _, _, run in results:
        line = onnx_line(model, label, run)
        if line:
            print(line)
    print(f"\nTotal wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
