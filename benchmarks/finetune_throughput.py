"""Fine-tuning throughput (images/s) of a ResNet-20 on 28x28x1 inputs (Fashion-MNIST's shape).

    python benchmarks/finetune_throughput.py [--samples 6400] [--batch-size 64]
        [--variants once,per_batch,xla] [--code after=.,before=OLD_CHECKOUT] [--repeats 2]
        [--epochs 1] [--threads 2]

Each variant is one `compressor.finetune.finetune` run of `--epochs` (1) epochs over
`--samples` random 28x28x1 images (10 classes; the content does not change the cost), the
student a copy of the teacher (a freshly built `resnet20`), in a fresh process so
that runs do not share traced functions or caches. images/s is samples / the run's
whole wall time (images = samples x epochs), tracing and the teacher's pass
included: what a user waits for.
CPU s is the process's user + system time over the run: on a machine shared with
other work, images per CPU second moves less than the wall time does.

    once       the teacher's outputs computed once before the epoch, streamed with x
    per_batch  the teacher run inside each train step instead
    xla        once, the train step compiled with XLA (jit_compile=True)

`--code` names checkouts of the package to compare (LABEL=PATH, put first on
PYTHONPATH); their runs alternate, `--repeats` rounds, so that a change in the
machine's load touches all of them alike. Code from before `FinetuneConfig.teacher_pass`
runs `once` and `xla` only (its teacher pass is always once). `--samples 54000`
measures a whole Fashion-MNIST training epoch. TensorFlow's intra- and inter-op
threads are set to `--threads`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("once", "per_batch", "xla")


def measure(variant: str, samples: int, batch_size: int, threads: int, epochs: int = 1) -> dict:
    """One fine-tuning epoch in this process; returns its figures."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from compressor import finetune as ft
    from compressor.io.data import Dataset
    from compressor.models.zoo import resnet_cifar

    keras.utils.set_random_seed(0)
    teacher = resnet_cifar(20, input_shape=(28, 28, 1), num_classes=10)
    student = keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    rng = np.random.default_rng(0)
    train = Dataset(rng.random((samples, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, samples), "random")
    fields = {"epochs": epochs, "batch_size": batch_size}
    if variant == "per_batch":
        fields["teacher_pass"] = "per_batch"
    if variant == "xla":
        ft._use_xla = lambda model: True  # noqa: SLF001 - the benchmark forces what the library decides
    try:
        config = ft.FinetuneConfig(**fields)
    except TypeError:
        return {"variant": variant, "skipped": "this code has no teacher_pass"}
    cpu = _cpu_seconds()
    result = ft.finetune(student, teacher, train, config)
    cpu = _cpu_seconds() - cpu
    images = samples * epochs
    return {"variant": variant, "samples": images, "batch_size": batch_size, "steps": result.steps,
            "seconds": round(result.seconds, 2), "images_per_s": round(images / result.seconds, 1),
            "cpu_s": round(cpu, 1), "images_per_cpu_s": round(images / cpu, 1)}


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--variants", default="once,per_batch,xla")
    parser.add_argument("--code", default="after=.", help="LABEL=PATH of each checkout to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.samples, args.batch_size, args.threads, args.epochs)))
        return
    codes = [item.split("=", 1) for item in args.code.split(",")]
    rows = []
    for round_ in range(1, args.repeats + 1):
        for variant in args.variants.split(","):
            for label, path in codes:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(path), os.environ.get("PYTHONPATH", "")])}
                command = [sys.executable, os.path.abspath(__file__), "--one", variant, "--samples", str(args.samples),
                           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                           "--epochs", str(args.epochs)]
                out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
                row = {"code": label, "round": round_, **json.loads(out.strip().splitlines()[-1])}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| code | variant | round | images | batch | steps | wall s | images/s | CPU s | images/CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['code']} | {row['variant']} | {row['round']} | ({row['skipped']}) | | | | | | |")
            continue
        print(f"| {row['code']} | {row['variant']} | {row['round']} | {row['samples']:,} | {row['batch_size']} "
              f"| {row['steps']} | {row['seconds']} | {row['images_per_s']} | {row['cpu_s']} | {row['images_per_cpu_s']} |")


if __name__ == "__main__":
    main()
