"""Budgets, candidates, the effective-kernel evaluator, both searches, and applying plans.

Searches run on a tiny CNN trained for a few epochs on generated, separable data, so
accuracy means something and compressing costs some of it. Accuracies are compared
in samples: the evaluator sets one composed kernel Ŵ where the rewritten model runs
two or three layers, and float32 rounding of the reordered sums may flip a sample at
a decision boundary, hence "within 1 sample". Outputs of a plan applied twice are
computed by the same layers from the same weights: atol 1e-6.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.errors import DataError  # noqa: E402
from compressor.graph.cost import model_cost  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402
from compressor.search.apply import apply_plan, model_fingerprint  # noqa: E402
from compressor.search.budgets import Budget, BudgetError  # noqa: E402
from compressor.search.candidates import LayerCandidates, Option, baseline_cost, layer_candidates  # noqa: E402
from compressor.search.evaluate import Evaluator  # noqa: E402
from compressor.search.fixed_loss import search_fixed_loss  # noqa: E402
from compressor.search.fixed_params import allocate, penalty, search_fixed_params  # noqa: E402
from compressor.search.kernels import KernelCache  # noqa: E402
from compressor.surgery.plan import LayerEdit, Plan, PlanError, SparsitySpec  # noqa: E402
from compressor.techniques.base import edit_cost  # noqa: E402
from conftest import build_nested, build_residual, build_sequential  # noqa: E402

L = keras.layers
ATOL = 1e-6


# --- fixtures -------------------------------------------------------------------------------


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
    x = L.BatchNormalization(momentum=0.8, name="bn")(x)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv_b")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(24, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="head")(x), name="tiny_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x_train, y_train = separable_data(512, seed=1)
    model.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
    x_search, y_search = separable_data(300, seed=2)
    return model, Dataset(x_search, y_search, "generated")


@pytest.fixture(scope="module")
def tucker_candidates(trained):
    model, _ = trained
    kernels = KernelCache()
    candidates, skipped = layer_candidates(model, ["tucker"], kernels=kernels)
    return candidates, skipped, kernels


def top1(model, data):
    return int(np.sum(np.asarray(model.predict(data.x, verbose=0)).argmax(-1) == data.y))


# --- budgets --------------------------------------------------------------------------------


def test_budget_messages_say_what_was_expected_and_received():
    with pytest.raises(BudgetError, match=r"^Invalid compression factor\. Expected 0 < F < 1\. "
                       r"Received: compression_factor=1\.5$"):
        Budget("params", 1.5)
    for kind, limit in [("flops", 0), ("flops", 1.0), ("params", -0.2), ("params", math.nan)]:
        with pytest.raises(BudgetError, match="compression factor"):
            Budget(kind, limit)
    with pytest.raises(BudgetError, match=r"max accuracy loss\. Expected 0 <= L < 1\. Received: max_acc_loss=-0\.01"):
        Budget.accuracy_drop(-0.01)
    with pytest.raises(BudgetError, match=r"use 0\.02 for 2 points"):
        Budget.accuracy_drop(2)
    with pytest.raises(BudgetError, match="Expected a number"):
        Budget("params", "0.5")
    with pytest.raises(BudgetError, match="Invalid budget kind"):
        Budget("latency", 0.5)


def test_budget_met_and_targets():
    budget = Budget.params(0.5)
    assert budget.target(1001) == 500 and budget.met(0.5) and not budget.met(0.5001)
    assert Budget.accuracy_drop(0.0).met(0.0) and not Budget.accuracy_drop(0.0).met(1e-3)
    assert Budget.accuracy_drop(0.02).limit == 0.02 and not Budget.accuracy_drop(0.02).is_cost


# --- candidates -----------------------------------------------------------------------------


def test_candidates_cover_every_layer_with_weights(trained, tucker_candidates):
    model, _ = trained
    candidates, skipped, _ = tucker_candidates
    assert [c.name for c in candidates] == ["conv_a", "conv_b", "hidden", "head"]
    assert [(s.layer, s.reason) for s in skipped] == [("bn", "has no kernel to factorize")]  # pool: no weights
    for c in candidates:
        layer = model.get_layer(c.name)
        assert c.options and all(o.edit.layer == c.name for o in c.options)
        for option in c.options:
            assert (option.params, option.flops) == edit_cost(layer, option.edit)
            assert option.params < c.params and option.flops < c.flops and 0 < option.error < 1
    assert baseline_cost(model, candidates) == (model_cost(model).params, model_cost(model).flops)


def test_candidates_use_qualified_names_and_sum_shared_calls():
    model = build_nested()  # backbone/conv2d inside, dense outside
    candidates, skipped = layer_candidates(model, ["sparsity"])
    names = [c.name for c in candidates]
    assert any(name.startswith("backbone/") for name in names)
    assert all(o.edit.layer == c.name for c in candidates for o in c.options)

    shared = L.Dense(8, activation="relu", name="shared")
    a, b = keras.Input((8,)), keras.Input((8,))
    model = keras.Model([a, b], L.Dense(2, name="out")(L.Add()([shared(a), shared(b)])))
    candidates, _ = layer_candidates(model, ["svd"])
    found = {c.name: c for c in candidates}["shared"]
    single = edit_cost(shared, found.options[0].edit, (1, 8), (1, 8))
    assert found.flops == model_cost(model).layers[2].flops == 2 * (2 * 64 + 8 + 8)
    assert found.options[0].flops == 2 * single[1] and found.options[0].params == single[0]


def test_hybrid_candidates_offer_plain_and_residual_options(trained):
    model, _ = trained
    candidates, _ = layer_candidates(model, ["tucker", "sparsity"], SparsitySpec(1.0, "n:m", n=2, m=4))
    conv_b = {c.name: c for c in candidates}["conv_b"]
    residuals = {o.edit.residual.structure if o.edit.residual else None for o in conv_b.options}
    assert residuals == {None, "n:m"}


# --- the evaluator --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["trained", "sequential", "nested", "residual"])
def test_effective_kernel_accuracy_equals_the_rewritten_model(kind, trained):
    if kind == "trained":
        model, data = trained
    else:
        model = {"sequential": build_sequential, "nested": build_nested, "residual": build_residual}[kind]()
        x = np.random.default_rng(0).random((64, *model.inputs[0].shape[1:]), dtype=np.float32)
        data = Dataset(x, np.asarray(model(x)).argmax(-1), "own labels")
    candidates, _ = layer_candidates(model, ["tucker", "sparsity"])
    edits = [c.options[len(c.options) // 2].edit for c in candidates]
    evaluator = Evaluator(model, data)
    correct = evaluator.correct(edits)
    plan = Plan(model={}, edits=tuple(edits))
    assert abs(correct - top1(apply_plan(model, plan), data)) <= 1
    assert evaluator.correct() == top1(model, data)  # kernels restored
    assert evaluator.evaluations == 2


def test_output_error_is_zero_for_the_original_and_grows_with_compression(trained, tucker_candidates):
    model, data = trained
    conv_b = {c.name: c for c in tucker_candidates[0]}["conv_b"]
    evaluator = Evaluator(model, data, tucker_candidates[2])
    light = evaluator.measure([conv_b.options[0].edit])  # runs the original first, for its outputs
    assert evaluator.evaluations == 2 and evaluator.measure().output_error == 0
    heavy = evaluator.measure([conv_b.options[-1].edit])
    assert 0 < light.output_error < heavy.output_error
    assert evaluator.correct([conv_b.options[-1].edit]) == heavy.correct and evaluator.evaluations == 5


def test_evaluator_refuses_unlabelled_data_and_unknown_layers(trained):
    model, data = trained
    with pytest.raises(DataError, match="no labels"):
        Evaluator(model, Dataset(data.x, None, "x only"))
    with pytest.raises(PlanError, match="'nope'"):
        Evaluator(model, data).correct([LayerEdit("nope", "svd", rank=1)])


# --- fixed_params ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,limit", [("params", 0.5), ("flops", 0.6)])
def test_fixed_params_meets_the_budget_without_a_uniform_rank(kind, limit, trained, tucker_candidates):
    model, _ = trained
    candidates, skipped, _ = tucker_candidates
    result = search_fixed_params(model, candidates, Budget(kind, limit), skipped=skipped)
    assert result.met and result.achieved <= limit and result.evaluations == 0
    compressed = apply_plan(model, result.plan)
    assert compressed.count_params() == result.params
    assert model_cost(compressed).flops == result.flops
    assert getattr(result, kind) <= limit * getattr(result, f"baseline_{kind}")
    kept = [round(layer.params_after / layer.params_before, 2) for layer in result.layers]
    kept += [1.0] * (len(candidates) - len(result.layers))
    assert len(set(kept)) > 1, "one uniform fraction for every layer"
    assert {s.layer for s in result.plan.skipped} >= {s.layer for s in skipped}
    assert result.plan.model["fingerprint"] == model_fingerprint(model)


def fake_layer(name, errors, costs, own):
    options = tuple(
        Option(LayerEdit(name, "svd", rank=i + 1), cost, cost, error)
        for i, (error, cost) in enumerate(zip(errors, costs))
    )
    return LayerCandidates(name, None, own, own, options)


def test_allocation_compresses_the_low_error_layers_first():
    easy = fake_layer("easy", [0.05, 0.1, 0.2], [75, 50, 25], 100)
    hard = fake_layer("hard", [0.4, 0.6, 0.8], [75, 50, 25], 100)
    chosen = allocate([easy, hard], "params", target=150)
    assert set(chosen) == {"easy"} and chosen["easy"].params == 50
    chosen = allocate([easy, hard], "params", target=120)  # easy alone reaches 125 at most
    assert chosen["easy"].params == 25 and chosen["hard"].params == 75


def test_allocation_is_no_worse_than_one_uniform_rank(trained, tucker_candidates):
    rng = random.Random(0)
    cases = []
    for _ in range(20):  # random convex-ish curves: errors rise as cost falls
        layers = []
        for i in range(6):
            own = rng.randint(100, 1000)
            errors = sorted(rng.random() for _ in range(5))
            layers.append(fake_layer(f"l{i}", errors, [int(own * f) for f in (0.8, 0.6, 0.4, 0.25, 0.1)], own))
        cases.append(layers)
    cases.append(tucker_candidates[0])
    for layers in cases:
        steps = min(len(c.options) for c in layers)
        base = sum(c.params for c in layers)
        for fraction in (0.3, 0.5, 0.7):
            target = int(fraction * base)
            chosen = allocate(layers, "params", target)
            uniform = next(
                ({c.name: c.options[k] for c in layers} for k in range(steps)
                 if sum(c.options[k].params for c in layers) <= target),
                None,
            )
            if uniform is None:
                continue
            assert sum(o.params for o in chosen.values()) + sum(
                c.params for c in layers if c.name not in chosen
            ) <= target
            assert penalty(chosen) <= penalty(uniform) + 1e-12


def test_an_unreachable_budget_gives_the_most_compressed_plan(trained, tucker_candidates):
    model, _ = trained
    candidates, _, _ = tucker_candidates
    result = search_fixed_params(model, candidates, Budget.params(0.01))
    assert not result.met and result.achieved > 0.01
    cheapest = {c.name: min(c.options, key=lambda o: (o.params, o.error)).edit for c in candidates}
    assert {edit.layer: edit for edit in result.plan.edits} == cheapest


def test_fixed_params_refuses_an_accuracy_budget(trained, tucker_candidates):
    with pytest.raises(BudgetError, match="use fixed_loss"):
        search_fixed_params(trained[0], tucker_candidates[0], Budget.accuracy_drop(0.01))


# --- fixed_loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["output", "accuracy"])
def test_fixed_loss_meets_the_budget_and_caches_the_sensitivity(score, trained, tucker_candidates, tmp_path):
    model, data = trained
    candidates, skipped, kernels = tucker_candidates
    calls = []
    first = search_fixed_loss(
        model, candidates, data, Budget.accuracy_drop(0.05), tmp_path, progress=lambda *a: calls.append(a),
        skipped=skipped, kernels=kernels, score=score,
    )
    assert first.met and first.achieved <= 0.05 and first.plan.edits
    assert first.sensitivity_evaluations == 1 + sum(len(c.options) for c in candidates)
    assert first.evaluations == first.sensitivity_evaluations + first.confirmation_evaluations
    assert first.cached_evaluations == 0 and 1 <= first.confirmation_evaluations <= 10
    assert [c for c in calls if c[0] == "sensitivity"][-1][1:] == (first.sensitivity_evaluations,) * 2
    assert len([c for c in calls if c[0] == "search"]) == first.confirmation_evaluations
    base, compressed = top1(model, data), top1(apply_plan(model, first.plan), data)
    assert abs(base - compressed - round(first.achieved * len(data))) <= 1
    assert first.flops < first.baseline_flops
    assert first.baseline_accuracy == base / len(data)

    calls.clear()
    second = search_fixed_loss(
        model, candidates, data, Budget.accuracy_drop(0.15), tmp_path, progress=lambda *a: calls.append(a), score=score
    )
    assert second.cached_evaluations == second.sensitivity_evaluations == first.sensitivity_evaluations
    assert second.evaluations - second.cached_evaluations == second.confirmation_evaluations
    assert [c for c in calls if c[0] == "sensitivity"] == [("sensitivity",) + (first.sensitivity_evaluations,) * 2]
    assert second.met and second.flops <= first.flops

    (cache_file,) = tmp_path.glob("sensitivity-*.json")
    cache_file.write_text('{"version": 1, "key": "trunc')
    third = search_fixed_loss(model, candidates, data, Budget.accuracy_drop(0.05), tmp_path, score=score)
    assert third.cached_evaluations == 0 and third.plan.edits == first.plan.edits
    assert json.loads(cache_file.read_text())["baseline_correct"] == base


def test_fixed_loss_with_a_zero_budget_loses_nothing(trained, tucker_candidates):
    model, data = trained
    result = search_fixed_loss(model, tucker_candidates[0], data, Budget.accuracy_drop(0.0))
    assert result.met and result.accuracy >= result.baseline_accuracy
    assert result.cached_evaluations == 0


def test_fixed_loss_needs_labels_and_an_accuracy_budget(trained, tucker_candidates):
    model, data = trained
    with pytest.raises(DataError, match="no labels"):
        search_fixed_loss(model, tucker_candidates[0], Dataset(data.x, None, "x"), Budget.accuracy_drop(0.01))
    with pytest.raises(BudgetError, match="use fixed_params"):
        search_fixed_loss(model, tucker_candidates[0], data, Budget.params(0.5))
    with pytest.raises(BudgetError, match="Invalid objective"):
        search_fixed_loss(model, tucker_candidates[0], data, Budget.accuracy_drop(0.01), objective="latency")
    with pytest.raises(BudgetError, match="Invalid sensitivity score"):
        search_fixed_loss(model, tucker_candidates[0], data, Budget.accuracy_drop(0.01), score="loss")


# --- apply_plan -----------------------------------------------------------------------------


def test_a_saved_plan_reproduces_the_model(trained, tucker_candidates, tmp_path):
    model, data = trained
    result = search_fixed_params(model, tucker_candidates[0], Budget.flops(0.5))
    first = apply_plan(model, result.plan)
    loaded = Plan.load(result.plan.save(tmp_path / "plan.json"))
    assert loaded == result.plan
    again = apply_plan(model, loaded)
    np.testing.assert_allclose(np.asarray(again(data.x[:32])), np.asarray(first(data.x[:32])), atol=ATOL, rtol=0)


def test_apply_plan_guards(trained):
    model, _ = trained
    other = build_residual()
    plan = Plan(model={"name": "tiny_cnn", "fingerprint": model_fingerprint(model)},
                edits=(LayerEdit("hidden", "svd", rank=2),))
    with pytest.raises(PlanError, match="fingerprint"):
        apply_plan(other, plan)
    with pytest.raises(PlanError, match="unknown layer name"):
        apply_plan(model, Plan(model={}, edits=(LayerEdit("nope", "svd", rank=2),)))
    with pytest.warns(UserWarning, match="fingerprint"), pytest.raises(PlanError):
        apply_plan(other, plan, strict=False)  # warned, then the layer is not in that model
    assert apply_plan(model, plan).get_layer("hidden_svd_in").units == 2
