"""Recovery fine-tuning: distillation, held masks, gradual sparsity, early stopping.

The models are tiny classifiers of a synthetic task a small network learns in a few
epochs: 8x8 images, each a noisy copy of one of four fixed class patterns.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from compressor import distillation, kernel_masks
from compressor import finetune as ft
from compressor.distillation import teacher_predictions
from compressor.errors import CompressorError
from compressor.finetune import (
    FinetuneConfig,
    GradualSparsity,
    accuracy,
    finetune,
    fixed_masks,
)
from compressor.graph import outputs as graph_outputs
from compressor.io.data import Dataset
from compressor.surgery.plan import PlanError, SparsitySpec
from compressor.techniques.base import kept_count, pattern_kernel

CLASSES = 4


def make_data(n, seed, labels=True):
    """Noisy copies of four fixed patterns; the patterns do not depend on `seed`."""
    patterns = np.random.default_rng(123).normal(size=(CLASSES, 8, 8, 1)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = (patterns[y] + 1.5 * rng.normal(size=(n, 8, 8, 1))).astype(np.float32)
    return Dataset(x, y if labels else None, f"synthetic-{seed}")


def build(batch_norm=True, activation="softmax"):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="conv")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(CLASSES, activation=activation, name="head"),
    ]
    return keras.Sequential(layers, name="tiny")


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


@pytest.fixture(scope="module")
def data():
    return make_data(512, 0), make_data(512, 1)


@pytest.fixture(scope="module")
def teacher(data):
    train, _ = data
    model = build()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(train.x, train.y, batch_size=64, epochs=6, verbose=0)
    return copy_of(model)  # uncompiled: the optimizer stays behind


def damaged(teacher):
    """The teacher with its hidden layer's kernel replaced by noise of the same scale."""
    student = copy_of(teacher)
    kernel = student.get_layer("hidden").kernel
    noise = np.random.default_rng(7).normal(size=kernel.shape) * float(np.std(kernel))
    kernel.assign(noise.astype(np.float32))
    return student


def kernel(model, name):
    return keras.ops.convert_to_numpy(model.get_layer(name).kernel)


