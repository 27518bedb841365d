"""Train the gates of a gated model, tune them to an accuracy budget, and measure what they skip.

Training (`train_gates`) minimizes, per batch,

    distillation + cross-entropy  +  penalty · max(0, mean_i c_i − target)²

where c_i is the fraction of the ungated model's FLOPs that input i runs:
(F − Σ_b F_b · skip_b,i) / F, with F_b the FLOPs of block b's branch. The decisions
are hard (0/1) in the forward pass and reach the gates' weights through their
probabilities (straight-through), so each block's share of the penalty is weighted by
its FLOPs: gates in front of costly blocks learn to close first. The teacher is the
model before gating: the gated model learns to answer as it did.

By default the network's weights train with the gates (their batch-norm statistics stay
as they are, so open and shut blocks see the same ones): a network that learns to do
without some blocks loses far less than one whose blocks are skipped as they were (on
the digits ResNet-20, target 0.6, 5 epochs: gates alone still ran 99% of the compute,
every skip costing too much; with the network, 82% at 1.4 points lost on held-out
data). `network=False` trains the gates alone.

`fit_offset` then moves every gate's decision by one offset, searched on the search
data, so that the gated model's accuracy stays within an accuracy budget: open more
blocks when the trained gates lose too much.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import keras
import numpy as np

from compressor.distillation import (
    DEFAULT_TEMPERATURE,
    as_logits,
    distillation_term,
    student_probabilities,
    teacher_logits,
)
from compressor.errors import CompressorError, OptionError
from compressor.io.data import Dataset
from compressor.layers.gating import SkipGate, gate_layers
from compressor.techniques.gating import (
    ResidualBlock,
    find_residual_blocks,
    gate_tensors,
    gated_blocks,
    insert_gates,
    remove_gates,
    remove_shut_blocks,
    set_offsets,
)

EpochCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GatingConfig:
    """How to train gates.

    Attributes:
        target: Fraction of the ungated model's FLOPs to aim for per input, in (0, 1].
        epochs: Passes over the training data, >= 1.
        network: Train the network's weights too (at `network_learning_rate`).
        penalty: Weight of the compute penalty.
        learning_rate: Adam's learning rate for the gates (cosine-decayed).
        network_learning_rate: Adam's learning rate for the network's weights.
        batch_size: Samples per step.
        seed: Shuffling and initialization seed.
    """

    target: float = 0.6
    epochs: int = 5
    network: bool = True
    penalty: float = 2.0
    learning_rate: float = 0.05
    network_learning_rate: float = 1e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise CompressorError(f"Invalid gating target. Expected a fraction of compute in (0, 1]. Received: target={self.target!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise CompressorError(f"Invalid gating epochs. Expected an integer >= 1. Received: epochs={self.epochs!r}")


@dataclass(frozen=True)
class GatingResult:
    """What training did.

    Attributes:
        history: Per epoch: {"epoch", "loss", "compute"} (compute: mean fraction of FLOPs run).
        seconds: Wall-clock time.
    """

    history: tuple[dict, ...]
    seconds: float


TEMPERATURE = DEFAULT_TEMPERATURE  # distillation from the model before gating, as in compressor.finetune
DISTILLATION = 0.5  # weight of the teacher term; the labels' cross-entropy gets the rest

ATTEMPTS = 3
"""Trainings tried under an accuracy budget: each one that misses aims at more compute."""

MIN_GATE_SKIP = 0.1
"""A gate that skips its block for fewer inputs than this is taken out (the block always runs):
it would cost its pooling and IF op for every input to save little."""

SHUT_RATE = 0.99
"""A gate that skips its block for at least this share of the inputs: the block is removed instead
(`compressor.techniques.gating.remove_shut_blocks`), if the accuracy floor still holds."""

MIN_SAVING = 0.03
"""Gates that skip less than this fraction of the compute are not kept: an open gate costs
a little (its pooling, and the IF op around the block), so they would save nothing."""


@dataclass
class GatingOutcome:
    """What `gate_model` made.

    Attributes:
        model: The gated model, or None when no training met the accuracy floor.
        blocks: The residual blocks that got gates.
        removed: Add names of the blocks whose gates were shut for at least SHUT_RATE
            of the inputs, removed from the model instead (no gate, no branch).
        flops: Add name -> FLOPs skipping that block saves.
        config: The settings of the training kept (its target may be above the asked one).
        offset: The offset set on every gate after training.
        history: The kept training's history.
        attempts: Per training: {"target", "offset", "accuracy" and "met" (on the search data,
            against the floor), "train_compute" (last epoch), "compute" (measured, when it met)}.
        seconds: Wall-clock time of all trainings.
        accuracy: The kept model's accuracy on the search data (None without a floor).
        baseline_accuracy: The original model's accuracy there, when the caller measured it.
        reason: Why there is no model, for people.
        latency_check: The caller's TFLite timing of the static and the gated model, if any.
    """

    model: Optional[keras.Model]
    blocks: list[ResidualBlock]
    flops: dict[str, int]
    config: GatingConfig
    offset: float = 0.0
    removed: tuple[str, ...] = ()
    history: tuple[dict, ...] = ()
    attempts: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    accuracy: Optional[float] = None
    baseline_accuracy: Optional[float] = None
    reason: Optional[str] = None
    latency_check: Optional[dict] = None


def gate_model(static: keras.Model, train: Dataset, config: GatingConfig, search: Optional[Dataset] = None,
               min_accuracy: Optional[float] = None, on_epoch: Optional[EpochCallback] = None,
               log: Callable[[str], None] = lambda message: None) -> GatingOutcome:
    """Gate every residual block of `static` and train the gates (module docstring).

    With `min_accuracy` (and labelled `search` data), the gated model must reach it on
    `search`: a training that misses, even after `fit_offset`, is retried aiming at
    more compute (half-way to 1), up to ATTEMPTS times; if none reaches it the
    outcome has no model. Gates that skip less than MIN_SAVING of the compute (on
    `search`, else on `train`) are not kept either.

    Raises:
        CompressorError: No residual block, or training data without labels.
    """
    from compressor.graph.cost import model_cost

    start = time.perf_counter()
    blocks = find_residual_blocks(static)
    if not blocks:
        raise CompressorError(f"model '{static.name}' has no residual block (a branch added back to its input) to gate")
    flops = block_flops(static, blocks)
    total = model_cost(static).flops
    outcome = GatingOutcome(None, blocks, flops, config)
    target = config.target
    outcome.reason = "no gate training kept the accuracy within the budget on the search data"
    measured = search if search is not None else train
    for _ in range(ATTEMPTS if min_accuracy is not None else 1):
        settings = dataclasses.replace(config, target=target)
        log(f"training gates of {len(blocks)} residual block(s) towards {target:.0%} of the compute")
        gated = insert_gates(static, blocks)
        result = train_gates(gated, static, train, flops, total, settings, on_epoch=on_epoch)
        attempt = {"target": target, "offset": 0.0, "accuracy": None, "met": None,
                   "train_compute": result.history[-1]["compute"], "compute": None}
        outcome.attempts.append(attempt)
        if min_accuracy is not None:
            offset, reached = fit_offset(gated, search, min_accuracy)
            attempt.update(offset=offset, accuracy=reached, met=reached >= min_accuracy)
            if not attempt["met"]:
                target = (target + 1.0) / 2
                continue
            outcome.offset, outcome.accuracy = offset, reached
        gated, blocks_kept = _drop_idle_gates(gated, blocks, measured.x, search, min_accuracy, outcome)
        gated, blocks_kept, removed = _remove_shut_blocks(gated, blocks_kept, measured.x, search, min_accuracy, outcome)
        attempt["gates_kept"] = len(blocks_kept)
        if not blocks_kept:
            outcome.reason = f"no gate skips its block for {MIN_GATE_SKIP:.0%} of the inputs" if not removed else (
                f"every kept gate shut its block for {SHUT_RATE:.0%} of the inputs: remove those blocks instead "
                f"(--techniques blocks: {', '.join(removed)})")
            break
        compute = compute_fraction(gated, measured.x, flops, total) - sum(flops[name] for name in removed) / total
        attempt["compute"] = compute
        if compute > 1.0 - MIN_SAVING:
            outcome.reason = f"the trained gates run {compute:.1%} of the compute: too little skipped to pay for the gates"
            break
        outcome.model, outcome.config, outcome.history, outcome.reason = gated, settings, result.history, None
        outcome.blocks, outcome.removed = blocks_kept, removed
        break
    outcome.seconds = time.perf_counter() - start
    return outcome


def _drop_idle_gates(gated: keras.Model, blocks: list[ResidualBlock], x: np.ndarray, search: Optional[Dataset],
                     min_accuracy: Optional[float], outcome: GatingOutcome) -> tuple[keras.Model, list[ResidualBlock]]:
    """Take out the gates that skip for fewer than MIN_GATE_SKIP of `x`, if the accuracy floor still holds.

    Returns:
        The model and the blocks that keep a gate (none: no gate is worth keeping).
    """
    from compressor.finetune import accuracy

    names = gated_blocks(gated)
    rates = (gate_logits(gated, x) <= 0).mean(axis=0)
    keep = {name for name, rate in zip(names, rates) if rate >= MIN_GATE_SKIP}
    if len(keep) == len(names) or not keep:
        return gated, [block for block in blocks if block.add in keep]
    fewer = remove_gates(gated, keep)
    if min_accuracy is not None:
        reached = accuracy(fewer, search)
        if reached < min_accuracy:
            return gated, blocks  # the idle gates still skip for some inputs that matter
        outcome.accuracy = reached
    return fewer, [block for block in blocks if block.add in keep]


def _remove_shut_blocks(gated: keras.Model, blocks: list[ResidualBlock], x: np.ndarray, search: Optional[Dataset],
                        min_accuracy: Optional[float], outcome: GatingOutcome
                        ) -> tuple[keras.Model, list[ResidualBlock], tuple[str, ...]]:
    """Remove the blocks whose gates skip for SHUT_RATE of `x`, if the floor holds: (model, gated blocks, removed)."""
    from compressor.finetune import accuracy

    names = gated_blocks(gated)
    rates = (gate_logits(gated, x) <= 0).mean(axis=0)
    shut = tuple(name for name, rate in zip(names, rates) if rate >= SHUT_RATE)
    if not shut:
        return gated, blocks, ()
    fewer = remove_shut_blocks(gated, set(shut))
    if min_accuracy is not None:
        reached = accuracy(fewer, search)
        if reached < min_accuracy:
            return gated, blocks, ()  # the few inputs that open them matter
        outcome.accuracy = reached
    return fewer, [block for block in blocks if block.add not in shut], shut


def compute_fraction(gated: keras.Model, x: np.ndarray, flops: dict[str, int], total: int) -> float:
    """Mean fraction of the ungated model's FLOPs the gated model runs per input of `x`."""
    names = gated_blocks(gated)
    skipped = (gate_logits(gated, x) <= 0) * np.array([flops[name] for name in names], dtype=np.float64)
    return float(1.0 - skipped.sum(axis=1).mean() / total)


