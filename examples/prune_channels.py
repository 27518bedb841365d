"""Channel pruning from Python: one FLOPs budget, each importance criterion, fine-tuned with the original as teacher.

    python examples/prune_channels.py example/ [--keep 0.5] [--criteria magnitude,fpgm] [--epochs 1]

EXAMPLE_DIR holds model.keras, train.npz, val.npz and test.npz (as `compressor example`
writes them). Each criterion gets its own run of `compress --techniques channels` into
EXAMPLE_DIR/channels-CRITERION; the report says which channel groups went and which
stayed whole (and why).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import compressor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of the FLOPs kept")
    parser.add_argument("--criteria", default="magnitude,fpgm", help="comma-separated: magnitude, snip, synflow, fpgm, hessian")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per pruning step")
    args = parser.parse_args()

    model = args.folder / "model.keras"
    before = compressor.inspect(model)
    prunable = [layer.name for layer in before.layers if "channel" in layer.techniques]
    print(f"{before.model}: {before.flops:,} FLOPs; {len(prunable)} layers can lose channels")

    for criterion in args.criteria.split(","):
        result = compressor.compress(
            model, data=args.folder / "val.npz", test_data=args.folder / "test.npz", train_data=args.folder / "train.npz",
            method="fixed_params", compression_factor=args.keep, budget_on="flops", techniques=("channels",),
            criterion=criterion, finetune_epochs=args.epochs, export=("tflite",), out=args.folder / f"channels-{criterion}",
            overwrite=True, runs=20,
        )
        channels, report = result.report["channels"], result.report
        print(f"{criterion}: {channels['channels_removed']} channels out of {channels['groups_pruned']} groups; "
              f"FLOPs {report['baseline']['flops']:,} → {report['compressed']['flops']:,}; held-out accuracy "
              f"{report['baseline']['accuracy']:.4f} → {report['compressed']['accuracy']:.4f} ({result.status})")
    for blocked in channels["groups_blocked"]:
        print(f"  kept whole: {blocked['group']} ({blocked['reason']})")


if __name__ == "__main__":
    main()
