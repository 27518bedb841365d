"""The paired confidence bounds of an accuracy drop: coverage, rejection, and the data a budget needs (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.search.confidence import (
    PairedDrop, can_confirm, drop_bounds, expected_upper, guard_chance, paired_drop, samples_needed, z_value,
)


def _draw(rng: np.random.Generator, n: int, p_loss: float, p_win: float) -> tuple[int, int]:
    """Losses and wins among n paired samples drawn with these probabilities."""
    u = rng.random(n)
    return int(np.sum(u < p_loss)), int(np.sum((u >= p_loss) & (u < p_loss + p_win)))


# (samples, P(loss), P(win)): compressed models that mostly lose, that lose and win, small and large data.
SCENARIOS = [(3000, 0.005, 0.0), (3000, 0.02, 0.01), (3000, 0.04, 0.02), (500, 0.01, 0.0), (500, 0.02, 0.005),
             (1000, 0.003, 0.001), (6000, 0.02, 0.005), (10000, 0.015, 0.01)]


@pytest.mark.parametrize("n, p_loss, p_win", SCENARIOS)
def test_the_upper_bound_covers_the_true_drop_at_the_stated_rate(n, p_loss, p_win):
    # 2,000 seeded draws: the binomial standard error of a 95% rate is 0.5 points, so 0.93
    # allows for simulation noise and the discreteness of small counts, no more.
    rng = np.random.default_rng(n + int(p_loss * 1e4))
    true_drop = p_loss - p_win
    covered = [drop_bounds(*_draw(rng, n, p_loss, p_win), n, 0.95)[1] >= true_drop for _ in range(2000)]
    assert np.mean(covered) >= 0.93


def test_the_two_sided_interval_covers_at_twice_the_one_sided_rate():
    rng = np.random.default_rng(7)
    n, p_loss, p_win = 3000, 0.03, 0.01
    hits = []
    for _ in range(2000):
        lower, upper = drop_bounds(*_draw(rng, n, p_loss, p_win), n, 0.95)
        hits.append(lower <= p_loss - p_win <= upper)
    assert np.mean(hits) >= 0.88  # a 90% interval, with the same allowance for noise


def test_a_candidate_whose_true_drop_is_above_the_budget_is_rejected():
    rng = np.random.default_rng(3)
    budget, n = 0.02, 3000
    # True drop 2.5 points (3% losses, 0.5% wins) against a 2-point budget: accepted in at most 5% of runs.
    accepted = [drop_bounds(*_draw(rng, n, 0.03, 0.005), n, 0.95)[1] <= budget for _ in range(2000)]
    assert np.mean(accepted) <= 0.05
    # At exactly the budget the bound still refuses about 95% of the time.
    at_limit = [drop_bounds(*_draw(rng, n, 0.03, 0.01), n, 0.95)[1] <= budget for _ in range(2000)]
    assert np.mean(at_limit) <= 0.07


def test_a_candidate_well_within_the_budget_is_accepted():
    rng = np.random.default_rng(4)
    accepted = [drop_bounds(*_draw(rng, 3000, 0.01, 0.01), 3000, 0.95)[1] <= 0.02 for _ in range(500)]
    assert np.mean(accepted) >= 0.95


def test_paired_drop_counts_losses_and_wins_on_the_same_samples():
    original = np.array([1, 1, 1, 0, 0, 1], bool)
    candidate = np.array([1, 0, 0, 1, 0, 1], bool)
    measured = paired_drop(original, candidate, 0.95)
    assert (measured.losses, measured.wins, measured.samples) == (2, 1, 6)
    assert measured.drop == pytest.approx(1 / 6)
    assert measured.lower < measured.drop < measured.upper
    identical = paired_drop(original, original)
    assert identical.drop == 0 and 0 < identical.upper < 0.4  # no flips on 6 samples still leaves doubt


def test_more_confidence_or_fewer_samples_widen_the_bound():
    assert drop_bounds(30, 10, 3000, 0.99)[1] > drop_bounds(30, 10, 3000, 0.95)[1] > drop_bounds(30, 10, 3000, 0.8)[1]
    assert drop_bounds(3, 1, 300, 0.95)[1] > drop_bounds(30, 10, 3000, 0.95)[1]


def test_samples_needed_is_the_least_that_can_confirm_the_budget():
    for limit in (0.005, 0.01, 0.02, 0.05):
        needed = samples_needed(limit, 0.95)
        assert can_confirm(needed, limit, 0.95)
        assert not can_confirm(needed - 1, limit, 0.95)
    # Half the budget needs about twice the data: the bound's width goes as sqrt(drop / n) for a
    # candidate that only loses, and that drop halves with the budget.
    assert 1.8 <= samples_needed(0.01) / samples_needed(0.02) <= 2.3
    assert 500 <= samples_needed(0.02, 0.95) <= 1000


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(CompressorError, match="paired samples differ"):
        paired_drop(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(CompressorError, match="Invalid confidence"):
        z_value(1.0)
    with pytest.raises(CompressorError, match="cannot be confirmed"):
        samples_needed(0.0)


def test_the_expected_bound_at_another_size_keeps_the_shares_and_takes_that_size_s_width():
    small = paired_drop(np.r_[np.ones(200, bool)], np.r_[np.zeros(4, bool), np.ones(196, bool)], 0.95)
    assert expected_upper(small, 200) == pytest.approx(small.upper)
    large = expected_upper(small, 2000)  # 40 losses in 2,000: the same 2% drop, a narrower bound
    assert large == pytest.approx(drop_bounds(40, 0, 2000, 0.95)[1])
    assert small.drop < large < small.upper


def _counted(losses: int, wins: int, samples: int) -> PairedDrop:
    return PairedDrop(samples, losses, wins, 0.95, *drop_bounds(losses, wins, samples, 0.95))


def test_the_guard_s_chance_is_one_half_at_the_edge_and_grows_with_the_margin():
    at_edge = next(_counted(losses, 150, 6000) for losses in range(150, 400) if expected_upper(_counted(losses, 150, 6000), 6000) > 0.02)
    below = _counted(at_edge.losses - 1, 150, 6000)  # the last count whose expected bound is within 2%
    assert 0.4 <= guard_chance(below, 6000, 0.02) <= 0.55
    chances = [guard_chance(_counted(losses, 150, 6000), 6000, 0.02) for losses in (160, 200, 230, 260)]
    assert chances == sorted(chances, reverse=True) and chances[0] > 0.99 and chances[-1] < 0.25
    # A larger guard is surer of the same shares: a narrower bound and less noise.
    assert guard_chance(_counted(260, 150, 6000), 24000, 0.02) > guard_chance(_counted(260, 150, 6000), 6000, 0.02)
    assert guard_chance(_counted(0, 0, 0), 6000, 0.02) == 0.0


def test_the_guard_s_chance_matches_how_often_a_guard_of_other_samples_accepts():
    """Seeded simulation: candidates of drops spread across the budget's edge, each measured on
    6,000 selection and 6,000 guard samples; the guard's acceptance rate follows the chance the
    selection split predicted (within 0.08 per bin of a few hundred candidates)."""
    rng = np.random.default_rng(3)
    predicted, accepted = [], []
    for _ in range(3000):
        drop, win = rng.uniform(0.005, 0.025), rng.uniform(0.01, 0.03)
        shares = [drop + win, win, 1 - drop - 2 * win]
        selection, guard = rng.multinomial(6000, shares), rng.multinomial(6000, shares)
        predicted.append(guard_chance(_counted(selection[0], selection[1], 6000), 6000, 0.02))
        accepted.append(drop_bounds(guard[0], guard[1], 6000, 0.95)[1] <= 0.02)
    predicted, accepted = np.array(predicted), np.array(accepted)
    for low, high in ((0.05, 0.35), (0.35, 0.65), (0.65, 0.95)):
        inside = (predicted >= low) & (predicted < high)
        assert inside.sum() >= 100
        assert abs(accepted[inside].mean() - predicted[inside].mean()) <= 0.08
    sure = predicted >= 0.8  # what the channel search asks of a step (GUARD_CHANCE)
    assert accepted[sure].mean() >= 0.85