def test_recovers_accuracy_and_is_deterministic(data, teacher):
    train, val = data
    base = accuracy(teacher, val)
    before = accuracy(damaged(teacher), val)
    runs = []
    for _ in range(2):
        student = damaged(teacher)
        result = finetune(student, teacher, train, FinetuneConfig(epochs=3, learning_rate=3e-3), val=val)
        runs.append((student, result))
    (student, result), (again, _) = runs
    after = accuracy(student, val)
    # Observed: teacher 0.98, damaged 0.18, fine-tuned 0.92 (+74 points). 40 points
    # leaves slack for other CPUs' float rounding and still fails if training did little.
    assert base > 0.9 and after > before + 0.4, (base, before, after)
    assert result.epochs_run == 3 and result.steps == 3 * math.ceil(len(train) / 64)
    assert [entry["epoch"] for entry in result.history] == [1, 2, 3]
    assert result.history[-1]["val_accuracy"] == pytest.approx(after)
    assert not result.stopped_early and result.seconds > 0
    # Same seed, same data, same ops on one machine: the same weights (observed
    # bit-identical; 1e-6 in case a CPU's threading reorders a float sum).
    for a, b in zip(student.get_weights(), again.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_seed_changes_the_run(data, teacher):
    train, _ = data
    students = [damaged(teacher) for _ in range(2)]
    for seed, student in enumerate(students):
        finetune(student, teacher, train.take(128), FinetuneConfig(epochs=1, seed=seed))
    assert not np.allclose(kernel(students[0], "hidden"), kernel(students[1], "hidden"))


def test_batch_norm_trains(data, teacher):
    train, _ = data
    student = copy_of(teacher)
    shifted = Dataset(train.x + 1.0, train.y, "shifted")  # other batch statistics than the teacher saw
    before = keras.ops.convert_to_numpy(student.get_layer("bn").moving_mean)
    finetune(student, teacher, shifted.take(128), FinetuneConfig(epochs=1))
    after = keras.ops.convert_to_numpy(student.get_layer("bn").moving_mean)
    assert np.max(np.abs(after - before)) > 1e-3


# --- the loss --------------------------------------------------------------------------


def _expected_loss(student, teacher, data, config):
    """The module docstring's loss, in numpy, for the student as it is."""
    s = np.log(np.clip(student.predict(data.x, verbose=0), distillation.EPSILON, 1.0))
    t = np.log(np.clip(teacher.predict(data.x, verbose=0), distillation.EPSILON, 1.0))
    temperature = config.temperature

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = np.mean(np.sum(np.exp(p) * (p - q), axis=1))
    ce = -np.mean(log_softmax(s)[np.arange(len(data)), data.y])
    return config.distillation * temperature**2 * kl + (1 - config.distillation) * ce, kl, ce


@pytest.mark.parametrize("mode", ["both", "labels", "teacher"])
def test_loss_matches_formula(data, mode):
    train = data[0].take(256)
    teacher = build(batch_norm=False)
    student = build(batch_norm=False)
    keras.utils.set_random_seed(1)
    teacher.set_weights([w + np.random.normal(0, 0.3, w.shape).astype(np.float32) for w in teacher.get_weights()])
    # A learning rate of 1e-9 leaves the weights as they are, so the epoch's mean loss
    # is the loss of the initial student (Adam's steps are about lr in size).
    config = FinetuneConfig(epochs=1, learning_rate=1e-9, distillation=0.6, temperature=3.0)
    both, kl, ce = _expected_loss(student, teacher, train, config)
    expected = {"both": both, "labels": ce, "teacher": config.temperature**2 * kl}[mode]
    run_teacher = None if mode == "labels" else teacher
    run_train = Dataset(train.x, None, "x") if mode == "teacher" else train
    result = finetune(student, run_teacher, run_train, config)
    # float32 sums over 256 samples against float64 numpy: 1e-4 relative.
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_logit_outputs_are_detected(data):
    """A linear head's outputs are logits: the same loss as its softmax twin's."""
    train = data[0].take(128)
    teacher = build(batch_norm=False)
    config = FinetuneConfig(epochs=1, learning_rate=1e-9)
    losses = []
    for activation in ("softmax", "linear"):
        student = build(batch_norm=False, activation=activation)  # same seed: same weights
        student.set_weights([w * 1.1 for w in teacher.get_weights()])
        losses.append(finetune(student, teacher, train, config).history[0]["loss"])
    # log(softmax(z)) and z differ by a per-row constant, which neither softmax nor the
    # cross-entropy sees; the clip at 1e-7 does not bite for these small logits.
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_output_kind_detection():
    inputs = keras.Input((3,))
    lambda_out = keras.layers.Lambda(lambda z: keras.ops.softmax(z))(keras.layers.Dense(2)(inputs))
    models = {
        True: [
            keras.Sequential([inputs, keras.layers.Dense(2), keras.layers.Softmax()]),
            keras.Sequential([inputs, keras.layers.Dense(2), keras.layers.Activation("softmax")]),
        ],
        False: [keras.Sequential([inputs, keras.layers.Dense(2)])],
        None: [keras.Model(inputs, lambda_out)],
    }
    for expected, group in models.items():
        for model in group:
            assert graph_outputs.ends_in_softmax(model) is expected
    # Unknown structure: the outputs decide.
    assert distillation.student_probabilities(models[None][0], np.ones((4, 3), np.float32))
    assert not graph_outputs.looks_like_probabilities(np.array([[2.0, -1.0]], np.float32))


def test_precomputed_teacher_outputs_match_teacher(data, teacher):
    train, _ = data
    train = train.take(256)
    config = FinetuneConfig(epochs=2, seed=3)
    with_model, with_outputs = damaged(teacher), damaged(teacher)
    finetune(with_model, teacher, train, config)
    outputs = teacher_predictions(teacher, train.x, batch_size=100)
    assert outputs.shape == (256, CLASSES) and outputs.dtype == np.float32
    finetune(with_outputs, None, train, config, teacher_outputs=outputs)
    for a, b in zip(with_model.get_weights(), with_outputs.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_labels_only_and_teacher_only_train(data, teacher):
    train, val = data
    student = damaged(teacher)
    before = accuracy(student, val)
    finetune(student, None, train, FinetuneConfig(epochs=2, learning_rate=3e-3))
    # Labels alone recover the damage too: observed +68 points; 35 leaves slack.
    assert accuracy(student, val) > before + 0.35
    student = damaged(teacher)
    unlabeled = Dataset(train.x, None, "unlabeled")
    finetune(student, teacher, unlabeled, FinetuneConfig(epochs=2, learning_rate=3e-3))
    assert accuracy(student, val) > before + 0.35  # observed +66 points


def test_neither_labels_nor_teacher_raises(data):
    unlabeled = Dataset(data[0].x, None, "unlabeled")
    with pytest.raises(CompressorError, match="needs labels or a teacher"):
        finetune(build(), None, unlabeled, FinetuneConfig(epochs=1))


# --- early stopping ----------------------------------------------------------------------


def test_stops_early_once_target_reached(data, teacher):
    train, val = data
    student = copy_of(teacher)
    start = accuracy(student, val)
    seen = []
    result = finetune(
        student, teacher, train, FinetuneConfig(epochs=3), val=val, target_accuracy=start - 0.2,
        on_epoch=lambda epoch, epochs, metrics: seen.append((epoch, epochs, metrics["val_accuracy"])),
    )
    assert result.stopped_early and result.epochs_run == 1
    assert result.steps == math.ceil(len(train) / 64)
    assert seen == [(1, 3, result.history[0]["val_accuracy"])]


def test_reaching_target_in_last_epoch_is_not_early(data, teacher):
    train, val = data
    result = finetune(copy_of(teacher), teacher, train.take(64), FinetuneConfig(epochs=1), val=val, target_accuracy=0.0)
    assert result.epochs_run == 1 and not result.stopped_early


def test_unreached_target_runs_all_epochs(data, teacher):
    train, val = data
    result = finetune(damaged(teacher), teacher, train.take(64), FinetuneConfig(epochs=2), val=val, target_accuracy=1.0)
    assert result.epochs_run == 2 and not result.stopped_early


def test_without_measure_last_the_last_check_measures_nothing_and_the_others_still_stop(data, teacher, monkeypatch):
    import compressor.finetune as module

    train, val = data
    measured = []
    real = module.accuracy
    monkeypatch.setattr(module, "accuracy", lambda model, data, *a, **k: measured.append(len(data)) or real(model, data))
    steps = math.ceil(len(train) / 64)
    config = FinetuneConfig(epochs=2, check_every=max(1, steps // 2))
    result = finetune(damaged(teacher), teacher, train, config, val=val, target_accuracy=1.0, measure_last=False)
    # Every check but the one after the last step measured val; that one is in the history, unmeasured.
    assert [entry["val_accuracy"] is None for entry in result.history] == [False] * (len(result.history) - 1) + [True]
    assert len(measured) == len(result.history) - 1 >= 2 and result.steps == 2 * steps
    # A check before the last step still stops the run.
    early = finetune(copy_of(teacher), teacher, train, config, val=val, target_accuracy=0.0, measure_last=False)
    assert early.stopped_early and early.history[-1]["val_accuracy"] is not None and early.steps < 2 * steps


# --- fixed masks -------------------------------------------------------------------------


def test_masked_weights_stay_zero(data, teacher):
    train, _ = data
    student = copy_of(teacher)
    hidden = kernel(student, "hidden")
    hidden[np.abs(hidden) < np.median(np.abs(hidden))] = 0.0  # what a sparsity edit leaves
    student.get_layer("hidden").kernel.assign(hidden)
    masks = fixed_masks(student)
    assert set(masks) == {"hidden"}  # the other kernels have no exact zeros
    np.testing.assert_array_equal(masks["hidden"], hidden != 0)
    # A learning rate large enough that any leak would show.
    finetune(student, teacher, train, FinetuneConfig(epochs=2, learning_rate=1e-2), masks=masks)
    after = kernel(student, "hidden")
    assert np.all(after[~masks["hidden"]] == 0.0)
    assert np.mean(after[masks["hidden"]] != hidden[masks["hidden"]]) > 0.9


def test_mask_zeroes_weights_it_drops(data, teacher):
    """A mask over non-zero weights sets them to 0 before training and holds them there."""
    train, _ = data
    student = copy_of(teacher)
    keep = np.ones(student.get_layer("conv").kernel.shape, bool)
    keep[..., ::2] = False  # every other filter
    finetune(student, teacher, train.take(128), FinetuneConfig(epochs=1, learning_rate=1e-2), masks={"conv": keep})
    after = kernel(student, "conv")
    assert np.all(after[~keep] == 0.0) and np.all(after[keep] != 0.0)


def test_fixed_masks_threshold_and_nested_names():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="inner_dense")], name="backbone")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inner(inputs)))
    weights = model.get_layer("backbone").get_layer("inner_dense").kernel
    sparse = np.ones(weights.shape, np.float32)
    sparse.ravel()[:7] = 0.0  # 7 of 24 zeros: 0.29
    weights.assign(sparse)
    assert fixed_masks(model, min_zeros=0.3) == {}
    masks = fixed_masks(model, min_zeros=0.25)
    assert list(masks) == ["backbone/inner_dense"] and masks["backbone/inner_dense"].sum() == 17
    with pytest.raises(CompressorError, match="Invalid min_zeros"):
        fixed_masks(model, min_zeros=0.0)


