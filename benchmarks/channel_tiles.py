"""Latency against channel count: where a narrower convolution stops being faster.

    python benchmarks/channel_tiles.py [--sizes 28,14,7] [--channels 8,12,15,16,17,...]
        [--original MODEL --models A.keras,B.keras --tile 16]
        [--runs 300] [--warmup 30] > benchmarks/channel_tiles.md

A channel search counts FLOPs, which fall with the square of the channels kept; the
runtime's kernels work on tiles of output channels, so a layer with one channel more
than a tile boundary can cost as much as a whole tile more. This script measures that on
the machine it runs on: for each spatial size (a ResNet-20 on 28×28 images has stages at
28, 14 and 7) and channel count c, a stack of six 3×3 convolutions c → c (same padding,
ReLU), global pooling and a 10-way dense head, exported to TFLite float and int8
(calibrated on random inputs: the timing does not depend on the weights), and timed with
LiteRT's default XNNPACK delegate at batch 1 on one thread. All models are timed
interleaved (one invoke of each in turn, `--runs` rounds after `--warmup`), so drift on a
noisy machine falls on all alike; each cell is the median with its interquartile range.

With `--original MODEL --models A.keras,B.keras`, it also times what aligning the channel
counts would buy on real pruned models: each model's prunable channel groups wider than
`--tile` are cut down to a multiple of it (the last channels go: latency does not depend on
the weights, and the cut models are not fine-tuned, so their accuracy means nothing), and
the original, each model and its cut copy are timed as float TFLite files in one
interleaved `compressor bench` run.
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

LAYERS = 6


def stack(size: int, channels: int):
    """The six-convolution stack at `size`×`size`×`channels` (module docstring)."""
    import keras

    x = inputs = keras.Input((size, size, channels))
    for _ in range(LAYERS):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def tflite_files(model, folder: Path, name: str, calibration: np.ndarray) -> dict[str, Path]:
    """The model's float and int8 TFLite files (full-integer kernels, float input and output), as `compress` exports them."""
    from compressor.export.quantize import export_tflite_quantized
    from compressor.export.writers import export_tflite

    return {"float": export_tflite(model, folder / f"{name}-float.tflite"),
            "int8": export_tflite_quantized(model, folder / f"{name}-int8.tflite", "int8", calibration)}


def flops(size: int, channels: int) -> int:
    """Multiply-adds × 2 of the convolutions (the head is negligible)."""
    return LAYERS * 2 * size * size * 9 * channels * channels


def aligned(model, tile: int):
    """A copy of `model` whose prunable groups wider than `tile` keep a multiple of it; (copy, sizes before, after)."""
    from compressor.graph.groups import channel_groups
    from compressor.surgery.channels import prune_channels

    groups = [group for group in channel_groups(model) if group.prunable]
    removals = {group.name: list(range(group.size - group.size % tile, group.size))
                for group in groups if group.size > tile and group.size % tile}
    before = [group.size for group in groups]
    after = [size - size % tile if size > tile else size for size in before]
    return prune_channels(model, removals), before, after


def aligned_table(original: Path, models: list[Path], tile: int, runs: int, warmup: int) -> None:
    """Time the original, each model and its aligned copy (float TFLite, interleaved); print a table."""
    import json
    import subprocess
    import sys

    import keras

    from compressor.export.writers import export_tflite as tflite

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        files, sizes = [tflite(keras.models.load_model(original), folder / "original.tflite")], []
        for i, path in enumerate(models):
            model = keras.models.load_model(path)
            copy, before, after = aligned(model, tile)
            files += [tflite(model, folder / f"{i}.tflite"), tflite(copy, folder / f"{i}-aligned.tflite")]
            sizes.append((before, after))
        bench = [sys.executable, "-m", "compressor", "bench", *map(str, files), "--runs", str(runs),
                 "--warmup", str(warmup), "--json"]
        results = json.loads(subprocess.run(bench, capture_output=True, text=True, check=True).stdout)["results"]
    medians = [entry["latency_ms"]["median"] for entry in results]
    print(f"\n## Pruned models with their groups cut to a multiple of {tile}\n")
    print(f"`--original ORIGINAL --models {','.join(path.parent.name + '/' + path.name for path in models)} --tile {tile}`: "
          f"float TFLite, `compressor bench` interleaved, {runs} runs after {warmup} warm-up; speed-up is the original's "
          "median over the file's.\n")
    print("| model | prunable groups (channels) | median ms | speed-up | aligned groups | aligned ms | aligned speed-up |")
    print("|---|---|---:|---:|---|---:|---:|")
    for i, (path, (before, after)) in enumerate(zip(models, sizes)):
        ms, aligned_ms = medians[1 + 2 * i], medians[2 + 2 * i]
        print(f"| {path.parent.name} | {', '.join(map(str, before))} | {ms:.3f} | {medians[0] / ms:.2f}× | "
              f"{', '.join(map(str, after))} | {aligned_ms:.3f} | {medians[0] / aligned_ms:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="28,14,7")
    parser.add_argument("--channels", default="8,12,15,16,17,20,24,31,32,33,40,48,49,64")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--original", type=Path, help="the model the --models were pruned from (.keras)")
    parser.add_argument("--models", default="", help="comma-separated pruned .keras files to align and time")
    parser.add_argument("--tile", type=int, default=16)
    args = parser.parse_args()
    from ai_edge_litert.interpreter import Interpreter

    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.channels.split(",")]
    rng = np.random.default_rng(0)
    runners, keys = [], []
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            for channels in counts:
                calibration = rng.random((32, size, size, channels), dtype=np.float32)
                files = tflite_files(stack(size, channels), Path(work), f"{size}-{channels}", calibration)
                for mode, path in files.items():
                    interpreter = Interpreter(model_path=str(path), num_threads=1)
                    interpreter.allocate_tensors()
                    index = interpreter.get_input_details()[0]["index"]
                    interpreter.set_tensor(index, calibration[:1])
                    runners.append(interpreter)
                    keys.append((size, channels, mode))
        times = np.zeros((len(runners), args.runs))
        for round_ in range(args.warmup + args.runs):
            for i, interpreter in enumerate(runners):
                started = time.perf_counter()
                interpreter.invoke()
                if round_ >= args.warmup:
                    times[i, round_ - args.warmup] = time.perf_counter() - started
    cells = {key: np.percentile(times[i] * 1e3, [25, 50, 75]) for i, key in enumerate(keys)}

    print("# Latency against channel count\n")
    print(f"Command: `python benchmarks/channel_tiles.py --sizes {args.sizes} --channels {args.channels} "
          f"--runs {args.runs} --warmup {args.warmup}`\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
          f"Six 3×3 convolutions c → c at each size, LiteRT with XNNPACK, batch 1, one thread, all timed "
          "interleaved: median ms (interquartile range); µs per MFLOP is the median over the FLOPs.\n")
    print("| size | channels | MFLOPs | float ms | float µs/MFLOP | int8 ms | int8 µs/MFLOP |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for channels in counts:
            mflops = flops(size, channels) / 1e6
            row = [f"| {size} | {channels} | {mflops:.1f} |"]
            for mode in ("float", "int8"):
                low, median, high = cells[size, channels, mode]
                row.append(f" {median:.3f} ({low:.3f}–{high:.3f}) | {1e3 * median / mflops:.1f} |")
            print("".join(row))
    if args.original and args.models:
        aligned_table(args.original, [Path(path) for path in args.models.split(",")], args.tile, args.runs, args.warmup)


if __name__ == "__main__":
    main()
