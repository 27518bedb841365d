"""The searches' traces (`Trial`s) and the resumable sensitivity cache of fixed_loss.

A small CNN is trained for a few epochs on generated, separable data, so compressing
it costs accuracy and the binary search of fixed_loss has to try several plans.
Accuracies of trials and results come from the same evaluations, so they are
compared exactly; the sensitivity table of a resumed run is compared exactly with an
uninterrupted run's because both evaluate the same edits on the same data with the
same compiled forward pass (deterministic on CPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import dataclasses  # noqa: E402
import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.errors import CompressorError  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402
from compressor.search import fixed_loss  # noqa: E402
from compressor.search.budgets import Budget  # noqa: E402
from compressor.search.candidates import layer_candidates  # noqa: E402
from compressor.search.channel_search import ChannelSettings, search_channels  # noqa: E402
from compressor.search.evaluate import Evaluator  # noqa: E402
from compressor.search.fixed_loss import search_fixed_loss, sensitivity_table  # noqa: E402
from compressor.search.fixed_params import search_fixed_params  # noqa: E402
from compressor.search.kernels import KernelCache  # noqa: E402
from compressor.search.result import Trial, with_chosen  # noqa: E402

L = keras.layers


def separable_data(n, seed):
    """4 classes of 8x8x3 images: a class template plus noise."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(123).standard_normal((4, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, n)
    x = templates[y] + 2.0 * rng.standard_normal((n, 8, 8, 3)).astype("float32")
    return x.astype("float32"), y.astype("int64")


