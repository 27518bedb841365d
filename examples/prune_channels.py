"""Channel pruning with the library: groups, scores, one cut, distillation fine-tuning.

    python examples/prune_channels.py example/ [--fraction 0.3] [--criterion fpgm] [--epochs 2]

EXAMPLE_DIR holds model.keras, train.npz and val.npz (as `compressor example` writes
them). `compress --techniques channels` does the same in steps under a budget; this
script shows the pieces.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor.finetune import FinetuneConfig, accuracy, finetune
from compressor.graph.cost import model_cost
from compressor.graph.groups import channel_groups
from compressor.io.data import load_data
from compressor.io.models import load_model
from compressor.search.channels import group_scores, removal_order, removals_of
from compressor.surgery.channels import prune_channels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--fraction", type=float, default=0.3, help="fraction of all prunable channels to remove")
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    model = load_model(args.folder / "model.keras")
    train, val = load_data(str(args.folder / "train.npz")), load_data(str(args.folder / "val.npz"))
    groups = channel_groups(model)
    for group in groups:
        print(f"{group.name}: {group.size} channels, {len(group.producers)} producer(s)"
              + ("" if group.prunable else f" — kept whole: {group.reason}"))

    scores = group_scores(model, groups, args.criterion, train)
    order = removal_order(groups, scores, max_fraction=0.9)
    removals = removals_of(order, int(args.fraction * sum(g.size for g in groups if g.prunable)))
    pruned = prune_channels(model, removals, groups)
    before, after = model_cost(model), model_cost(pruned)
    print(f"FLOPs {before.flops:,} → {after.flops:,}; val accuracy {accuracy(model, val):.4f} → {accuracy(pruned, val):.4f}")

    result = finetune(pruned, model, train, FinetuneConfig(epochs=args.epochs), val=val)
    print(f"after {result.epochs_run} fine-tuning epoch(s): val accuracy {accuracy(pruned, val):.4f}")


if __name__ == "__main__":
    main()
