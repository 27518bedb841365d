"""What a technique hands the rewriter for one edited layer.

The rewriter (`compressor.surgery.rewrite`) wires it in place of the original layer:

    y = chain[-1](... chain[0](x))          # e.g. 1×1 → k×k → 1×1 for Tucker-2
    y = Add()([y, branch(x)])               # only when a sparse residual branch exists
    y = Activation(activation)(y)           # only when the activation moved after the sum

Layers are new, unbuilt Keras layers; their weights are set once the rewriter has
called (built) them. A layer called several times in the original graph gets one
replacement whose layers are shared by all calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class Piece:
    """One new layer and the weights to give it after it is built."""

    layer: Any  # keras.layers.Layer
    weights: list[np.ndarray]


@dataclass
class Replacement:
    """Layers that stand in for one original layer.

    Attributes:
        chain: Applied in sequence to the layer's input.
        branch: Optional parallel layer on the same input, summed with the chain.
        activation: Activation applied after the sum (None: none); the original
            layer's activation moves here when there is a branch.
    """

    chain: list[Piece]
    branch: Optional[Piece] = None
    activation: Optional[str] = None
    notes: dict[str, Any] = field(default_factory=dict)