def test_nested_mask_is_held(data):
    inner = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, name="inner_dense")], name="backbone")
    inputs = keras.Input((8, 8, 1))
    x = inner(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))
    keep = np.random.default_rng(0).random((64, 8)) < 0.5
    finetune(model, None, data[0].take(128), FinetuneConfig(epochs=1, learning_rate=1e-2),
             masks={"backbone/inner_dense": keep})
    after = keras.ops.convert_to_numpy(model.get_layer("backbone").get_layer("inner_dense").kernel)
    assert np.all(after[~keep] == 0.0) and np.all(after[keep] != 0.0)


# --- gradual sparsity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,spec",
    [
        ("hidden", SparsitySpec(0.3)),
        ("conv", SparsitySpec(0.25, "filter")),
        ("hidden", SparsitySpec(0.5, "block", (4, 4))),
    ],
)
def test_gradual_sparsity_reaches_target(data, teacher, monkeypatch, layer, spec):
    train, _ = data
    student = copy_of(teacher)
    recorded = []
    original_set = kernel_masks.KernelMasks._set

    def recording_set(entry, keep):
        recorded.append(float(np.mean(keep)))
        original_set(entry, keep)

    monkeypatch.setattr(kernel_masks.KernelMasks, "_set", staticmethod(recording_set))
    schedule = GradualSparsity({layer: spec}, begin_fraction=0.0, end_fraction=1.0, frequency=2)
    result = finetune(student, teacher, train, FinetuneConfig(epochs=3), sparsity=schedule)
    weights = pattern_kernel(student.get_layer(layer), kernel(student, layer))
    assert np.count_nonzero(weights) == kept_count(weights.shape, spec)
    # Density falls step by step (polynomial decay), never rises, and ends at the target.
    assert len(set(recorded)) >= 5
    assert all(b <= a for a, b in zip(recorded, recorded[1:]))
    densities = [entry["density"][layer] for entry in result.history]
    # (A filter mask of 8 filters is coarse: it may reach its 2 filters by epoch 2.)
    assert densities[0] > densities[-1] and densities[0] >= densities[1] >= densities[2]
    assert densities[-1] == kept_count(weights.shape, spec) / weights.size