@pytest.fixture(scope="module")
def trained():
    """(model, search data): a small CNN, about 80% accurate on its search data."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv_b")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(24, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="head")(x), name="trace_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(*separable_data(512, seed=1), epochs=4, batch_size=64, verbose=0)
    return model, Dataset(*separable_data(300, seed=2), "generated")


@pytest.fixture(scope="module")
def candidates(trained):
    kernels = KernelCache()
    found, skipped = layer_candidates(trained[0], ["tucker"], kernels=kernels)
    return found, skipped, kernels


def _chosen(trials):
    chosen = [trial for trial in trials if trial.chosen]
    assert len(chosen) == 1, trials
    return chosen[0]


# --- Trial ----------------------------------------------------------------------------------


def test_trial_checks_its_stage_and_serializes():
    with pytest.raises(CompressorError, match=r"Invalid trial stage\. Expected one of \('channels', 'layers'\)\. Received: stage='units'"):
        Trial("units", 1, 2, None, True)
    trial = Trial("layers", 10, 20, 0.5, True)
    assert trial.to_dict() == {"stage": "layers", "params": 10, "flops": 20, "accuracy": 0.5, "met": True, "chosen": False}
    marked = with_chosen([trial, trial, trial], 1)
    assert [t.chosen for t in marked] == [False, True, False]


# --- fixed_loss and fixed_params ------------------------------------------------------------


def test_fixed_loss_records_each_confirmation_and_marks_the_result(trained, candidates):
    model, data = trained
    found, skipped, kernels = candidates
    budget = Budget.accuracy_drop(0.05)
    result = search_fixed_loss(model, found, data, budget, skipped=skipped, kernels=kernels)
    trials = result.trials
    assert len(trials) >= 2 and len(trials) == result.confirmation_evaluations
    assert all(trial.stage == "layers" for trial in trials)
    chosen = _chosen(trials)
    assert (chosen.params, chosen.flops, chosen.accuracy) == (result.params, result.flops, result.accuracy)
    assert chosen.met
    # `met` is the budget in samples: at most floor(0.05 * 300) = 15 samples lost.
    base = round(result.baseline_accuracy * len(data))
    for trial in trials:
        assert trial.met == (base - round(trial.accuracy * len(data)) <= 15)
        assert trial.params <= result.baseline_params and trial.flops < result.baseline_flops
    # The binary search keeps the most compressed (least FLOPs) plan that met the budget.
    assert chosen.flops == min(trial.flops for trial in trials if trial.met)
    assert any(not trial.met for trial in trials), "the search never tried a plan beyond the budget"
    assert result.to_dict()["trials"] == [trial.to_dict() for trial in trials]


def test_fixed_loss_that_keeps_the_original_records_it_as_chosen(trained, candidates):
    model, data = trained
    found, _, kernels = candidates
    # Only each layer's heaviest option, and no sample may be lost: no plan can pass.
    heaviest = [dataclasses.replace(c, options=c.options[-1:]) for c in found]
    result = search_fixed_loss(model, heaviest, data, Budget.accuracy_drop(0.0), kernels=kernels)
    assert not result.plan.edits
    first, *tried = result.trials
    assert first.chosen and first.met and not any(trial.chosen for trial in tried)
    assert (first.params, first.flops) == (result.baseline_params, result.baseline_flops)
    assert first.accuracy == result.accuracy == result.baseline_accuracy
    assert len(tried) == result.confirmation_evaluations >= 1 and not any(trial.met for trial in tried)


@pytest.mark.parametrize("limit,met", [(0.5, True), (0.01, False)])
def test_fixed_params_records_its_one_allocation(limit, met, trained, candidates):
    model, _ = trained
    result = search_fixed_params(model, candidates[0], Budget.params(limit))
    (trial,) = result.trials
    assert trial == Trial("layers", result.params, result.flops, None, met, chosen=True)
    assert result.met is met


# --- channel search -------------------------------------------------------------------------


def test_channel_bisection_records_each_cut(trained):
    model, data = trained
    budget = Budget.accuracy_drop(0.05)
    result = search_channels(model, budget, ChannelSettings(), search_data=data)
    trials = result.trials
    assert len(trials) >= 2 and all(trial.stage == "channels" for trial in trials)
    assert len(trials) == len(result.steps)
    chosen = _chosen(trials)
    assert (chosen.params, chosen.flops, chosen.accuracy) == (result.params, result.flops, result.accuracy)
    assert result.flops < result.baseline_flops, "no cut held: the test would not see a chosen cut"
    for trial, step in zip(trials, result.steps):
        assert (trial.params, trial.flops, trial.accuracy) == (step.params, step.flops, step.accuracy)
        # met is the budget itself; a kept step must also be within the search's margin (a stricter test).
        assert trial.met == (result.baseline_accuracy - trial.accuracy <= 0.05 + 1e-9)
        assert not step.accepted or trial.met
    assert result.to_dict()["trials"] == [trial.to_dict() for trial in trials]


def test_channel_cost_budget_with_finetuning_records_each_step(trained):
    from compressor.finetune import FinetuneConfig

    model, data = trained
    train = Dataset(*separable_data(128, seed=3), "train")
    settings = ChannelSettings(step=0.7, finetune=FinetuneConfig(epochs=1), objective="flops")
    result = search_channels(model, Budget.flops(0.5), settings, search_data=data, train_data=train)
    trials = result.trials
    assert len(trials) >= 2, "one cut: the steps were not recorded"
    chosen = _chosen(trials)
    assert chosen is trials[-1] and chosen.met
    assert (chosen.params, chosen.flops, chosen.accuracy) == (result.params, result.flops, result.accuracy)
    assert [trial.met for trial in trials[:-1]] == [False] * (len(trials) - 1)  # above half the FLOPs until the last step
    assert all(trial.accuracy is not None for trial in trials)  # measured after each step's fine-tuning


def test_channel_search_that_keeps_nothing_chooses_the_original(trained):
    model, data = trained
    # A cap of 1% lets no group lose a channel: every cut is empty, the original is returned.
    result = search_channels(model, Budget.accuracy_drop(0.05), ChannelSettings(max_fraction=0.01), search_data=data)
    first = result.trials[0]
    assert first.chosen and _chosen(result.trials) is first
    assert (first.params, first.flops, first.accuracy) == (result.baseline_params, result.baseline_flops, result.baseline_accuracy)
    assert result.flops == result.baseline_flops


# --- resumable sensitivity cache ------------------------------------------------------------


class _Interrupt:
    """A progress callback that presses Ctrl-C after `after` sensitivity evaluations."""

    def __init__(self, after):
        self.after = after

    def __call__(self, stage, done, total):
        if stage == "sensitivity" and done == self.after:
            raise KeyboardInterrupt


class _Recording(Evaluator):
    """The evaluator, remembering which single-layer edits it measured."""

    measured: list = []

    def measure(self, edits=()):
        edits = list(edits)
        _Recording.measured.append(tuple(json.dumps(edit.to_dict(), sort_keys=True) for edit in edits))
        return super().measure(edits)


@pytest.mark.parametrize("after", [4, 9])
def test_an_interrupted_sensitivity_table_resumes_where_it_stopped(after, trained, candidates, tmp_path, monkeypatch):
    model, data = trained
    found, _, kernels = candidates
    sizes = [len(c.options) for c in found]
    total = 1 + sum(sizes)
    assert 1 < after < total - sizes[-1], "the interruption must fall before the last layer"
    monkeypatch.setattr(fixed_loss, "Evaluator", _Recording)
    budget = Budget.accuracy_drop(0.05)

    _Recording.measured = []
    with pytest.raises(KeyboardInterrupt):
        search_fixed_loss(model, found, data, budget, tmp_path / "resumed", progress=_Interrupt(after), kernels=kernels)
    first = list(_Recording.measured)
    assert len(first) == after  # the baseline and after − 1 options, then Ctrl-C

    _Recording.measured, calls = [], []
    resumed = search_fixed_loss(
        model, found, data, budget, tmp_path / "resumed", progress=lambda *a: calls.append(a), kernels=kernels
    )
    second = [m for m in _Recording.measured if m]  # edited evaluations (the baseline outputs pass has none)
    assert resumed.cached_evaluations == after
    assert len(second) == total - after and not set(second) & set(first)
    sensitivity = [done for stage, done, _ in calls if stage == "sensitivity"]
    assert sensitivity == list(range(after, total + 1))

    _Recording.measured = []
    straight = search_fixed_loss(model, found, data, budget, tmp_path / "straight", kernels=kernels)
    assert straight.cached_evaluations == 0 and len(_Recording.measured) == total
    (resumed_file,), (straight_file,) = (tmp_path / "resumed").glob("*.json"), (tmp_path / "straight").glob("*.json")
    assert json.loads(resumed_file.read_text()) == json.loads(straight_file.read_text())
    assert resumed.plan == straight.plan and resumed.trials == straight.trials
    assert resumed.sensitivity_evaluations == straight.sensitivity_evaluations == total


def test_a_partial_table_that_does_not_fit_is_ignored(trained, candidates, tmp_path):
    model, data = trained
    found, _, kernels = candidates
    total = 1 + sum(len(c.options) for c in found)
    with pytest.raises(KeyboardInterrupt):
        sensitivity_table(model, found, data, Evaluator(model, data, kernels), tmp_path, progress=_Interrupt(total - 1))
    (path,) = tmp_path.glob("sensitivity-*.json")
    content = json.loads(path.read_text())
    assert set(content["layers"]) == {c.name for c in found}  # the last layer is saved part-way
    last = content["layers"][found[-1].name]
    assert len(last["correct"]) == len(found[-1].options) - 1

    for corrupt in (
        {**last, "correct": last["correct"] + [10**9]},  # more samples right than there are
        {**last, "output_error": last["output_error"][:-1]},  # the two lists disagree
        {**last, "options": last["options"][:1]},  # another option list
    ):
        path.write_text(json.dumps({**content, "layers": {**content["layers"], found[-1].name: corrupt}}))
        table, cached = sensitivity_table(model, found, data, Evaluator(model, data, kernels), tmp_path)
        assert cached == 0 and len(table.correct[found[-1].name]) == len(found[-1].options)
    for corrupt in (
        {**content, "baseline_correct": None},  # options without their baseline
        {**content, "samples": content["samples"] - 1},  # counted on other data
    ):
        path.write_text(json.dumps(corrupt))
        assert sensitivity_table(model, found, data, Evaluator(model, data, kernels), tmp_path)[1] == 0
    path.write_text(json.dumps(content))  # intact again: resumed, only the last option evaluated
    calls = []
    table, cached = sensitivity_table(
        model, found, data, Evaluator(model, data, kernels), tmp_path, progress=lambda *a: calls.append(a[1])
    )
    assert cached == total - 1 and calls == [total - 1, total]
