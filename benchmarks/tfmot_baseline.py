"""The tfmot baseline: magnitude pruning with `prune_low_magnitude` on the same model.

    python benchmarks/tfmot_baseline.py DIR --target-params N --epochs E [--out OUT]

DIR holds model.keras, train.npz and test.npz (as `compressor example NAME --out DIR`
writes them). tfmot 0.8.1 refuses Keras 3 models, so the model is rebuilt in legacy
tf_keras from its own layer configs (a generic graph walk, no per-architecture
builder), the trained weights are copied by layer name, and the copy must predict
what the original predicts (within PARITY_ATOL) before anything is pruned. Then
tfmot's recipe: wrap every prunable layer (Conv/Dense/Depthwise kernels; BatchNorm
and biases stay dense), fine-tune with a `PolynomialDecay` sparsity schedule up to
the sparsity that leaves `target_params` non-zero parameters, `strip_pruning`, and
convert to TFLite twice: plain (zeros stored densely) and with
`tf.lite.Optimize.EXPERIMENTAL_SPARSITY` (zeros left out of the file).

The fine-tuning mirrors `compressor.finetune`'s defaults so the comparison is about
the pruning, not the training: Adam with a cosine decay to 0 over the planned steps,
the sparsity schedule reaching its target at 60% of them, masks updated every 20
steps, power 3. The loss is the labels' cross-entropy (tfmot's recipe; ours adds
distillation from the original).
"""

from __future__ import annotations

import argparse
import inspect
import math
import numbers
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError, first_line
from compressor.io.data import Dataset

# Float32 sums in a different op order (tf_keras vs Keras 3 kernels) differ by ~1e-6
# on softmax outputs; a wrong config or a weight copied to the wrong place is off by
# far more than this.
PARITY_ATOL = 1e-4
PARITY_SAMPLES = 64
# Same schedule shape as compressor.finetune.GradualSparsity's defaults.
SCHEDULE_END_FRACTION = 0.6
SCHEDULE_FREQUENCY = 20
SCHEDULE_POWER = 3
# Keyword arguments every tf_keras layer takes through its base class's **kwargs.
_BASE_LAYER_KWARGS = frozenset(
    {"name", "trainable", "dtype", "dynamic", "activity_regularizer", "input_shape",
     "batch_input_shape", "batch_size", "weights", "autocast", "input_dim"}
)