def test_gradual_sparsity_keeps_fixed_mask(data, teacher):
    """A layer both masked and pruned keeps its mask's zeros and reaches the target."""
    train, _ = data
    student = copy_of(teacher)
    keep = np.ones(student.get_layer("hidden").kernel.shape, bool)
    keep[:, :4] = False
    spec = SparsitySpec(0.5)
    finetune(student, teacher, train.take(256), FinetuneConfig(epochs=1),
             masks={"hidden": keep}, sparsity=GradualSparsity({"hidden": spec}, frequency=1))
    after = kernel(student, "hidden")
    assert np.all(after[~keep] == 0.0)
    assert np.count_nonzero(after) == kept_count(after.shape, spec)


def test_early_stop_waits_for_pruning(data, teacher):
    train, val = data
    schedule = GradualSparsity({"hidden": SparsitySpec(0.5)}, end_fraction=0.6, frequency=1)
    result = finetune(copy_of(teacher), teacher, train, FinetuneConfig(epochs=3), val=val,
                      target_accuracy=0.0, sparsity=schedule)
    # 8 steps per epoch, the target density at step round(0.6 × 24) = 14: epoch 2.
    assert result.stopped_early and result.epochs_run == 2


def test_n_of_m_target(data, teacher):
    train, _ = data
    student = copy_of(teacher)
    spec = SparsitySpec(0.5, "n:m", n=2, m=4)
    finetune(student, teacher, train.take(128), FinetuneConfig(epochs=1), sparsity=GradualSparsity({"hidden": spec}))
    groups = (kernel(student, "hidden") != 0).reshape(-1, 4, 16).sum(axis=1)
    assert np.all(groups == 2)


# --- guards --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"epochs": 1, "batch_size": 0}, "batch_size"),
        ({"epochs": 1, "learning_rate": 0.0}, "learning_rate"),
        ({"epochs": 1, "learning_rate": float("nan")}, "learning_rate"),
        ({"epochs": 1, "temperature": -1.0}, "temperature"),
        ({"epochs": 1, "distillation": 1.5}, "distillation"),
        ({"epochs": 1, "seed": -1}, "seed"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(CompressorError, match=rf"Invalid {field}\. Expected .* Received: {field}="):
        FinetuneConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"targets": {}}, "Invalid targets"),
        ({"targets": {"hidden": 0.5}}, "Expected a SparsitySpec"),
        ({"targets": {"hidden": SparsitySpec(0.0)}}, "Invalid target density"),
        ({"begin_fraction": 1.0}, "Invalid begin_fraction"),
        ({"begin_fraction": 0.5, "end_fraction": 0.5}, "Invalid end_fraction"),
        ({"frequency": 0}, "Invalid frequency"),
        ({"power": 0}, "Invalid power"),
    ],
)
def test_bad_gradual_sparsity_raises(kwargs, match):
    kwargs = {"targets": {"hidden": SparsitySpec(0.5)}, **kwargs}
    with pytest.raises(CompressorError, match=match):
        GradualSparsity(**kwargs)


