"""How one budget is shared between the stages (`compressor.pipeline.policy`): pure rules, no TensorFlow."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from compressor.pipeline import policy
from compressor.pipeline.policy import Cost
from compressor.search.budgets import MARGIN, Budget


def test_the_policy_imports_no_tensorflow():
    code = (
        "import sys; import compressor.pipeline.policy;"
        "print([m for m in ('tensorflow', 'keras') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_channels_take_the_square_root_of_a_cost_budget_shared_with_per_layer_techniques(kind):
    budget = Budget(kind, 0.25)
    assert policy.channel_budget(budget, layer_stage=True) == Budget(kind, 0.5)
    assert policy.channel_budget(budget, layer_stage=False) == budget  # alone, channels take it all


def test_an_accuracy_budget_is_not_split_for_channels():
    budget = Budget.accuracy_drop(0.02)
    assert policy.channel_budget(budget, layer_stage=True) == budget


def test_channels_lower_the_cost_the_budget_is_on_and_flops_under_an_accuracy_budget():
    assert policy.channel_objective(Budget.params(0.5), "params") == "params"
    assert policy.channel_objective(Budget.flops(0.5), "flops") == "flops"
    assert policy.channel_objective(Budget.accuracy_drop(0.02), "params") == "flops"


def test_the_per_layer_search_gets_the_cost_left_after_channels():
    baseline, pruned = Cost(params=1000, flops=8000), Cost(params=600, flops=4000)
    # Keep 30% of the params in all: channels kept 60%, so the layers may keep half of what is left.
    assert policy.remaining_budget(Budget.params(0.3), None, baseline, pruned) == Budget.params(0.5)
    assert policy.remaining_budget(Budget.flops(0.3), None, baseline, pruned) == Budget.flops(0.6)


def test_the_square_root_split_leaves_the_square_root_when_channels_hit_their_share():
    limit = 0.36
    baseline = Cost(params=10_000, flops=10_000)
    pruned = Cost(params=round(10_000 * policy.channel_budget(Budget.params(limit), True).limit), flops=10_000)
    assert policy.remaining_budget(Budget.params(limit), None, baseline, pruned).limit == pytest.approx(math.sqrt(limit))


def test_nothing_is_left_for_the_per_layer_search_when_channels_met_a_cost_budget():
    baseline = Cost(params=1000, flops=1000)
    assert policy.remaining_budget(Budget.params(0.5), None, baseline, Cost(params=500, flops=700)) is None
    assert policy.remaining_budget(Budget.params(0.5), None, baseline, Cost(params=400, flops=700)) is None


def test_the_per_layer_search_gets_the_margin_of_an_accuracy_budget_less_what_channels_lost():
    budget = Budget.accuracy_drop(0.04)
    assert MARGIN == 0.75  # a quarter of the budget is kept for held-out noise
    left = policy.remaining_budget(budget, 0.01, Cost(1, 1), Cost(1, 1))
    assert left.kind == "accuracy_drop" and left.limit == pytest.approx(0.75 * 0.04 - 0.01)
    # Accuracy that rose under channel removal is not credited: the margin is the most the layers get.
    assert policy.remaining_budget(budget, -0.02, Cost(1, 1), Cost(1, 1)).limit == pytest.approx(0.03)
    # Without channel removal the whole margin is left.
    assert policy.remaining_budget(budget, None, Cost(1, 1), Cost(1, 1)).limit == pytest.approx(0.03)


def test_nothing_is_left_when_channels_spent_the_margin_of_an_accuracy_budget():
    assert policy.remaining_budget(Budget.accuracy_drop(0.04), 0.03, Cost(1, 1), Cost(1, 1)) is None
    assert policy.remaining_budget(Budget.accuracy_drop(0.04), 0.05, Cost(1, 1), Cost(1, 1)) is None


def test_fine_tuning_stops_once_within_a_quarter_of_the_budget():
    assert policy.finetune_target(0.9, Budget.accuracy_drop(0.04)) == pytest.approx(0.89)


def test_gates_must_keep_the_margin_of_the_budget_against_the_original():
    # The static stages spend the budget as they would alone; the gated model is held to the
    # same margin of the original's accuracy, not of the static model's.
    assert policy.gating_floor(0.9, Budget.accuracy_drop(0.04)) == pytest.approx(0.9 - 0.75 * 0.04)


def test_is_accuracy():
    assert policy.is_accuracy(Budget.accuracy_drop(0.02))
    assert not policy.is_accuracy(Budget.params(0.5))
    assert not policy.is_accuracy(None)


def test_with_a_guard_the_per_layer_search_aims_at_what_the_guard_can_confirm():
    from compressor.search.confidence import drop_bounds

    budget, guard = Budget.accuracy_drop(0.02), policy.Guard(samples=3000, confidence=0.95)
    allowance = policy.layer_allowance(budget, guard)
    # A candidate that loses exactly that much (and wins nothing back) has its bound at the budget.
    assert drop_bounds(3000 * allowance, 0, 3000, 0.95)[1] == pytest.approx(0.02, abs=1e-6)
    assert 0.01 < allowance < 0.02
    left = policy.remaining_budget(budget, 0.004, Cost(1, 1), Cost(1, 1), guard)
    assert left.limit == pytest.approx(allowance - 0.004)
    # A larger guard confirms more; a guard too small to confirm even an unchanged model leaves nothing.
    assert policy.layer_allowance(budget, policy.Guard(30000, 0.95)) > allowance
    assert policy.remaining_budget(budget, None, Cost(1, 1), Cost(1, 1), policy.Guard(50, 0.95)) is None
