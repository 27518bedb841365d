"""The digits example's data: scikit-learn's bundled 8x8 digits, made into a 32x32 task.

The 1797 original images are split into train/val/test first (stratified, seeded),
so that no original digit appears in two splits; only then is each image upsampled
to 32x32 and augmented with random affine transforms and noise. Training images get
several strong augmented copies; validation and test images get one milder copy, so
the test accuracy says something (it is not ~100%). Nothing is downloaded.

Pixel values are float32 in [0, 1], shape (n, 32, 32, 1); labels are int64 in 0..9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from compressor.models.splits import Splits

IMAGE_SIZE = 32
NUM_CLASSES = 10
_DIGIT_SIZE = 24  # the 8x8 digit is upsampled x3, then padded to 32x32 to leave room for shifts


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random affine transform and noise applied to one image.

    Attributes:
        rotation_deg: Rotation drawn uniformly from ±this many degrees.
        shift_px: Translation per axis drawn uniformly from ±this many pixels.
        scale: Zoom factor drawn uniformly from 1 ± this.
        contrast: Ink intensity multiplied by a factor drawn from [1 - this, 1].
        noise: Standard deviation of the added Gaussian pixel noise.
    """

    rotation_deg: float
    shift_px: float
    scale: float
    contrast: float
    noise: float


# Noise on faint strokes is what keeps the test accuracy off 100%: the CNNs shrug off
# the geometric changes, so val/test get milder geometry but the same noise.
TRAIN_AUGMENTATION = Augmentation(
    rotation_deg=20.0, shift_px=4.0, scale=0.2, contrast=0.4, noise=0.25
)
EVAL_AUGMENTATION = Augmentation(
    rotation_deg=12.0, shift_px=3.0, scale=0.12, contrast=0.3, noise=0.25
)


def split_digits(
    labels: np.ndarray, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> dict[str, np.ndarray]:
    """Split original image indices into disjoint, stratified train/val/test sets.

    Args:
        labels: Class label of every original image.
        seed: Seed of the split.
        fractions: Shares of train, val and test; they must sum to 1.

    Returns:
        Sorted index arrays under "train", "val" and "test".

    Raises:
        ValueError: The fractions are not three positive shares summing to 1.
    """
    from sklearn.model_selection import train_test_split

    if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            "Expected three positive split fractions summing to 1. "
            f"Received: fractions={tuple(fractions)}"
        )
    indices = np.arange(len(labels))
    train, rest = train_test_split(
        indices, train_size=fractions[0], stratify=labels, random_state=seed
    )
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(
        rest, train_size=val_share, stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def upsample(images: np.ndarray) -> np.ndarray:
    """Scale 8x8 digits (values 0..16) to centred 32x32 images with values in [0, 1]."""
    from scipy import ndimage

    factor = _DIGIT_SIZE / images.shape[-1]
    big = ndimage.zoom(images.astype(np.float32) / 16.0, (1, factor, factor), order=1)
    pad = (IMAGE_SIZE - big.shape[-1]) // 2
    big = np.pad(big, ((0, 0), (pad, pad), (pad, pad)))
    return np.clip(big, 0.0, 1.0).astype(np.float32)


def augment(images: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Apply a random affine transform, contrast change and Gaussian noise to each image.

    Args:
        images: Images (n, h, w) with values in [0, 1].
        aug: Ranges of the transform and noise.
        rng: Source of randomness; the result depends only on its state.

    Returns:
        Transformed float32 images (n, h, w), clipped to [0, 1].
    """
    from scipy import ndimage

    count, height, width = images.shape
    angles = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg, count))
    scales = rng.uniform(1.0 - aug.scale, 1.0 + aug.scale, count)
    shifts = rng.uniform(-aug.shift_px, aug.shift_px, (count, 2))
    gains = rng.uniform(1.0 - aug.contrast, 1.0, count).astype(np.float32)
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    out = np.empty_like(images, dtype=np.float32)
    for i in range(count):
        cos, sin = np.cos(angles[i]), np.sin(angles[i])
        # affine_transform maps output coordinates to input ones: the inverse transform.
        matrix = np.array([[cos, -sin], [sin, cos]]) / scales[i]
        offset = centre - matrix @ (centre + shifts[i])
        out[i] = ndimage.affine_transform(images[i], matrix, offset, order=1, mode="constant")
    out *= gains[:, None, None]
    out += rng.normal(0.0, aug.noise, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def make_digit_splits(seed: int = 0, train_copies: int = 2, limit: Optional[int] = None) -> Splits:
    """Build the train/val/test arrays of the digits example.

    Args:
        seed: Seed of the split and of every augmentation.
        train_copies: Augmented copies of each training image.
        limit: Keep at most this many training samples (after augmentation and
            shuffling); None keeps all. For quick runs.

    Returns:
        The three splits: x float32 (n, 32, 32, 1) in [0, 1], y int64 in 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    index = split_digits(labels, seed)
    # Independent streams per split, so changing one split's size leaves the others alone.
    streams = {name: np.random.default_rng([seed, k]) for k, name in enumerate(index)}

    train_idx = np.repeat(index["train"], train_copies)
    train_idx = train_idx[streams["train"].permutation(len(train_idx))]
    if limit is not None:
        train_idx = train_idx[:limit]
    arrays = {"train": (train_idx, TRAIN_AUGMENTATION)}
    arrays.update({name: (index[name], EVAL_AUGMENTATION) for name in ("val", "test")})

    out = {}
    for name, (idx, aug) in arrays.items():
        x = augment(upsample(images[idx]), aug, streams[name])
        out[name] = (x[..., np.newaxis], labels[idx])
    return Splits(**out, source_index={name: idx for name, (idx, _) in arrays.items()})
