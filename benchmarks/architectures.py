"""Compress each architecture family and a set of keras.applications models data-free to half their params.

    python benchmarks/architectures.py [--runs 30] [--models kws,encoder,...] > benchmarks/architectures.md

For each model (random weights, seed 0, every zero weight given a small value as training
would; see tests/families.py): `compress --method fixed_params --compression-factor 0.5`
with the default techniques and no data, exporting TFLite and ONNX. The table gives the
params and FLOPs kept (report.json's `compressed` over `baseline`), whether the budget was
met, each artifact's largest output difference from the compressed Keras model (parity at
`atol` 1e-4), how much faster each compressed artifact runs than the original's (the
original's median latency over the compressed one's, batch 1, 1 thread, both timed in one
interleaved run by compress's timing stage), and the wall time of the whole compress call
(search, export, verification, timing).

Each model runs in a process of its own: a model that fails leaves a row with the exit
code and the last line of its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TESTS = Path(__file__).resolve().parent.parent / "tests"

FAMILIES = {
    "KWS LSTM->GRU": ("kws", {"units": 64}),
    "SimpleRNN": ("simple_rnn", {"units": 64, "steps": 49, "features": 10}),
    "Bidirectional LSTM": ("bidirectional", {"units": 32, "steps": 49, "features": 10}),
    "transformer encoder": ("encoder", {"tokens": 49, "features": 64, "heads": 4, "hidden": 256, "blocks": 2,
                                        "classes": 12}),
    "ResNeXt block": ("resnext", {"size": 32, "channels": 64, "width": 128, "groups": 32, "classes": 10}),
    "ConvNeXt stage": ("convnext", {"size": 64, "channels": 48, "blocks": 2, "classes": 10}),
    "mini-Xception": ("mini_xception", {"size": 48, "widths": (16, 32, 64, 128), "classes": 7}),
    "mini-Xception (Keras 2 .h5)": ("keras2_mini_xception", {"size": 48}),
    "multi-IO": ("multi_io", {"size": 32, "features": 16, "width": 16, "classes": 10}),
    "U-Net": ("unet", {"size": 64, "width": 16, "depth": 3, "classes": 4}),
    "CNN": ("cnn", {"size": 32, "width": 32, "classes": 10}),
    "TCN": ("tcn", {"steps": 128, "features": 8, "width": 32, "levels": 4, "classes": 6}),
}
"""The families at realistic small sizes: name -> (tests/families.py's name, builder keywords)."""

APPLICATIONS = {"MobileNetV2": 32, "MobileNetV3Small": 32, "EfficientNetB0": 32, "ResNet50": 32, "DenseNet121": 32,
                "Xception": 71, "ConvNeXtTiny": 64, "NASNetMobile": 32}
"""keras.applications models (weights=None, 10 classes) and their input side: the smallest each allows,
except ConvNeXtTiny at 64."""

MODELS = (*FAMILIES, *APPLICATIONS)


def build(name: str):
    """The model benchmarked as `name`, its zero weights filled."""
    sys.path.insert(0, str(TESTS))
    import families

    if name in FAMILIES:
        family, keywords = FAMILIES[name]
        model = families.FAMILIES[family](**keywords)
    else:
        import keras

        keras.utils.set_random_seed(0)
        side = APPLICATIONS[name]
        model = getattr(keras.applications, name)(weights=None, input_shape=(side, side, 3), classes=10)
    return families.without_zeros(model)


def measure(name: str, runs: int, out: Path) -> dict:
    """Compress one model and read what the table shows from its report."""
    import compressor

    model = build(name)
    shape = " + ".join("×".join(str(d) for d in x.shape[1:]) for x in model.inputs)
    start = time.perf_counter()
    result = compressor.compress(model, out=out, method="fixed_params", compression_factor=0.5,
                                 export=("tflite", "onnx"), runs=runs, warmup=3, threads=1)
    seconds = time.perf_counter() - start
    report = result.report
    row = {"input": shape, "params": report["baseline"]["params"], "flops": report["baseline"]["flops"],
           "params_kept": report["compressed"]["params"] / report["baseline"]["params"],
           "flops_kept": report["compressed"]["flops"] / report["baseline"]["flops"],
           "met": report["budget"]["met"], "seconds": seconds}
    for entry in report["artifacts"]:
        ratio = entry.get("latency_ratio")
        row[entry["format"]] = {"max_abs_diff": entry["max_abs_diff"], "speedup": 1 / ratio if ratio else None}
    return row


def row(name: str, runs: int, timeout: float) -> str:
    """One table row, measured in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--one", name, "--runs", str(runs), "--out", str(Path(folder) / "out")]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"| {name} | not measured: over {timeout:.0f} s |" + " |" * 9
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        return f"| {name} | failed: exit {done.returncode}: {last.replace('|', '/')[:200]} |" + " |" * 9
    data = json.loads(done.stdout.strip().splitlines()[-1])
    cells = [name, data["input"], f"{data['params']:,}", f"{data['params_kept']:.3f}", _flops(data["flops"]),
             f"{data['flops_kept']:.3f}", "yes" if data["met"] else "**no**"]
    for fmt in ("tflite", "onnx"):
        diff = data[fmt]["max_abs_diff"]
        cells.append(f"{diff:.1e}" + ("" if diff <= 1e-4 else " **over 1e-4**"))
    cells += [_speedup(data[fmt]["speedup"]) for fmt in ("tflite", "onnx")]
    cells.append(f"{data['seconds']:.0f}")
    return "| " + " | ".join(cells) + " |"


def _flops(flops: int) -> str:
    return f"{flops / 1e9:.2f} G" if flops >= 1e9 else f"{flops / 1e6:.1f} M"


def _speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per artifact (default 30)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names of the table's rows")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one model may take (default 1800)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.runs, args.out)))
        return
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"fixed_params 0.5, data-free, default techniques; batch 1, 1 thread, {args.runs} interleaved runs.\n")
    print("| model | input | params | params kept | FLOPs | FLOPs kept | budget met | TFLite max diff "
          "| ONNX max diff | TFLite speed-up | ONNX speed-up | compress s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(name, args.runs, args.timeout), flush=True)


if __name__ == "__main__":
    main()
