"""SynFlow (Tanaka et al. 2020): data-free importance from the flow through a positive network.

`SynFlowNetwork` builds the network the scores are computed on (its docstring says
why each choice); `global_top` keeps the best-scored weights over all layers, which
iterative SynFlow pruning (`compressor.techniques.scores.synflow_masks`) repeats
with rescoring in between.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError
from compressor.techniques.base import NOMINAL_SIZE, kernel_index, kernel_of
from compressor.techniques.score_copies import scoring_copy

# Weights that shift rather than scale (set to 0) and statistics kept as they are.
SHIFTS = ("bias", "beta", "moving_mean", "mean")
KEPT_STATISTICS = ("moving_variance", "variance", "count")


class SynFlowNetwork:
    """The positive linear network SynFlow scores: R = sum of its outputs on all-ones input.

    A float64 copy of the model (deep products of weight sums overflow float32), run
    in inference mode, where:

    - every weight is |θ|, biases and BatchNormalization's β and moving mean are 0,
      and the moving variance is kept: a BN layer becomes the positive per-channel
      scale |γ|/√(σ² + ε) it applies at inference, part of each path's product;
    - every activation (fused or a layer, the final softmax included) is the
      identity.

    The network is then positively homogeneous and R is the l1 path norm Σ_paths Π|θ|
    (the paper's R = 1ᵀ(Π|W_l|)1), and a weight's score θ·∂R/∂θ is the summed product
    of the paths through it. Zero biases and shifts keep the paper's conservation law:
    in a chain of layers, each layer's scores sum to R. With positive inputs and
    weights a ReLU is the identity anyway (as in the official code, which keeps the
    ReLUs but takes |θ| of biases too); other activations would distort the flow:
    ReLU6 caps the growing activations and zeroes their gradient, sigmoid and tanh
    saturate, and a final softmax makes R constant. Pooling layers are kept (max
    pooling is also positively homogeneous).
    """

    def __init__(self, model: keras.Model, targets: dict[str, Any]) -> None:
        self._network, copies = scoring_copy(
            model, dtype="float64", linear=lambda layer: True, transform=_synflow_weight
        )
        self._variables = {path: _kernel_variable(copies[id(layer)]) for path, layer in targets.items()}
        self._magnitudes = {path: np.abs(kernel_of(layer).astype(np.float64)) for path, layer in targets.items()}
        self._ones = [np.ones(_concrete_shape(tensor.shape), np.float64) for tensor in model.inputs]

    def scores(self, masks: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
        """|θ ⊙ ∂R/∂θ| of the target kernels, with `masks` (path → bool) applied first."""
        for path, variable in self._variables.items():
            magnitude = self._magnitudes[path]
            variable.assign(magnitude if masks is None else np.where(masks[path], magnitude, 0.0))
        watched = [variable.value for variable in self._variables.values()]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            outputs = self._network(self._ones if len(self._ones) > 1 else self._ones[0], training=False)
            flow = tf.add_n([tf.reduce_sum(output) for output in keras.tree.flatten(outputs)])
        gradients = tape.gradient(flow, watched)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            scores = {
                path: np.abs(keras.ops.convert_to_numpy(variable) * keras.ops.convert_to_numpy(gradient))
                for (path, variable), gradient in zip(self._variables.items(), gradients)
            }
        if not (np.isfinite(float(flow)) and all(np.all(np.isfinite(s)) for s in scores.values())):
            raise CompressorError(
                "synflow overflowed float64: the product of the layers' weight magnitudes is too large "
                "for this network; use the magnitude or snip criterion"
            )
        return scores


def _synflow_weight(name: str, value: np.ndarray) -> np.ndarray:
    if name in SHIFTS:
        return np.zeros_like(value)
    if name in KEPT_STATISTICS:
        return value
    return np.abs(value)


def _concrete_shape(shape: Sequence[Optional[int]]) -> tuple[int, ...]:
    """A batch-1 input shape, free dimensions at NOMINAL_SIZE (a fixed batch is kept)."""
    batch = 1 if shape[0] is None else int(shape[0])
    return (batch,) + tuple(NOMINAL_SIZE if d is None else int(d) for d in shape[1:])


def global_top(
    scores: dict[str, np.ndarray], masks: dict[str, np.ndarray], keep: int
) -> dict[str, np.ndarray]:
    """Masks keeping the `keep` best-scored weights over all layers among those still kept.

    Ties go to the first in layer order, then C order, so masks are deterministic.
    """
    paths = list(masks)
    flat = np.concatenate([np.where(masks[p], scores[p], -np.inf).ravel() for p in paths])
    keep = min(keep, int(sum(mask.sum() for mask in masks.values())))
    chosen = np.zeros(flat.shape, dtype=bool)
    chosen[np.argsort(-flat, kind="stable")[:keep]] = True
    sizes = np.cumsum([masks[p].size for p in paths])[:-1]
    return {p: part.reshape(masks[p].shape) for p, part in zip(paths, np.split(chosen, sizes))}


def _kernel_variable(layer: Any) -> Any:
    return layer.weights[kernel_index(layer)]
