"""Fine-tuning's learning rate: how much a channel-pruned model recovers at each rate.

    python benchmarks/finetune_lr.py FOLDER [--rates 0.0003,0.001,0.003,0.01] [--cuts 1.0,0.5] [--steps 500]

FOLDER is an example's folder (`compressor example fashion-resnet20 --out FOLDER`: model.keras,
train.npz, val.npz). For each rate and each cut: the model pruned in one step to that fraction
of its FLOPs (magnitude channel scores; 1.0: not pruned, fine-tuning alone), fine-tuned for
`--steps` steps of 64 images with the original as teacher (`FinetuneConfig` defaults but the
rate), then measured on val.npz paired with the original: accuracy drop in points, the shares
of images it gets wrong where the original was right (losses) and the reverse (wins).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rates", default="0.0003,0.001,0.003,0.01")
    parser.add_argument("--cuts", default="1.0,0.5")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    import keras

    from compressor.distillation import teacher_predictions
    from compressor.finetune import FinetuneConfig, finetune
    from compressor.io.data import load_data
    from compressor.search.budgets import Budget
    from compressor.search.channel_search import ChannelSettings, search_channels
    from compressor.search.evaluate import correct_predictions

    model = keras.models.load_model(f"{args.folder}/model.keras")
    train, val = load_data(f"{args.folder}/train.npz"), load_data(f"{args.folder}/val.npz")
    base = correct_predictions(model, val)
    teacher = teacher_predictions(model, train.x)
    print(f"Original: {base.mean():.2%} on val.npz ({len(base):,} images); {args.steps} steps of 64 per run.\n")
    print("| rate | FLOPs kept (aimed) | drop (pts) | losses | wins | s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rate in (float(value) for value in args.rates.split(",")):
        config = FinetuneConfig(epochs=1, max_steps=args.steps, learning_rate=rate, seed=0)
        for cut in (float(value) for value in args.cuts.split(",")):
            started = time.perf_counter()
            if cut >= 1.0:
                student = keras.models.clone_model(model)
                student.set_weights(model.get_weights())
                finetune(student, None, train, config, teacher_outputs=teacher)
            else:
                settings = ChannelSettings(step=cut, finetune=config)
                student = search_channels(model, Budget("flops", cut), settings, train_data=train).model
            correct = correct_predictions(student, val)
            change = correct.astype(int) - base.astype(int)
            print(f"| {rate:g} | {cut:g} | {100 * (base.mean() - correct.mean()):.2f} | {(change < 0).mean():.4f} "
                  f"| {(change > 0).mean():.4f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
