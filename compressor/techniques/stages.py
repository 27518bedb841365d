"""Which layers the stage techniques change, for `compressor inspect`'s technique column.

A stage ("channels", "gating") has no per-layer edits; where it can say which layers
it changes, its registration names a function here (`TechniqueEntry.applies`).
"""

from __future__ import annotations

from typing import Any

from compressor.graph.cost import applicable_techniques


def channels_apply(layer: Any) -> bool:
    """Whether channel removal can narrow `layer`: its "channel" kind in `applicable_techniques`.

    Conv1D, Conv2D (a grouped one loses whole groups), Dense, DepthwiseConv1D/2D,
    SeparableConv1D/2D and MultiHeadAttention (whole heads); whether a given layer's channels can go also depends on the
    graph around it (`compressor.graph.groups`).
    """
    return "channel" in applicable_techniques(layer)
