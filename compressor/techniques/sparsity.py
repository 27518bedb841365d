"""Sparsity masks, and the technique that masks a layer's kernel in place.

`mask` works on kernels in pattern layout (..., in_channels, out_channels); see
`compressor.techniques.base` for how depthwise, transposed and separable kernels are
viewed in it. Weights are ranked by a score, |w|² by default, and a group of weights
(a filter, an input channel, a block) by the sum of its scores: with the default
that is its squared L2 norm, so the kept weights are those that leave the smallest
Frobenius error. Ties go to the lower index (first in C order), so masks are
deterministic.

The masks are computed in numpy rather than with tfmot's `pruning_utils`
(`generate_m_by_n_mask`, `factorized_pool`): those work only along the last axis of
2-D weights, pad channel counts that do not divide instead of refusing them, and
need tf_keras imported. The n:m mask agrees with `generate_m_by_n_mask` (tested).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import keras
import numpy as np

from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, SEPARABLE
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec
from compressor.surgery.replacement import Piece, Replacement
from compressor.techniques.base import (
    Shape,
    call_shapes,
    edit_cost,
    kept_count,
    kernel_index,
    kernel_name,
    layer_cost,
    pattern_kernel,
    relative_error,
    restore_kernel,
)

# A kernel with fewer than 30% zeros is stored dense (compressor.graph.cost.SPARSE_STORAGE_MIN_ZEROS):
# a lighter mask would cost accuracy and save nothing in the artifact.
DENSITIES = (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
SUPPORTED = CONV + CONV_TRANSPOSE + DEPTHWISE + SEPARABLE + (keras.layers.Dense,)


def mask(weights: np.ndarray, spec: SparsitySpec, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Which weights to keep: `spec.density` of them (n/m for "n:m"), in `spec`'s pattern.

    Args:
        weights: A kernel in pattern layout (..., in_channels, out_channels).
        spec: The pattern: "unstructured" (single weights), "filter" (whole output
            channels, the last axis), "channel" (whole input channels, the
            second-to-last axis), "block" (block_size blocks over the (in, out) axes,
            at each kernel tap), or "n:m" (n of every m consecutive input channels).
        scores: Importance per weight, same shape, higher is kept; default |w|².

    Returns:
        A boolean array shaped like `weights` with exactly
        `kept_count(weights.shape, spec)` true entries.

    Raises:
        PlanError: Scores shaped unlike the weights, fewer than 2 axes, or a block
            size or m that does not divide the channel counts.
    """
    weights = np.asarray(weights)
    kept = kept_count(weights.shape, spec)  # validates the pattern against the shape
    if scores is None:
        scores = np.square(weights.astype(np.float64))
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != weights.shape:
        raise PlanError(f"scores must be shaped like the weights {weights.shape}. Received: {scores.shape}")
    c_in, c_out = weights.shape[-2:]
    if spec.structure == "unstructured":
        return _top(scores.ravel(), kept).reshape(weights.shape)
    if spec.structure == "filter":
        per_filter = scores.reshape(-1, c_out).sum(axis=0)
        keep = _top(per_filter, kept // (weights.size // c_out))
        return np.broadcast_to(keep, weights.shape).copy()
    if spec.structure == "channel":
        per_channel = scores.reshape(-1, c_in, c_out).sum(axis=(0, 2))
        keep = _top(per_channel, kept // (weights.size // c_in))
        return np.broadcast_to(keep[:, None], weights.shape).copy()
    if spec.structure == "block":
        return _block_mask(scores, spec.block_size, kept)
    return _n_of_m_mask(scores, spec.n, spec.m)


def _top(values: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the `count` largest values of a 1-D array; ties to the lower index."""
    keep = np.zeros(values.shape, dtype=bool)
    keep[np.argsort(-values, kind="stable")[:count]] = True
    return keep


def _block_mask(scores: np.ndarray, block_size: tuple[int, int], kept: int) -> np.ndarray:
    rows, cols = block_size
    c_in, c_out = scores.shape[-2:]
    blocks = scores.reshape(-1, c_in // rows, rows, c_out // cols, cols).sum(axis=(2, 4))
    keep = _top(blocks.ravel(), kept // (rows * cols)).reshape(blocks.shape)
    keep = np.repeat(np.repeat(keep, rows, axis=1), cols, axis=2)
    return keep.reshape(scores.shape)


def _n_of_m_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    c_in, c_out = scores.shape[-2:]
    groups = scores.reshape(-1, c_in // m, m, c_out)
    order = np.argsort(-groups, axis=2, kind="stable")  # stable: ties to the lower channel
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :, :n], True, axis=2)
    return keep.reshape(scores.shape)


def masked(weights: np.ndarray, spec: SparsitySpec, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """`weights` with the weights outside `mask(weights, spec, scores)` set to 0."""
    return np.where(mask(weights, spec, scores), weights, np.zeros_like(weights))


class Sparsity:
    """Masks a layer's kernel and keeps the layer: same class, config, name and bias.

    Applies to ConvND, ConvNDTranspose, DepthwiseConvND, SeparableConvND and Dense.
    A separable convolution gets its pointwise kernel masked and its depthwise kernel
    left dense: the pointwise part holds most of its weights and FLOPs, and each
    depthwise filter is the only path for its channel. A depthwise kernel is masked
    per output channel: "filter" drops whole output channels; "channel" and "n:m"
    (which need several input channels per output) do not apply to it.

    Args:
        scores: Qualified layer name → importance of each weight of its masked kernel,
            shaped as Keras stores it (`compressor.techniques.scores.weight_scores`);
            layers without scores are ranked by |w|².
    """

    name = "sparsity"

    def __init__(self, scores: Optional[Mapping[str, np.ndarray]] = None) -> None:
        self.scores = dict(scores or {})

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        if kernel_name(layer) is None:
            return "has no kernel to mask"
        if getattr(layer, "quantization_mode", None):
            return f"already quantized ({layer.quantization_mode})"
        if not isinstance(layer, SUPPORTED):
            return f"sparsity applies to convolution and Dense layers, not {type(layer).__name__}"
        return None

    def options(
        self,
        layer: Any,
        residual: Optional[SparsitySpec] = None,
        input_shape: Optional[Shape] = None,
        output_shape: Optional[Shape] = None,
    ) -> list[LayerEdit]:
        """Masks at densities 0.7 … 0.1 in the pattern of `residual` (default unstructured).

        An "n:m" pattern gives one edit (density n/m). Masks that keep the same number
        of weights are listed once; a mask that keeps none is not offered.

        Raises:
            PlanError: The pattern does not fit the layer's kernel.
        """
        template = residual or SparsitySpec(density=1.0)
        _check_pattern(layer, template)
        input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
        params, flops = layer_cost(layer, input_shape, output_shape)
        densities = (template.n / template.m,) if template.structure == "n:m" else DENSITIES
        edits, seen = [], set()
        for density in densities:
            spec = SparsitySpec(density, template.structure, template.block_size, template.n, template.m)
            edit = LayerEdit(layer=layer.name, technique="sparsity", sparsity=spec)
            kept = kept_count(pattern_kernel(layer).shape, spec)
            cost = edit_cost(layer, edit, input_shape, output_shape)
            if kept and kept not in seen and cost[0] < params and cost[1] < flops:
                seen.add(kept)
                edits.append(edit)
        return edits

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        """A clone of the layer (same config and name) holding the masked kernel.

        Raises:
            PlanError: The edit is not a sparsity edit, or its pattern does not fit.
        """
        if edit.technique != "sparsity":
            raise PlanError(f"the sparsity technique cannot build a {edit.technique!r} edit of {layer.name!r}")
        _check_pattern(layer, edit.sparsity)
        weights = layer.get_weights()
        at = kernel_index(layer)
        kernel = pattern_kernel(layer, weights[at])
        scores = self.scores.get(edit.layer)
        if scores is not None:
            scores = pattern_kernel(layer, np.asarray(scores))
        weights[at] = restore_kernel(layer, masked(kernel, edit.sparsity, scores))
        clone = type(layer).from_config(layer.get_config())
        error = relative_error(np.asarray(kernel, np.float64), pattern_kernel(layer, weights[at]).astype(np.float64))
        return Replacement(
            chain=[Piece(clone, weights)],
            notes={"reconstruction_error": error, "masked_weight": kernel_name(layer)},
        )


def _check_pattern(layer: Any, spec: SparsitySpec) -> None:
    if isinstance(layer, DEPTHWISE) and spec.structure in ("channel", "n:m"):
        raise PlanError(
            f"{spec.structure!r} sparsity does not apply to depthwise layer {layer.name!r}, "
            "which has one input channel per output channel: use unstructured, filter or block"
        )
    kept_count(pattern_kernel(layer).shape, spec)
