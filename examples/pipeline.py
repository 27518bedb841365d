"""A build-pipeline step in Python: compress under a budget, check the result, gate on latency.

    python examples/pipeline.py example/model.keras example/val.npz example/test.npz build/ \
        [--max-acc-loss 0.02] [--quantize int8] [--baseline last-bench.json]

Exits like the CLI: 0 ok, 1 error, 2 budget not met, 3 latency regression against
--baseline (a JSON written by an earlier run of this script or by `compressor bench
--output`). It writes build/bench.json, the next run's baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import compressor


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data", help="labelled search data (.npz)")
    parser.add_argument("test_data", help="labelled held-out data (.npz)")
    parser.add_argument("out")
    parser.add_argument("--max-acc-loss", type=float, default=0.02)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--baseline", help="bench JSON of the last accepted build")
    parser.add_argument("--max-regression", type=float, default=0.10)
    args = parser.parse_args(argv)

    try:
        result = compressor.compress(
            args.model, data=args.data, test_data=args.test_data, out=args.out, method="fixed_loss",
            max_acc_loss=args.max_acc_loss, quantize=args.quantize, overwrite=True, runs=20,
            log=lambda message: print(f"... {message}", file=sys.stderr),
        )
    except compressor.CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    budget = result.report["budget"]
    print(f"{result.status}: accuracy drop {budget['achieved']:.4f} (limit {budget['limit']}) on {budget['artifact']}")
    for entry in result.report["artifacts"]:
        if entry["latency_ms"]:
            print(f"  {Path(entry['path']).name}: {entry['bytes']:,} bytes, {entry['latency_ms']['median']:.3f} ms "
                  f"({entry['latency_ratio']:.2f}x the original), accuracy {entry['accuracy']:.4f}")
    if result.status != "ok":
        return 2

    # Time the artifact the budget was measured on, keep the numbers for the next run.
    try:
        timing = compressor.benchmark([result.out / budget["artifact"]], data=args.test_data, runs=100, warmup=10,
                                      baseline=args.baseline, max_regression=args.max_regression)
    except compressor.CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (result.out / "bench.json").write_text(json.dumps(timing.report, indent=2) + "\n")
    if not timing.passed:
        for regression in timing.gate.regressions:
            print(f"latency regression: {regression}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
