"""How sure a measured accuracy drop is: paired confidence bounds, and the data a budget needs.

A drop is measured paired: the same images through the original and the candidate.
Only the images on which they disagree carry information: `losses` (the original is
right, the candidate wrong) and `wins` (the reverse). Out of n images the drop is
(losses − wins) / n.

The bounds are Tango's asymptotic score interval for a difference of paired proportions
(Tango, Statistics in Medicine 17, 1998; recommended for paired binomial data by
Fagerland, Lydersen and Laake, 2014): the upper bound is the largest drop δ that the
score statistic

    (losses − wins − n·δ) / sqrt(n · (2·p̂_w(δ) + δ·(1 − δ)))

does not reject at the one-sided level, p̂_w(δ) being the maximum-likelihood share of
wins under that drop. Unlike the plain Wald bound it does not collapse to zero width
when the two models disagree on few or no samples, and its one-sided coverage stays
near nominal where a compressed model mostly loses and rarely wins (measured in the
tests). Pure NumPy and the standard library: no TensorFlow.

Metrics with per-sample values (mse, mae, a hook; `compressor.metrics`) have no counts:
their drop is the mean of the paired per-sample differences of scores (original minus
candidate), bounded by the one-sided Student t bound on that mean (`paired_difference`),
with the t quantile from its Cornish-Fisher expansion (no SciPy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import numpy as np

from compressor.errors import CompressorError

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop of a candidate against the original on the same samples, with its bounds.

    Attributes:
        samples: Number of samples.
        losses: Samples the original gets right and the candidate wrong.
        wins: Samples the candidate gets right and the original wrong.
        confidence: One-sided confidence of each bound.
        lower, upper: The drop is at least `lower` and at most `upper`, each with
            `confidence` (together a two-sided interval of 2·confidence − 1).
        mean: For per-sample values (`paired_difference`): the mean difference of
            scores, the drop; None for counts.
        spread: For per-sample values: the standard deviation of the differences.
    """

    samples: int
    losses: int
    wins: int
    confidence: float
    lower: float
    upper: float
    mean: Optional[float] = None
    spread: Optional[float] = None

    @property
    def drop(self) -> float:
        """The measured drop: (losses − wins) / samples, or the mean difference of per-sample scores."""
        if self.mean is not None:
            return self.mean
        return (self.losses - self.wins) / self.samples if self.samples else 0.0

    def within(self, limit: float) -> bool:
        """Whether the drop is at most `limit` with the stated confidence (the upper bound is)."""
        return self.upper <= limit + 1e-12