def _run(data, **kwargs):
    train, val = data
    options = {"val": None, "teacher": None, "train": train.take(64), **kwargs}
    return finetune(build(), options.pop("teacher"), options.pop("train"), FinetuneConfig(epochs=1), **options)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"masks": {"nope": np.ones((3, 3), bool)}}, CompressorError, "no layer with a kernel named 'nope'"),
        ({"masks": {"hidden": np.ones((3, 3), bool)}}, CompressorError, "has shape"),
        ({"masks": {"bn": np.ones((8,), bool)}}, CompressorError, "no layer with a kernel named 'bn'"),
        ({"sparsity": GradualSparsity({"hidden": SparsitySpec(0.5, "block", (3, 3))})}, PlanError, "does not divide"),
        ({"target_accuracy": 0.5}, CompressorError, "needs validation data"),
        ({"target_accuracy": 1.5, "val": "labelled"}, CompressorError, "Invalid target_accuracy"),
        ({"val": "unlabelled"}, CompressorError, "no labels"),
        ({"teacher_outputs": np.ones((3, CLASSES), np.float32)}, CompressorError, "teacher outputs have shape"),
        ({"train": Dataset(np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 2, 9]), "bad")}, CompressorError,
         "has label 9"),
        ({"train": Dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, int), "empty")}, CompressorError, "empty"),
    ],
)
def test_bad_run_raises(data, kwargs, error, match):
    if kwargs.get("val") == "labelled":
        kwargs["val"] = data[1]
    elif kwargs.get("val") == "unlabelled":
        kwargs["val"] = Dataset(data[1].x, None, "unlabelled")
    with pytest.raises(error, match=match):
        _run(data, **kwargs)


def test_depthwise_channel_target_raises(data):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.Flatten()(x)))
    schedule = GradualSparsity({"dw": SparsitySpec(0.5, "channel")})
    with pytest.raises(PlanError, match="does not apply to depthwise"):
        finetune(model, None, data[0].take(64), FinetuneConfig(epochs=1), sparsity=schedule)


def test_target_on_unsupported_layer_raises(data):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.EinsumDense("ab,bc->ac", output_shape=8, name="einsum")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))
    schedule = GradualSparsity({"einsum": SparsitySpec(0.5)})
    with pytest.raises(CompressorError, match="cannot prune layer 'einsum'"):
        finetune(model, None, data[0].take(64), FinetuneConfig(epochs=1), sparsity=schedule)


def test_non_classifier_raises(data):
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(CompressorError, match="one \\(batch, classes\\) output"):
        finetune(model, None, data[0].take(64), FinetuneConfig(epochs=1))


def test_frozen_student_raises(data):
    student = build(batch_norm=False)
    student.trainable = False
    with pytest.raises(CompressorError, match="no trainable weights"):
        finetune(student, None, data[0].take(64), FinetuneConfig(epochs=1))


def test_teacher_predictions_guards(teacher):
    with pytest.raises(CompressorError, match="Invalid batch_size"):
        teacher_predictions(teacher, np.zeros((2, 8, 8, 1), np.float32), batch_size=0)
    inputs = keras.Input((3,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(CompressorError, match="several outputs"):
        teacher_predictions(two, np.zeros((2, 3), np.float32))


def test_xla_step_matches(data, teacher, monkeypatch):
    """The XLA-compiled step (used where a GPU is present) trains like the plain one."""
    train = data[0].take(128)
    keep = np.random.default_rng(0).random(teacher.get_layer("hidden").kernel.shape) < 0.5
    students = []
    for xla in (False, True):
        monkeypatch.setattr(ft, "_use_xla", lambda model, xla=xla: xla)
        student = damaged(teacher)
        finetune(student, teacher, train, FinetuneConfig(epochs=1), masks={"hidden": keep})
        students.append(student)
    assert np.all(kernel(students[1], "hidden")[~keep] == 0.0)
    # XLA fuses and reorders float32 arithmetic: two Adam steps of ~1e-3 differ by far less than 1e-4.
    for a, b in zip(students[0].get_weights(), students[1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)
