"""The har-tcn example's data: synthetic human-activity accelerometer windows.

Each sample imitates a 2.56 s window of a waist-worn 3-axis accelerometer at 50 Hz
(128 timesteps, in units of g), as in the UCI HAR dataset. Six activities differ in
gravity direction (posture) and in the frequency, amplitude and harmonic content of
the periodic body motion. Every sample draws its own posture tilt, step frequency,
amplitudes, phases, baseline drift and sensor noise, so neighbouring classes overlap
(walking vs. stairs; sitting vs. standing) and the task is learnable but not trivial.

Inputs are float32 (n, 128, 3); labels are int64 in 0..5, in the order of `ACTIVITIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from compressor.models.splits import Splits

TIMESTEPS = 128
SAMPLE_RATE_HZ = 50.0


@dataclass(frozen=True)
class Activity:
    """Generative parameters of one activity class.

    Attributes:
        name: Activity name.
        gravity: Gravity direction in the sensor frame (normalized when used).
        step_hz: Mean frequency of the periodic motion (0 for postures).
        amplitude: Mean amplitude of the motion per axis, in g.
        harmonic: Relative strength of the second harmonic (sharper steps).
    """

    name: str
    gravity: tuple[float, float, float]
    step_hz: float
    amplitude: tuple[float, float, float]
    harmonic: float


ACTIVITIES = (
    Activity("walking", (0.05, 1.0, 0.10), 1.9, (0.20, 0.30, 0.15), 0.30),
    Activity("walking_upstairs", (0.20, 1.0, 0.15), 1.6, (0.18, 0.28, 0.22), 0.55),
    Activity("walking_downstairs", (0.05, 1.0, -0.10), 2.2, (0.25, 0.42, 0.18), 0.60),
    Activity("sitting", (0.30, 0.85, 0.45), 0.0, (0.02, 0.02, 0.02), 0.0),
    Activity("standing", (0.10, 1.0, 0.20), 0.0, (0.03, 0.03, 0.03), 0.0),
    Activity("laying", (0.15, 0.20, 1.0), 0.0, (0.02, 0.02, 0.02), 0.0),
)


def make_activity_windows(
    label: int, count: int, rng: np.random.Generator, noise: float = 0.08
) -> np.ndarray:
    """Generate `count` accelerometer windows of one activity.

    Args:
        label: Index into `ACTIVITIES`.
        count: Number of windows.
        rng: Source of randomness.
        noise: Standard deviation of the white sensor noise, in g.

    Returns:
        float32 array (count, TIMESTEPS, 3).
    """
    act = ACTIVITIES[label]
    t = np.arange(TIMESTEPS) / SAMPLE_RATE_HZ
    gravity = np.asarray(act.gravity) + rng.normal(0.0, 0.12, (count, 3))  # posture tilt
    gravity /= np.linalg.norm(gravity, axis=1, keepdims=True)
    freq = act.step_hz * rng.uniform(0.85, 1.15, (count, 1, 1))
    if act.step_hz == 0.0:
        freq = rng.uniform(0.1, 0.6, (count, 1, 1))  # slow sway of a still posture
    amp = np.asarray(act.amplitude) * rng.uniform(0.7, 1.3, (count, 1, 3))
    phase = rng.uniform(0.0, 2 * np.pi, (count, 1, 3))
    angle = 2 * np.pi * freq * t[None, :, None] + phase
    motion = amp * (np.sin(angle) + act.harmonic * np.sin(2 * angle + phase))
    drift = rng.normal(0.0, 0.03, (count, 1, 3)) * np.linspace(-1, 1, TIMESTEPS)[None, :, None]
    x = gravity[:, None, :] + motion + drift + rng.normal(0.0, noise, (count, TIMESTEPS, 3))
    return x.astype(np.float32)


def make_har_splits(
    seed: int = 0, per_class: tuple[int, int, int] = (300, 100, 100), limit: Optional[int] = None
) -> Splits:
    """Generate the train/val/test arrays of the har-tcn example.

    Args:
        seed: Seed of the generator; each split uses its own stream.
        per_class: Windows per class in train, val and test.
        limit: Keep at most this many training samples (after shuffling); None keeps all.

    Returns:
        The three splits: x float32 (n, 128, 3), y int64 in 0..5.
    """
    out = {}
    for k, (name, count) in enumerate(zip(("train", "val", "test"), per_class)):
        rng = np.random.default_rng([seed, k])
        x = np.concatenate([make_activity_windows(c, count, rng) for c in range(len(ACTIVITIES))])
        y = np.repeat(np.arange(len(ACTIVITIES), dtype=np.int64), count)
        order = rng.permutation(len(y))
        if name == "train" and limit is not None:
            order = order[:limit]
        out[name] = (x[order], y[order])
    return Splits(**out)