def z_value(confidence: float) -> float:
    """The one-sided normal quantile of `confidence`.

    Raises:
        CompressorError: A confidence outside [0.5, 1).
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        raise CompressorError(f"Invalid confidence. Expected 0.5 <= C < 1. Received: confidence={confidence!r}")
    return NormalDist().inv_cdf(float(confidence))


def drop_bounds(losses: float, wins: float, samples: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """(lower, upper) one-sided bounds of the drop (Tango's score interval, module docstring).

    Counts are usually whole; fractional ones (expected counts) give the bound of that share.
    """
    z = z_value(confidence)
    if samples <= 0:
        return -1.0, 1.0
    measured = (losses - wins) / samples
    return -_score_bound(wins, losses, samples, z, -measured), _score_bound(losses, wins, samples, z, measured)


def _score_bound(losses: float, wins: float, n: int, z: float, measured: float) -> float:
    """The largest drop in [measured, 1] the score test does not reject (bisection: the statistic falls with δ)."""

    def statistic(delta: float) -> float:
        a = 2.0 * n
        b = -losses - wins + (2.0 * n - losses + wins) * delta
        c = -wins * delta * (1.0 - delta)
        p_win = (-b + math.sqrt(max(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)
        variance = n * (2.0 * p_win + delta * (1.0 - delta))
        excess = losses - wins - n * delta
        return excess / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, excess)

    low, high = measured, 1.0
    if statistic(high) >= -z:
        return 1.0
    for _ in range(50):  # 2^-50: far below one sample
        middle = (low + high) / 2
        low, high = (middle, high) if statistic(middle) >= -z else (low, middle)
    return low


def paired_drop(original_correct: np.ndarray, candidate_correct: np.ndarray,
                confidence: float = DEFAULT_CONFIDENCE) -> PairedDrop:
    """The drop of a candidate against the original, from which samples each got right.

    Args:
        original_correct: Per sample, whether the original classified it right.
        candidate_correct: The same for the candidate, same samples in the same order.
        confidence: One-sided confidence of each bound.

    Raises:
        CompressorError: Arrays of different lengths, or a bad confidence.
    """
    original, candidate = np.asarray(original_correct, bool), np.asarray(candidate_correct, bool)
    if original.shape != candidate.shape or original.ndim != 1:
        raise CompressorError(f"paired samples differ: {original.shape} against {candidate.shape}")
    losses, wins = int(np.sum(original & ~candidate)), int(np.sum(candidate & ~original))
    lower, upper = drop_bounds(losses, wins, len(original), confidence)
    return PairedDrop(len(original), losses, wins, float(confidence), lower, upper)


def paired_difference(original_scores: np.ndarray, candidate_scores: np.ndarray,
                      confidence: float = DEFAULT_CONFIDENCE) -> PairedDrop:
    """The drop of a candidate against the original from per-sample scores (higher is better), with t bounds.

    `losses` and `wins` count the samples whose score fell and rose.

    Raises:
        CompressorError: Arrays of different shapes, or a bad confidence.
    """
    original, candidate = np.asarray(original_scores, np.float64), np.asarray(candidate_scores, np.float64)
    if original.shape != candidate.shape or original.ndim != 1:
        raise CompressorError(f"paired samples differ: {original.shape} against {candidate.shape}")
    z, n = z_value(confidence), len(original)
    differences = original - candidate
    if n < 2:
        mean = float(differences.mean()) if n else 0.0
        return PairedDrop(n, int(np.sum(differences > 0)), int(np.sum(differences < 0)), float(confidence),
                          -math.inf, math.inf, mean, None)
    mean, spread = float(differences.mean()), float(differences.std(ddof=1))
    width = t_value(z, n - 1) * spread / math.sqrt(n)
    return PairedDrop(n, int(np.sum(differences > 0)), int(np.sum(differences < 0)), float(confidence),
                      mean - width, mean + width, mean, spread)


def t_value(z: float, freedom: int) -> float:
    """Student's t quantile at the normal quantile `z` with `freedom` degrees (Cornish-Fisher, 3 terms)."""
    v = float(freedom)
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2) + \
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)


def expected_upper(measured: PairedDrop, samples: int) -> float:
    """The upper bound `samples` samples would give if they showed the same shares of losses and wins as `measured`.

    How a search predicts, from its own data, whether a guard of another size would
    accept a model: the drop and the disagreement carry over, the bound's width is the
    guard's.
    """
    if measured.samples == 0:
        return 1.0
    if measured.mean is not None:  # per-sample values: same mean and spread, the width of `samples`
        if measured.spread is None or samples < 2:
            return math.inf
        return measured.mean + t_value(z_value(measured.confidence), samples - 1) * measured.spread / math.sqrt(samples)
    scale = samples / measured.samples
    return drop_bounds(measured.losses * scale, measured.wins * scale, samples, measured.confidence)[1]


