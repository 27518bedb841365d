"""How accurate an early exit's head is, by how finely it pools its feature map; one table.

    python benchmarks/exit_heads.py [--work DIR] [--examples fashion-resnet20] [--models PATH ...]
        [--grids 1,2,4] > benchmarks/exit_heads.md

For each model (each example's trained model, and any `--models` file, for instance a
compressed run's model.keras, with the first example's data), heads go at the default exit
points (nearest 1/4, 1/2 and 3/4 of the FLOPs) and are trained as `compress` trains them
(`compressor.search.early_exit.train_heads`: frozen network, 15 epochs, half labels and
half the network's answer) on the example's training split, once per grid: a head averages
its feature map over at most GRID×GRID cells (1: a global average) beside a global max.
Per head, on the example's validation split: its accuracy, the share of inputs it can
answer at 98% right (its most confident inputs, as a threshold would pick them), and its
FLOPs as a fraction of the model's. Needs Debian's dataset-fashion-mnist (or `--source DIR`),
as `benchmarks/fashion.py`, whose examples it trains or reuses.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fashion import ensure_example  # noqa: E402  (the benchmark next door)

RIGHT = 0.98
"""The accuracy at which a head's share of answered inputs is read."""


def answered_share(probabilities: np.ndarray, y: np.ndarray, right: float = RIGHT) -> float:
    """The largest share of inputs, most confident first, that the head gets `right` (at least 1%)."""
    order = np.argsort(-probabilities.max(-1))
    hits = np.cumsum(probabilities.argmax(-1)[order] == y[order]) / np.arange(1, len(y) + 1)
    fine = np.nonzero(hits >= right)[0]
    fine = fine[fine >= len(y) // 100]
    return float((fine.max() + 1) / len(y)) if len(fine) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/fashion"))
    parser.add_argument("--examples", default="fashion-resnet20")
    parser.add_argument("--models", type=Path, nargs="*", default=[])
    parser.add_argument("--grids", default="1,2,4")
    parser.add_argument("--source", default=None, help="folder of the four Fashion-MNIST idx files")
    args = parser.parse_args()

    from compressor.graph.cost import model_cost
    from compressor.io.data import Dataset
    from compressor.io.models import load_model
    from compressor.search.early_exit import ExitSettings, exit_answers, train_heads
    from compressor.techniques.early_exit import choose_points, exit_points

    grids = [int(g) for g in args.grids.split(",")]
    examples = [ensure_example(name, args.work, args.source) for name in args.examples.split(",")]
    jobs = [(folder / "model.keras", folder) for folder, _ in examples]
    jobs += [(path, examples[0][0]) for path in args.models]
    print(f"Command: `python benchmarks/exit_heads.py --examples {args.examples} --grids {args.grids}"
          f"{' --models ...' if args.models else ''}`\n")
    print(f"Machine: {platform.machine()}, Python {platform.python_version()}. Heads trained on the example's "
          f"training split, measured on its validation split.\n")
    print(f"| model | exit point | FLOPs fraction | grid | head accuracy | answers at {RIGHT:.0%} right | "
          f"head FLOPs / model | train (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path, folder in jobs:
        model = load_model(path)
        train, val = (np.load(folder / f"{split}.npz") for split in ("train", "val"))
        train = Dataset(train["x"], train["y"].astype(np.int64), "train")
        x, y = val["x"], val["y"].astype(np.int64)
        points = choose_points(exit_points(model))
        flops = model_cost(model).flops
        classes = int(model.outputs[0].shape[-1])
        label = path.parent.name if path.name == "model.keras" else path.name
        for grid in grids:
            started = time.perf_counter()
            heads = train_heads(model, points, train, classes, ExitSettings(grid=grid))
            seconds = time.perf_counter() - started
            probabilities, _ = exit_answers(model, points, heads, x)
            for point, head, p in zip(points, heads, probabilities):
                print(f"| {label} | {point.name} | {point.fraction:.2f} | {grid} | {np.mean(p.argmax(-1) == y):.3f} | "
                      f"{answered_share(p, y):.2f} | {model_cost(head).flops / flops:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
