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

from typing import Any, Callable, Mapping, Optional

import keras
import numpy as np

from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, SEPARABLE
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec
from compressor.surgery.replacement import Piece, Replacement
from compressor.techniques.base import (
    LayerTechnique,
    Shape,
    call_shapes,
    kept_count,
    kernel_index,
    kernel_name,
    layer_cost,
    masked_cost,
    pattern_kernel,
    relative_error,
    restore_kernel,
)
from compressor.techniques.params import PATTERN, Param

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


class Sparsity(LayerTechnique):
    """Masks a layer's kernel and keeps the layer: same class, config, name and bias.

    Applies to ConvND, ConvNDTranspose, DepthwiseConvND, SeparableConvND and Dense.
    A separable convolution gets its pointwise kernel masked and its depthwise kernel
    left dense: the pointwise part holds most of its weights and FLOPs, and each
    depthwise filter is the only path for its channel. A depthwise kernel is masked
    per output channel: "filter" drops whole output channels; "channel" and "n:m"
    (which need several input channels per output) do not apply to it.

    With a low-rank technique it is the hybrid's residual (`provides_residual`):
    layers that technique edits get a sparse residual, the others a mask.

    Args:
        scores: Qualified layer name → importance of each weight of its masked kernel,
            shaped as Keras stores it (`compressor.techniques.scores.weight_scores`);
            layers without scores are ranked by |w|².
    """

    name = "sparsity"
    params = (Param("sparsity", PATTERN),)
    uses_pattern = True
    provides_residual = True

    def __init__(self, scores: Optional[Mapping[str, np.ndarray]] = None) -> None:
        self.scores = dict(scores or {})

    def applies(self, layer: Any) -> Optional[str]:
        if kernel_name(layer) is None:
            return "has no kernel to mask"
        if getattr(layer, "quantization_mode", None):
            return f"already quantized ({layer.quantization_mode})"
        if not isinstance(layer, SUPPORTED):
            return f"sparsity applies to convolution and Dense layers, not {type(layer).__name__}"
        return None

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        """None if it applies (whether a mask lowers the cost depends on the pattern: `options`)."""
        return self.applies(layer)

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
        check_pattern(layer, template)
        input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
        params, flops = layer_cost(layer, input_shape, output_shape)
        densities = (template.n / template.m,) if template.structure == "n:m" else DENSITIES
        edits, seen = [], set()
        for density in densities:
            spec = SparsitySpec(density, template.structure, template.block_size, template.n, template.m)
            edit = LayerEdit(layer.name, self.name, sparsity=spec)
            kept = kept_count(pattern_kernel(layer).shape, spec)
            cost = self.cost(layer, edit, input_shape, output_shape)
            if kept and kept not in seen and cost[0] < params and cost[1] < flops:
                seen.add(kept)
                edits.append(edit)
        return edits

    def candidates(
        self, layer: Any, pattern: Optional[SparsitySpec], hybrid: bool, input_shape: Shape, output_shape: Shape
    ) -> list[LayerEdit]:
        """Its masks in the user's pattern."""
        return self.options(layer, pattern, input_shape, output_shape)

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        """The layer's cost less the weights the mask drops (`masked_cost`).

        Raises:
            PlanError: The pattern does not fit the kernel.
        """
        return masked_cost(layer, kept_count(pattern_kernel(layer).shape, edit.params["sparsity"]), input_shape, output_shape)

    def sparse(self, edit: LayerEdit) -> bool:
        return True

    def gradual_target(self, edit: LayerEdit, criterion: str) -> Optional[SparsitySpec]:
        """A mask by magnitude is pruned gradually while fine-tuning (tfmot's polynomial schedule),
        which recovers more than fine-tuning a one-shot mask; a mask by another criterion's scores
        stays fixed (the scores were taken on the dense weights)."""
        return edit.sparsity if criterion == "magnitude" else None

    @classmethod
    def needs_data(cls, criterion: str) -> Optional[str]:
        """Masks ranked by a criterion other than magnitude need its scores, gathered on data."""
        return None if criterion == "magnitude" else f"{criterion} scores"

    @classmethod
    def prepare(
        cls, model: Any, data: Any, *, criterion: str, seed: int, log: Callable[[str], None]
    ) -> tuple["Sparsity", dict[str, Any]]:
        """Masks ranked by `criterion`'s scores of each weight (`compressor.techniques.scores.weight_scores`)."""
        from compressor.techniques.scores import weight_scores

        log(f"scoring weights ({criterion})")
        return cls(weight_scores(model, criterion, data, seed=seed)), {"criterion": criterion}

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        """A clone of the layer (same config and name) holding the masked kernel.

        Raises:
            PlanError: The edit is not a sparsity edit, or its pattern does not fit.
        """
        self.check_edit(layer, edit)
        spec = edit.params["sparsity"]
        check_pattern(layer, spec)
        weights = layer.get_weights()
        at = kernel_index(layer)
        kernel = pattern_kernel(layer, weights[at])
        scores = self.scores.get(edit.layer)
        if scores is not None:
            scores = pattern_kernel(layer, np.asarray(scores))
        weights[at] = restore_kernel(layer, masked(kernel, spec, scores))
        clone = type(layer).from_config(layer.get_config())
        error = relative_error(np.asarray(kernel, np.float64), pattern_kernel(layer, weights[at]).astype(np.float64))
        return Replacement(
            chain=[Piece(clone, weights)],
            notes={"reconstruction_error": error, "masked_weight": kernel_name(layer)},
        )


def check_pattern(layer: Any, spec: SparsitySpec) -> None:
    """Refuse a sparsity pattern that does not fit the layer's kernel.

    Raises:
        PlanError: "channel" or "n:m" on a depthwise kernel, or a pattern whose block
            size or m does not divide the kernel's channels.
    """
    if isinstance(layer, DEPTHWISE) and spec.structure in ("channel", "n:m"):
        raise PlanError(
            f"{spec.structure!r} sparsity does not apply to depthwise layer {layer.name!r}, "
            "which has one input channel per output channel: use unstructured, filter or block"
        )
    kept_count(pattern_kernel(layer).shape, spec)