def block_flops(model: keras.Model, blocks: list[ResidualBlock]) -> dict[str, int]:
    """FLOPs at batch 1 that skipping each block saves: its branch's layers and the Add."""
    from compressor.graph.cost import model_cost

    rows = {row.name: row.flops for row in model_cost(model).layers}
    return {block.add: sum(rows.get(name, 0) for name in (*block.layers, block.add)) for block in blocks}


def train_gates(gated: keras.Model, teacher: keras.Model, train: Dataset, flops: dict[str, int], total_flops: int,
                config: GatingConfig, on_epoch: Optional[EpochCallback] = None) -> GatingResult:
    """Train the gates of `gated` in place (module docstring).

    Args:
        gated: The model from `insert_gates`.
        teacher: The model before gating (its outputs are distilled).
        train: Training data with labels.
        flops: Add name -> FLOPs its block costs (`block_flops`).
        total_flops: FLOPs of the ungated model.
        config: The run's settings.
        on_epoch: Called with (epoch, epochs) after each epoch.

    Raises:
        CompressorError: Training data without labels, or a model that is not gated.
    """
    import tensorflow as tf

    if train.y is None:
        raise CompressorError(f"training gates needs labels: {train.source} has no 'y'")
    pairs = gate_layers(gated)
    if not pairs:
        raise CompressorError(f"model '{gated.name}' has no gates to train")
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    standardize_gates(gated, train.x[: config.batch_size * 8])
    classes = int(gated.outputs[0].shape[-1])
    soft = teacher_logits(teacher, train, classes)
    probabilities = student_probabilities(gated, train.x)
    both = keras.Model(gated.inputs, [gated.outputs[0], *[logit for _, logit in gate_tensors(gated)]])
    share = tf.constant([flops[name] / total_flops for name in gated_blocks(gated)], tf.float32)
    gate_vars = [v for gate, _ in pairs for v in gate.trainable_variables]
    gate_ids = {id(v) for v in gate_vars}
    net_vars = [v for v in gated.trainable_variables if id(v) not in gate_ids] if config.network else []
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    optimizers = [(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)), gate_vars)]
    if net_vars:
        optimizers.append((keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(config.network_learning_rate, steps)), net_vars))
    for optimizer, variables in optimizers:
        optimizer.build(variables)
    variables = gate_vars + net_vars
    target, penalty = float(config.target), float(config.penalty)

    @tf.function(reduce_retracing=True)
    def step(x, y, t):
        with tf.GradientTape() as tape:
            out, *logits = both(x, training=False)  # batch-norm statistics stay: open and shut blocks see the same ones
            out = tf.cast(out, tf.float32)
            student = as_logits(out, probabilities)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=student))
            loss = (1 - DISTILLATION) * ce + distillation_term(t, student, TEMPERATURE, DISTILLATION)
            logit = tf.concat(logits, axis=1)  # (batch, blocks)
            p = tf.sigmoid(logit)
            run = p + tf.stop_gradient(tf.cast(logit > 0, tf.float32) - p)
            compute = 1.0 - tf.reduce_sum((1.0 - run) * share, axis=1)
            mean_compute = tf.reduce_mean(compute)
            loss += penalty * tf.square(tf.nn.relu(mean_compute - target))
        grads = tape.gradient(loss, variables)
        offset = 0
        for optimizer, group in optimizers:
            chunk = grads[offset : offset + len(group)]
            optimizer.apply_gradients([(g, v) for g, v in zip(chunk, group) if g is not None])
            offset += len(group)
        return loss, mean_compute

    rng = np.random.default_rng(config.seed)
    y = train.y.astype(np.int64)
    history = []
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(train))
        losses, computes = [], []
        for lo in range(0, len(order), config.batch_size):
            batch = order[lo : lo + config.batch_size]
            loss, compute = step(train.x[batch], y[batch], soft[batch])
            losses.append(float(loss) * len(batch))
            computes.append(float(compute) * len(batch))
        history.append({"epoch": epoch, "loss": sum(losses) / len(order), "compute": sum(computes) / len(order)})
        if on_epoch is not None:
            on_epoch(epoch, config.epochs)
    return GatingResult(tuple(history), time.perf_counter() - start)