def guard_chance(measured: PairedDrop, samples: int, limit: float) -> float:
    """The chance that a guard of `samples` other samples accepts the candidate `measured` here (its bound within `limit`).

    The guard sees the same model on other data: its drop differs from the one measured
    here by the noise of both samples (standard deviation sqrt(v/n + v/m), v the
    variance of one paired difference), and its bound sits `expected_upper` minus the
    drop above its own drop. So the guard accepts with chance
    Φ((limit − expected_upper) / sqrt(v/n + v/m)): one half for a candidate whose
    expected bound is at the limit, as near 1 as the margin is wide.
    """
    if measured.samples == 0 or samples <= 0:
        return 0.0
    bound = expected_upper(measured, samples)
    if measured.mean is not None:  # per-sample values
        if measured.spread is None:
            return 0.0
        variance = measured.spread ** 2
    else:
        variance = (measured.losses + measured.wins) / measured.samples - measured.drop ** 2
    spread = math.sqrt(max(variance, 0.0) * (1.0 / measured.samples + 1.0 / samples))
    if spread == 0.0:
        return 1.0 if bound <= limit + 1e-12 else 0.0
    return NormalDist().cdf((limit - bound) / spread)


def confirmable_drop(limit: float, samples: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest drop `samples` samples can confirm within `limit`, for a candidate that only loses (0 if none).

    What a search that compares counts on other data should aim at, so that what it
    chooses has a fair chance at a guard of this size: a candidate that also wins
    some samples back needs a smaller drop still.
    """
    if samples <= 0 or drop_bounds(0, 0, samples, confidence)[1] > limit:
        return 0.0
    low, high = 0.0, max(limit, 0.0)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if drop_bounds(samples * middle, 0, samples, confidence)[1] <= limit else (low, middle)
    return low


def can_confirm(samples: int, limit: float, confidence: float = DEFAULT_CONFIDENCE) -> bool:
    """Whether `samples` can confirm a candidate that loses half of `limit` and wins nothing back.

    That candidate is the easiest one to confirm that still compresses usefully (it
    spends half the budget, with the least noise a drop of that size can have); with
    fewer samples its upper bound is above the limit, and only models that change
    almost no prediction can be accepted.
    """
    if limit <= 0:
        return False
    return drop_bounds(samples * limit / 2, 0, samples, confidence)[1] <= limit  # a share, not rounded: monotone in samples


def samples_needed(limit: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest samples that `can_confirm` a drop budget of `limit` (at least; noisier candidates need more).

    Raises:
        CompressorError: A limit that no data confirms (0 or less).
    """
    if not limit > 0:
        raise CompressorError(f"a drop budget of {limit} cannot be confirmed by any number of samples")
    high = 16
    while not can_confirm(high, limit, confidence):
        high *= 2
    low = high // 2
    while high - low > 1:  # can_confirm is monotone in samples
        middle = (low + high) // 2
        low, high = (low, middle) if can_confirm(middle, limit, confidence) else (middle, high)
    return high


def step_chance(baseline_correct: np.ndarray, correct: np.ndarray, limit: float, settings: Any) -> Optional[float]:
    """The chance a guard of `settings.guard_samples` accepts a step measured `correct` (`guard_chance`).

    None without a confidence or a guard size (`step_holds` then uses another rule).
    """
    if settings.confidence is None or settings.guard_samples is None:
        return None
    measured = paired_drop(baseline_correct, correct, settings.confidence)
    return guard_chance(measured, settings.guard_samples, limit)


def step_holds(baseline_correct: np.ndarray, correct: np.ndarray, limit: float, settings: Any) -> bool:
    """Whether a step's per-sample correctness holds against the original's within `limit`.

    `settings` carries `confidence`, `guard_samples` and `guard_chance` (`BlockSettings`,
    `ChannelSettings`): with a guard size, the guard must be expected to accept it with
    `guard_chance` (`step_chance`); without one, the search data's own bound must be
    within `limit`; without a confidence, the drop must be within MARGIN of `limit`.
    """
    from compressor.search.budgets import MARGIN

    if settings.confidence is None:
        return float(baseline_correct.mean()) - float(correct.mean()) <= MARGIN * limit
    chance = step_chance(baseline_correct, correct, limit, settings)
    if chance is None:
        return paired_drop(baseline_correct, correct, settings.confidence).within(limit)
    return chance >= settings.guard_chance