def tfmot_prune(
    model_path: Path,
    train: Dataset,
    test: Dataset,
    target_params: int,
    epochs: int,
    out_dir: Path,
    *,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Prune a Keras 3 model with tfmot to `target_params` non-zeros; write two TFLite files.

    Args:
        model_path: The trained Keras 3 model (.keras).
        train: Labelled data for the fine-tuning.
        test: Labelled held-out data; the accuracy is the TFLite file's on it.
        target_params: Non-zero parameters to keep, counted as
            `compressor.graph.cost.stored_params` counts them (every weight, pruned
            kernels by their non-zeros).
        epochs: Fine-tuning epochs, >= 1.
        out_dir: Folder for `tfmot.tflite` and `tfmot_sparse.tflite` (created).
        batch_size: Samples per optimizer step.
        learning_rate: Adam's initial learning rate.
        seed: Seeds weight shuffling and the TF random state.

    Returns:
        {"tflite", "sparse_tflite": paths, "bytes", "sparse_bytes": file sizes,
        "nonzero_params", "params": ints, "sparsity": the final sparsity of tfmot's schedule
        (fraction of each prunable kernel set to zero), "accuracy": top-1 of tfmot.tflite on `test`,
        "seconds": wall time of wrapping, pruning and fine-tuning}.

    Raises:
        CompressorError: The model cannot be rebuilt in tf_keras or its copy does not
            match, the data has no labels, or `target_params`/`epochs` is out of range.
    """
    import tf_keras

    from compressor.bench.benchmark import top1_accuracy
    from compressor.bench.runtime import open_artifact
    from compressor.graph.cost import stored_params
    from compressor.io.models import load_model

    _check_run(train, test, epochs)
    original = load_model(model_path)
    tf_keras.utils.set_random_seed(seed)
    legacy = to_tf_keras(original)
    check_parity(original, legacy, test.x[:PARITY_SAMPLES])

    start = time.perf_counter()
    stripped, sparsity = _prune_and_finetune(legacy, train, target_params, epochs, batch_size, learning_rate)
    seconds = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    dense_path = _write_tflite(stripped, out_dir / "tfmot.tflite", sparse=False)
    sparse_path = _write_tflite(stripped, out_dir / "tfmot_sparse.tflite", sparse=True)
    return {
        "tflite": dense_path,
        "sparse_tflite": sparse_path,
        "bytes": dense_path.stat().st_size,
        "sparse_bytes": sparse_path.stat().st_size,
        "nonzero_params": stored_params(stripped),
        "params": int(stripped.count_params()),
        "sparsity": sparsity,
        "accuracy": top1_accuracy(open_artifact(dense_path), test),
        "seconds": seconds,
    }


def _check_run(train: Dataset, test: Dataset, epochs: int) -> None:
    if train.y is None or test.y is None:
        raise CompressorError(
            "Invalid data. Expected labelled train and test data (fine-tuning and accuracy "
            f"need labels). Received: train={train.source}, test={test.source} without y"
        )
    if not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise CompressorError(f"Invalid epochs. Expected an integer >= 1. Received: epochs={epochs!r}")


# --- Keras 3 -> tf_keras ---------------------------------------------------------------


def to_tf_keras(model: Any) -> Any:
    """Rebuild a Keras 3 Functional model in tf_keras, layer by layer, with its weights.

    Args:
        model: A Keras 3 Functional (or built Sequential) model of built-in layers.

    Returns:
        A tf_keras Functional model with the same layer names, graph and weights.

    Raises:
        CompressorError: The model has no graph, nests a model, or uses an operation
            or layer config tf_keras cannot rebuild.
    """
    import tf_keras

    from compressor.graph.walk import graph_of  # the package's one walker over a graph's nodes

    graph = graph_of(model)
    if graph is None:
        raise CompressorError(f"model '{model.name}' has no layer graph: tf_keras rebuild needs a Functional model")
    tensors: dict[int, Any] = {}  # id(Keras 3 KerasTensor) -> tf_keras tensor
    layers: dict[int, Any] = {}  # id(Keras 3 layer) -> its tf_keras twin (shared layers stay shared)
    for node in graph.nodes:
        if node.is_input:
            tensors[id(node.outputs[0])] = _tf_keras_input(node.operation)
            continue
        twin = layers.get(id(node.operation))
        if twin is None:
            twin = layers[id(node.operation)] = _tf_keras_layer(node.operation)
        inputs = [tensors[id(x)] for x in node.inputs]
        # Merge layers (Add, Concatenate, ...) take a list; every other layer one tensor.
        outputs = twin(inputs if len(inputs) > 1 else inputs[0])
        for keras3_tensor, legacy_tensor in zip(node.outputs, tf.nest.flatten(outputs)):
            tensors[id(keras3_tensor)] = legacy_tensor
    legacy = tf_keras.Model(
        [tensors[id(x)] for x in graph.inputs], [tensors[id(x)] for x in graph.outputs], name=model.name
    )
    for layer in model.layers:
        if layer.weights:
            legacy.get_layer(layer.name).set_weights(layer.get_weights())
    return legacy


def _tf_keras_input(layer: Any) -> Any:
    import tf_keras

    config = layer.get_config()
    return tf_keras.Input(batch_shape=tuple(config["batch_shape"]), dtype=config["dtype"], name=layer.name)


def _tf_keras_layer(layer: Any) -> Any:
    import keras
    import tf_keras

    if isinstance(layer, keras.Model):
        raise CompressorError(
            f"cannot rebuild nested model '{layer.name}' in tf_keras: flatten it into one Functional model first"
        )
    if not isinstance(layer, keras.layers.Layer):
        raise CompressorError(
            f"cannot rebuild operation '{layer.name}' ({type(layer).__name__}) in tf_keras: "
            "only Keras layers have a tf_keras twin"
        )
    class_name = type(layer).__name__
    # Unknown here means deserialize below raises and says so.
    config = _clean_config(layer.get_config(), getattr(tf_keras.layers, class_name, None))
    try:
        return tf_keras.layers.deserialize({"class_name": class_name, "config": config}, use_legacy_format=True)
    except Exception as exc:
        raise CompressorError(
            f"cannot rebuild layer '{layer.name}' ({class_name}) in tf_keras: {first_line(exc)}"
        ) from exc


def _clean_config(config: dict, cls: Any) -> dict:
    """A Keras 3 layer config in the form tf_keras' constructors accept.

    Keras 3 writes dtype policies as serialized objects, nested objects with
    `module`/`registered_name`, and arguments tf_keras does not know
    (`quantization_config`, `input_axes` of initializers, ...). Initializers become
    bare class names: the trained weights are copied over them anyway. Arguments the
    tf_keras class does not take are dropped; the parity check catches any that mattered.
    """
    cleaned = {}
    allowed = _accepted_kwargs(cls)
    for key, value in config.items():
        if allowed is not None and key not in allowed:
            continue
        if key == "dtype" and isinstance(value, dict):
            value = value["config"]["name"]
        elif key.endswith("_initializer") and isinstance(value, dict):
            value = value["class_name"]
        elif isinstance(value, dict) and "class_name" in value:
            value = {"class_name": value["class_name"], "config": value.get("config", {})}
        cleaned[key] = value
    return cleaned


def _accepted_kwargs(cls: Any):
    """Names `cls.__init__` takes (its own and the base Layer's); None if unknown."""
    if cls is None:
        return None
    params = inspect.signature(cls.__init__).parameters
    return {name for name in params if name != "self"} | _BASE_LAYER_KWARGS


def check_parity(original: Any, legacy: Any, x: np.ndarray) -> float:
    """Check the tf_keras copy predicts what the Keras 3 model does.

    Args:
        original: The Keras 3 model.
        legacy: Its tf_keras rebuild.
        x: Samples to compare on.

    Returns:
        The largest absolute difference of their outputs.

    Raises:
        CompressorError: The difference exceeds PARITY_ATOL.
    """
    expected = np.asarray(original(x, training=False))
    actual = np.asarray(legacy(x, training=False))
    diff = float(np.max(np.abs(expected - actual)))
    if not diff <= PARITY_ATOL:  # also fails on NaN
        raise CompressorError(
            f"the tf_keras rebuild of '{original.name}' does not match it: max |diff| {diff:.3g} "
            f"> {PARITY_ATOL} on {len(x)} samples"
        )
    return diff


# --- tfmot pruning ---------------------------------------------------------------------


def _prune_and_finetune(
    legacy: Any, train: Dataset, target_params: int, epochs: int, batch_size: int, learning_rate: float
) -> tuple[Any, float]:
    """Prune with tfmot during fine-tuning; return the stripped model and its kernel sparsity."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    sparsity = _final_sparsity(legacy, target_params)
    steps = epochs * math.ceil(len(train) / batch_size)
    frequency = min(SCHEDULE_FREQUENCY, max(1, int(steps * SCHEDULE_END_FRACTION)))
    # tfmot updates masks only on multiples of `frequency`: end on one so the last
    # update applies the final sparsity.
    end = max(frequency, int(steps * SCHEDULE_END_FRACTION) // frequency * frequency)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end,
        power=SCHEDULE_POWER, frequency=frequency,
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(legacy, pruning_schedule=schedule)
    lr = tf_keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    from_logits = not _outputs_probabilities(legacy, train.x[:PARITY_SAMPLES])
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(lr),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
    )
    pruned.fit(
        train.x, train.y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return tfmot.sparsity.keras.strip_pruning(pruned), sparsity


def _final_sparsity(legacy: Any, target_params: int) -> float:
    """The kernel sparsity that leaves `target_params` non-zeros in the whole model.

    tfmot prunes every prunable weight to the same sparsity; everything else (BN,
    biases) stays, so it is subtracted from the target first.
    """
    total = int(legacy.count_params())
    prunable = _prunable_count(legacy)
    fixed = total - prunable
    if not isinstance(target_params, numbers.Integral) or not fixed < target_params < total:
        raise CompressorError(
            f"Invalid target_params. Expected an integer in ({fixed}, {total}): the model has {total} "
            f"parameters of which {fixed} (BatchNorm, biases, ...) tfmot does not prune. "
            f"Received: target_params={target_params!r}"
        )
    return 1.0 - (target_params - fixed) / prunable


def _prunable_count(legacy: Any) -> int:
    """Weights tfmot would prune: wrap once with a throwaway schedule and count."""
    import tensorflow_model_optimization as tfmot

    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        legacy, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    )
    return sum(
        int(np.prod(weight.shape))
        for layer in wrapped.layers
        if hasattr(layer, "pruning_vars")
        for weight, _mask, _threshold in layer.pruning_vars
    )


def _outputs_probabilities(model: Any, x: np.ndarray) -> bool:
    """Whether the model's outputs are class probabilities (rows >= 0 summing to 1)."""
    y = np.asarray(model(x, training=False))
    return bool(np.all(y >= 0) and np.allclose(y.sum(axis=-1), 1.0, atol=1e-3))


def _write_tflite(model: Any, path: Path, sparse: bool) -> Path:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    path.write_bytes(converter.convert())
    return path


# --- command line ----------------------------------------------------------------------


def main() -> None:
    from compressor.bench.benchmark import benchmark
    from compressor.export.writers import export_tflite
    from compressor.io.data import load_data
    from compressor.io.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder with model.keras, train.npz, test.npz")
    parser.add_argument("--target-params", type=int, required=True, help="non-zero parameters to keep")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: DIR/tfmot)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    out = args.out or args.dir / "tfmot"

    try:
        train, test = load_data(args.dir / "train.npz"), load_data(args.dir / "test.npz")
        result = tfmot_prune(
            args.dir / "model.keras", train, test, args.target_params, args.epochs, out,
            batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        )
        original = export_tflite(load_model(args.dir / "model.keras"), out / "original.tflite")
        report = benchmark([original, result["tflite"], result["sparse_tflite"]], data=test,
                           runs=args.runs, warmup=args.warmup)
    except CompressorError as exc:
        sys.exit(f"error: {first_line(exc)}")
    print(_table(args, result, report))


def _table(args: argparse.Namespace, result: dict, report: Any) -> str:
    base = report.results[0]
    rows = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"TF {tf.__version__}. Command: python benchmarks/tfmot_baseline.py {args.dir} "
        f"--target-params {args.target_params} --epochs {args.epochs} --learning-rate {args.learning_rate:g}",
        f"tfmot prune_low_magnitude: kernel sparsity {result['sparsity']:.1%}, non-zero params "
        f"{result['nonzero_params']:,} of {result['params']:,}, prune + fine-tune {result['seconds']:.0f} s. "
        f"TFLite at batch 1, {report.threads} thread, {report.runs} interleaved runs "
        f"({report.warmup} warm-up), accuracy on {report.samples} test samples.",
        "",
        "| artifact | non-zero params | KiB | test accuracy | median ms | p90 ms | × original |",
        "|---|---|---|---|---|---|---|",
    ]
    nonzero = [result["params"], result["nonzero_params"], result["nonzero_params"]]
    for name, params, res in zip(("original", "tfmot", "tfmot sparse storage"), nonzero, report.results):
        ms = res.latency_ms
        rows.append(
            f"| {name} | {params:,} | {res.bytes / 1024:.0f} | {res.accuracy:.2%} "
            f"| {ms.median:.3f} | {ms.p90:.3f} | {ms.median / base.latency_ms.median:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