def fit_offset(gated: keras.Model, data: Dataset, min_accuracy: float, fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> tuple[float, float]:
    """The smallest offset >= 0 (most skipping) whose accuracy on `data` reaches `min_accuracy`.

    Tried: 0 (the trained gates), then offsets that open the given fractions of the
    decisions that are shut at 0, easiest first. Accuracy need not rise with the
    offset once the network has learned to work with skipped blocks, so each is
    measured. When none reaches `min_accuracy`, the most accurate is kept.
    The chosen offset is set on the model.

    Returns:
        (offset, accuracy at that offset).
    """
    from compressor.finetune import accuracy

    set_offsets(gated, 0.0)
    logits = gate_logits(gated, data.x)
    shut = np.sort(-logits[logits <= 0])
    offsets = [0.0] + sorted({float(shut[min(len(shut) - 1, int(f * len(shut)))]) + 1e-4 for f in fractions} if len(shut) else [])
    tried = []
    for offset in offsets:
        set_offsets(gated, offset)
        reached = accuracy(gated, data)
        tried.append((offset, reached))
        if reached >= min_accuracy:
            return offset, reached
    best = max(tried, key=lambda pair: pair[1])
    set_offsets(gated, best[0])
    return best


def standardize_gates(gated: keras.Model, x: np.ndarray) -> None:
    """Give each gate the mean and scale of its pooled input features over `x`."""
    pairs = gate_layers(gated)
    probe = keras.Model(gated.inputs, [SkipGate.pooled(gate_input) for gate_input, _ in gate_tensors(gated)])
    pooled = probe.predict(x, batch_size=256, verbose=0)
    for (gate, _), features in zip(pairs, [pooled] if len(pairs) == 1 else pooled):
        gate.standardize(np.asarray(features))


def gate_logits(gated: keras.Model, x: np.ndarray) -> np.ndarray:
    """Each gate's logit (offset included) per input: (samples, gated blocks), graph order; > 0 runs the block."""
    pairs = gate_layers(gated)
    probe = keras.Model(gated.inputs, [logit for _, logit in gate_tensors(gated)])
    logits = probe.predict(x, batch_size=256, verbose=0)
    logits = [logits] if len(pairs) == 1 else logits
    return np.concatenate([np.asarray(l).reshape(len(x), 1) for l in logits], axis=1)


def gating_statistics(gated: keras.Model, x: np.ndarray, flops: dict[str, int], gated_total: int) -> dict[str, Any]:
    """Skip rate per block and the FLOPs each input runs, over `x`.

    Args:
        gated: A gated model.
        x: Inputs (the held-out data).
        flops: Add name -> FLOPs skipping that block saves.
        gated_total: FLOPs of the gated model with every block running (gates included).

    Returns:
        {"samples", "flops_per_input": {"mean", "min", "p10", "median", "p90", "max",
        "histogram": {"edges", "counts"}}, "blocks": [{"name", "flops", "skip_rate"}]}.
    """
    names = gated_blocks(gated)
    runs = gate_logits(gated, x) > 0
    saved = np.array([flops[name] for name in names], dtype=np.float64)
    per_input = gated_total - ((~runs) * saved).sum(axis=1)
    counts, edges = np.histogram(per_input, bins=10)
    return {
        "samples": int(len(x)),
        "flops_per_input": {
            "mean": float(per_input.mean()),
            "min": float(per_input.min()),
            "p10": float(np.percentile(per_input, 10)),
            "median": float(np.median(per_input)),
            "p90": float(np.percentile(per_input, 90)),
            "max": float(per_input.max()),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        },
        "blocks": [
            {"name": name, "flops": int(f), "skip_rate": float(1.0 - runs[:, i].mean())}
            for i, (name, f) in enumerate(zip(names, saved))
        ],
    }


def gating_record(outcome: GatingOutcome) -> dict[str, Any]:
    """The plan's record of the gates: blocks, training settings, offset, and each gate's weights."""
    config = outcome.config
    gates = {}
    for gate, _ in gate_layers(outcome.model):
        kernel, bias = (keras.ops.convert_to_numpy(w) for w in (gate.kernel, gate.bias))
        gates[gate.name] = {"kernel": [float(v) for v in kernel.ravel()], "bias": float(bias[0])}
    return {
        "blocks": [block.add for block in outcome.blocks],
        **({"removed": list(outcome.removed)} if outcome.removed else {}),
        "target": config.target,
        "epochs": config.epochs,
        "network": config.network,
        "penalty": config.penalty,
        "seed": config.seed,
        "offset": outcome.offset,
        "gates": gates,
    }


def replay_gates(static: keras.Model, record: dict[str, Any], train: Optional[Dataset]) -> keras.Model:
    """Rebuild the gated model a plan records.

    Gates trained alone get their recorded weights back. When the network was trained
    with them, the training is run again with the recorded settings and seed (the
    network's weights are not in the plan), which needs the training data.

    Raises:
        CompressorError: A recorded block the model does not have, or missing training data.
    """
    found = {block.add: block for block in find_residual_blocks(static)}
    removed = list(record.get("removed", []))
    missing = [name for name in [*record["blocks"], *removed] if name not in found]
    if missing:
        raise CompressorError(f"the plan gates residual block(s) the model does not have: {', '.join(missing)}")
    blocks = [found[name] for name in [*record["blocks"], *removed]]
    gated = insert_gates(static, blocks)
    if record.get("network"):
        if train is None:
            raise OptionError("the plan's gates were trained with the network: pass {train_data} to replay them")
        from compressor.graph.cost import model_cost

        config = GatingConfig(target=record["target"], epochs=record["epochs"], network=True,
                              penalty=record.get("penalty", GatingConfig.penalty), seed=record.get("seed", 0))
        train_gates(gated, static, train, block_flops(static, blocks), model_cost(static).flops, config)
    if removed:
        gated = remove_shut_blocks(gated, set(removed))
    if not record.get("network"):
        for gate, _ in gate_layers(gated):
            weights = record["gates"][gate.name]
            gate.kernel.assign(np.asarray(weights["kernel"], np.float32).reshape(gate.kernel.shape))
            gate.bias.assign(np.asarray([weights["bias"]], np.float32))
    set_offsets(gated, float(record.get("offset", 0.0)))
    return gated
