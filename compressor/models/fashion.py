"""The Fashion-MNIST examples' data: the four standard idx files, read offline.

Fashion-MNIST (Zalando, 2017) is 60,000 training and 10,000 test images of clothing,
28x28 grey, 10 classes. Nothing is downloaded: the files come from a folder the user
names (`source`), else from Debian's package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist` puts them in `DEBIAN_DIR`). Either the
gzipped names Keras' loader uses (`train-images-idx3-ubyte.gz`, ...) or the
uncompressed ones are read.

The splits are the official ones: validation is carved from the 60,000 training
images (stratified, seeded: `VAL_SIZE` of them), the official test set is held out
whole. Pixel values are float32 in [0, 1], shape (n, 28, 28, 1); labels int64 0..9.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np

from compressor.errors import CompressorError
from compressor.models.splits import Splits

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's dataset-fashion-mnist package installs the idx files."""
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
VAL_SIZE = 12000
IMAGE_SIZE = 28
NUM_CLASSES = 10
INSTALL_HINT = "install Debian's package with 'apt-get install dataset-fashion-mnist' (as root)"
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionDataError(CompressorError):
    """The Fashion-MNIST files are missing or not what they should be."""


def find_source(source: Optional[Path | str] = None) -> Path:
    """The folder holding the four idx files: `source` when given, else Debian's.

    Raises:
        FashionDataError: One line naming the missing file and how to get it.
    """
    folder = Path(source) if source is not None else DEBIAN_DIR
    for stem in FILES.values():
        if _file(folder, stem) is None:
            where = f"{folder} has no {stem}(.gz)" if source is not None else "Fashion-MNIST is not installed"
            raise FashionDataError(f"{where}: {INSTALL_HINT}, or pass a folder of the four standard idx files")
    return folder


def read_idx(path: Path | str) -> np.ndarray:
    """One idx file (gzipped or not) as an array of its stored type and shape.

    Raises:
        FashionDataError: Not an idx file, or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise FashionDataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise FashionDataError(f"{path} is not an idx file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    if len(raw) != header + int(np.prod(shape)) * dtype.itemsize:
        raise FashionDataError(f"{path} is truncated or has trailing bytes (shape {shape})")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def load_fashion(source: Optional[Path | str] = None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)) as uint8 images (n, 28, 28) and labels, like Keras' loader.

    Raises:
        FashionDataError: Missing or malformed files.
    """
    folder = find_source(source)
    arrays = {key: read_idx(_file(folder, stem)) for key, stem in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or labels.shape != images.shape[:1]:
            raise FashionDataError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} are not Fashion-MNIST's"
            )
        if labels.max() >= NUM_CLASSES:
            raise FashionDataError(f"{folder}: {split} labels go up to {labels.max()}; expected 0..{NUM_CLASSES - 1}")
    return (arrays["train_images"], arrays["train_labels"]), (arrays["test_images"], arrays["test_labels"])


def make_fashion_splits(seed: int = 0, limit: Optional[int] = None, source: Optional[Path | str] = None,
                        val_size: int = VAL_SIZE) -> Splits:
    """Train (48,000) / validation (12,000, from the training images) / official test (10,000).

    `source_index` numbers the 70,000 images as the files do, test images after the
    training ones, so the three splits are disjoint by construction.

    Args:
        seed: Seed of the validation split.
        limit: Keep at most this many training images (quick runs); validation and
            test stay whole.
        source: Folder of the idx files (default: Debian's).
        val_size: Training images set aside for validation, the same number per class.

    Raises:
        FashionDataError: Missing or malformed files.
    """
    (x_train, y_train), (x_test, y_test) = load_fashion(source)
    rng = np.random.default_rng(seed)
    per_class = val_size // NUM_CLASSES
    val = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:per_class] for c in range(NUM_CLASSES)])
    train = np.setdiff1d(np.arange(len(y_train)), val)
    train = rng.permutation(train)[:limit] if limit is not None else rng.permutation(train)
    return Splits(
        train=(_images(x_train[train]), y_train[train].astype(np.int64)),
        val=(_images(x_train[np.sort(val)]), y_train[np.sort(val)].astype(np.int64)),
        test=(_images(x_test), y_test.astype(np.int64)),
        source_index={"train": train, "val": np.sort(val), "test": len(y_train) + np.arange(len(y_test))},
    )


def _images(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[..., None]


def _file(folder: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None
