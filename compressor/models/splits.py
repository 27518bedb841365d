"""Train/val/test arrays of a built-in example."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

SPLITS = ("train", "val", "test")
Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Splits:
    """Inputs and labels of the three splits.

    Attributes:
        train: (x, y) used for fitting.
        val: (x, y) watched during fitting.
        test: (x, y) held out; the reported accuracy is measured on it.
        source_index: For data derived from a fixed set of originals, the original
            index of every sample of each split (a sample's copies share one index);
            None for freshly generated data.
    """

    train: Arrays
    val: Arrays
    test: Arrays
    source_index: Optional[dict[str, np.ndarray]] = field(default=None, compare=False)

    def items(self) -> Iterator[tuple[str, Arrays]]:
        """(name, (x, y)) for train, val and test, in that order."""
        for name in SPLITS:
            yield name, getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: int(len(y)) for name, (_, y) in self.items()}
