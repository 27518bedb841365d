"""Which layers the stage techniques change, for `compressor inspect`'s technique column.

A stage ("channels", "gating") has no per-layer edits; where it can say which layers
it changes, its registration names a function here (`TechniqueEntry.applies`).
"""

from __future__ import annotations

from typing import Any

import keras


def channels_apply(layer: Any) -> bool:
    """Whether channel removal can narrow `layer`: a Conv1D, Conv2D, Dense or DepthwiseConv2D, not grouped.

    Grouped convolutions are left out: their channels can only go a whole group at a time.
    """
    plain = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)
    grouped = getattr(layer, "groups", 1) != 1
    return bool(getattr(layer, "weights", None)) and isinstance(layer, plain) and not grouped
