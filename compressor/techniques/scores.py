"""Importance scores of weights and filters: magnitude, SNIP, SynFlow, FPGM, Hessian.

Higher is more important (keep). Scores are float64 and >= 0. A weighted layer is a
Conv1D/2D/3D, ConvNDTranspose, DepthwiseConvND, SeparableConvND or Dense layer, named
as in `compressor.graph.calls.layer_calls` (`outer/inner` inside nested models).

- Per weight, a score is shaped like the layer's main kernel as Keras stores it
  (`kernel`, or `pointwise_kernel` of a separable convolution; see
  `compressor.techniques.base.kernel_name`).
- Per filter, one score per output channel: the last axis of the kernel in pattern
  layout (`base.pattern_kernel`): filters of a convolution, units of a Dense layer,
  channel × multiplier of a depthwise convolution, the `filters` of a transposed one.

The criteria:

- "magnitude": |w|. A filter scores its L2 norm (`norm=1`: its L1 norm, as in Li et
  al. 2017). L2 by default: it matches `sparsity.mask`, which ranks groups by their
  squared L2 norm, so the two agree on which filters are weakest.
- "snip" (Lee et al. 2019): |g ⊙ w|, g the gradient of the mean cross-entropy over
  `samples` labelled examples (the model's own argmax where the data has no labels),
  run in inference mode. The loss is taken on the logits: a final softmax is removed
  from a copy of the model, since the clipped log of a saturated probability has no
  gradient. A filter scores the sum of its weights' scores.
- "synflow" (Tanaka et al. 2020): |θ ⊙ ∂R/∂θ|, data-free; see `SynFlowNetwork` for the
  network R is computed on and why. A filter scores the sum of its weights' scores.
- "fpgm" (He et al. 2019): per filter only. Filter i scores Σ_j ||f_i − f_j||₂, the
  geometric-median objective evaluated at f_i (the paper's approximation, as in its
  code): the filters nearest the geometric median of their layer are the most
  replaceable by the others, so they score lowest.
- "hessian": K-FAC importances from `compressor.techniques.kfac` (needs data).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError, DataError
from compressor.graph.calls import layer_calls
from compressor.graph.flops import CONV, CONV_TRANSPOSE, DEPTHWISE, SEPARABLE
from compressor.io.data import Dataset, check_fits
from compressor.techniques.base import (
    kernel_index,
    kernel_name,
    kernel_of,
    pattern_kernel,
    round_half_up,
)
from compressor.techniques.score_copies import logits_copy
from compressor.techniques.synflow import SynFlowNetwork, global_top

CRITERIA = ("magnitude", "snip", "synflow", "fpgm", "hessian")
SCORED = CONV + CONV_TRANSPOSE + DEPTHWISE + SEPARABLE + (keras.layers.Dense,)
NORMS = (1, 2)


# --- public API -------------------------------------------------------------------------


def weight_scores(
    model: keras.Model,
    criterion: str,
    data: Optional[Dataset] = None,
    *,
    layers: Optional[Sequence[str]] = None,
    samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Importance of each weight of the main kernel of weighted layers.

    Args:
        model: A Functional or built Sequential model; left unchanged.
        criterion: One of `CRITERIA` except "fpgm" (which scores filters only).
        data: Examples for "snip" and "hessian"; labels from `data.y`, or the model's
            own predictions when it has none. Ignored by the other criteria.
        layers: Qualified names of the layers to score; default all weighted layers.
        samples: How many examples (drawn at random with `seed`) the gradients use.
        batch_size: Examples per forward/backward pass.
        seed: Seed of the draw of examples.

    Returns:
        Layer name → float64 scores (>= 0) shaped like its kernel, in graph order (or
        the order of `layers`).

    Raises:
        CompressorError: An unknown criterion, "fpgm", a name that is not a weighted
            layer of the model, a data criterion without data, or SynFlow overflowing.
        DataError: The data does not fit the model.
    """
    _check_criterion(criterion)
    targets = scored_layers(model, layers)
    if criterion == "magnitude":
        return {path: _magnitude(layer) for path, layer in targets.items()}
    if criterion == "fpgm":
        raise CompressorError(
            "fpgm scores whole filters, not single weights: use filter_scores(model, 'fpgm') "
            "or another criterion for weight scores"
        )
    if criterion == "snip":
        x, y = _examples(model, data, samples, seed, criterion)
        return _snip(model, targets, x, y, _positive("batch_size", batch_size))
    if criterion == "synflow":
        return SynFlowNetwork(model, targets).scores()
    return _hessian(model, data, layers, targets, samples, batch_size, seed, per_filter=False)


def filter_scores(
    model: keras.Model,
    criterion: str,
    data: Optional[Dataset] = None,
    *,
    layers: Optional[Sequence[str]] = None,
    samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    norm: int = 2,
) -> dict[str, np.ndarray]:
    """Importance of each output channel (filter) of weighted layers.

    Args:
        model: A Functional or built Sequential model; left unchanged.
        criterion: One of `CRITERIA`.
        data: Examples for "snip" and "hessian" (see `weight_scores`).
        layers: Qualified names of the layers to score; default all weighted layers.
        samples: How many examples the gradients use.
        batch_size: Examples per forward/backward pass.
        seed: Seed of the draw of examples.
        norm: For "magnitude": 2 (L2 norm of the filter) or 1 (L1 norm).

    Returns:
        Layer name → float64 scores (>= 0), shape (output_channels,).

    Raises:
        CompressorError: As `weight_scores` (but "fpgm" is valid), or an invalid norm.
        DataError: The data does not fit the model.
    """
    _check_criterion(criterion)
    if norm not in NORMS:
        raise CompressorError(f"Invalid norm. Expected one of {NORMS}. Received: norm={norm!r}")
    targets = scored_layers(model, layers)
    if criterion == "magnitude":
        return {path: _filter_norms(layer, norm) for path, layer in targets.items()}
    if criterion == "fpgm":
        return {path: fpgm_scores(filter_rows(layer)) for path, layer in targets.items()}
    if criterion == "hessian":
        return _hessian(model, data, layers, targets, samples, batch_size, seed, per_filter=True)
    per_weight = weight_scores(
        model, criterion, data, layers=list(targets), samples=samples, batch_size=batch_size, seed=seed
    )
    return {path: filter_rows(targets[path], scores).sum(axis=1) for path, scores in per_weight.items()}


def synflow_masks(
    model: keras.Model, density: float, *, layers: Optional[Sequence[str]] = None, iterations: int = 20
) -> dict[str, np.ndarray]:
    """Iterative SynFlow pruning (Tanaka et al. 2020): which weights to keep.

    Round r = 1..iterations keeps the top density**(r / iterations) of all the given
    layers' weights together (one global ranking), scored on the network with the
    previous rounds' masks applied; weights pruned once stay pruned. Re-scoring is
    what prevents layer collapse: as a layer thins, each of its surviving weights
    carries more of the flow R, so its scores rise and it keeps a share. Layers not
    in `layers` stay dense but are part of the network.

    Args:
        model: A Functional or built Sequential model; left unchanged.
        density: Fraction of the weights to keep, in (0, 1].
        layers: Qualified names of the layers to prune; default all weighted layers.
        iterations: Number of prune-and-rescore rounds, >= 1.

    Returns:
        Layer name → boolean mask shaped like its kernel; round(density × total) weights
        kept in all (halves up).

    Raises:
        CompressorError: An invalid density or iterations, a name that is not a
            weighted layer, or SynFlow overflowing float64.
    """
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise CompressorError(f"Invalid density. Expected a number in (0, 1]. Received: density={density!r}")
    _positive("iterations", iterations)
    targets = scored_layers(model, layers)
    network = SynFlowNetwork(model, targets)
    masks = {path: np.ones(kernel_of(layer).shape, dtype=bool) for path, layer in targets.items()}
    total = sum(mask.size for mask in masks.values())
    for round_ in range(1, iterations + 1):
        keep = round_half_up(density ** (round_ / iterations) * total)
        masks = global_top(network.scores(masks), masks, keep)
    return masks


def scored_layers(model: keras.Model, layers: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The weighted layers to score, by qualified name.

    Args:
        model: A Functional or built Sequential model.
        layers: Names to pick (a single name is accepted as a string); default all
            weighted layers, in graph order (a shared layer once).

    Returns:
        Name → layer, in graph order or the order of `layers`.

    Raises:
        CompressorError: A name is not a layer of the model, or names a layer without
            a kernel to score.
    """
    calls = layer_calls(model)
    available: dict[str, Any] = {}
    for call in calls:
        if isinstance(call.operation, SCORED) and kernel_name(call.operation) is not None:
            available.setdefault(call.path, call.operation)
    if layers is None:
        return available
    names = [layers] if isinstance(layers, str) else list(layers)
    paths = {call.path for call in calls}
    missing = [name for name in names if name not in paths]
    if missing:
        raise CompressorError(
            f"Invalid layers. Expected names of layers of model '{model.name}' "
            f"(weighted: {', '.join(available) or 'none'}). Received: layers={missing!r}"
        )
    unweighted = [name for name in names if name not in available]
    if unweighted:
        raise CompressorError(
            "Invalid layers. Expected convolution or Dense layers with a kernel to score. "
            f"Received: layers={unweighted!r}"
        )
    return {name: available[name] for name in names}


def filter_rows(layer: Any, values: Optional[np.ndarray] = None) -> np.ndarray:
    """A kernel (or anything shaped like it) as one row per output channel.

    Args:
        layer: A weighted layer.
        values: An array shaped like the layer's kernel; default the kernel itself.

    Returns:
        float64 array (output_channels, weights_per_filter). The output axis is moved
        first before flattening: reshaping a (..., in, out) kernel straight to
        (out, -1) would mix the weights of different filters in each row.
    """
    pattern = pattern_kernel(layer, kernel_of(layer) if values is None else np.asarray(values))
    return np.moveaxis(pattern, -1, 0).reshape(pattern.shape[-1], -1).astype(np.float64)


def fpgm_scores(filters: np.ndarray) -> np.ndarray:
    """FPGM score of each filter: the sum of its Euclidean distances to the others.

    Args:
        filters: (filters, weights_per_filter), one flattened filter per row.

    Returns:
        (filters,) float64; the lowest is the filter nearest the geometric median.
    """
    filters = np.asarray(filters, dtype=np.float64)
    squared = np.sum(filters**2, axis=1)
    # The Gram form needs one matmul instead of a (filters² × weights) difference
    # tensor; clipping removes the tiny negatives its rounding can leave.
    distances = squared[:, None] + squared[None, :] - 2.0 * filters @ filters.T
    return np.sqrt(np.clip(distances, 0.0, None)).sum(axis=1)


# --- checks and data --------------------------------------------------------------------


def _check_criterion(criterion: Any) -> None:
    if criterion not in CRITERIA:
        raise CompressorError(
            f"Invalid criterion. Expected one of {CRITERIA}. Received: criterion={criterion!r}"
        )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CompressorError(f"Invalid {name}. Expected a positive integer. Received: {name}={value!r}")
    return int(value)


def _require_data(data: Optional[Dataset], criterion: str) -> Dataset:
    if data is None:
        raise CompressorError(
            f"{criterion} needs data: pass a Dataset of examples (labels optional) "
            "or use a data-free criterion (magnitude, synflow, fpgm)"
        )
    if len(data) == 0:
        raise DataError(f"{criterion} needs at least one example; the data from {data.source} is empty")
    return data


def _examples(
    model: keras.Model, data: Optional[Dataset], samples: int, seed: int, criterion: str
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """`samples` examples drawn without replacement (all when there are fewer), in data order.

    The draw is the one `kfac.kfac_factors` makes, so the same seed picks the same examples.
    """
    data = _require_data(data, criterion)
    samples = _positive("samples", samples)
    _check_classifier(model, data, criterion)
    index = np.arange(len(data))
    if samples < len(data):
        index = np.sort(np.random.default_rng(seed).permutation(len(data))[:samples])
    return data.x[index], None if data.y is None else data.y[index]


def _check_classifier(model: keras.Model, data: Dataset, criterion: str) -> None:
    """The model maps one input like data.x to (batch, classes), with classes for data.y."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CompressorError(
            f"{criterion} needs a model with one input and one output; model '{model.name}' has "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    check_fits(data, tuple(model.inputs[0].shape[1:]))
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2:
        raise CompressorError(
            f"{criterion} needs a classifier output (batch, classes); "
            f"model '{model.name}' outputs shape {output_shape}"
        )
    if data.y is not None and data.y.size and data.y.max() >= output_shape[1]:
        raise DataError(
            f"data from {data.source} has label {int(data.y.max())}, "
            f"but the model has {output_shape[1]} classes"
        )


# --- magnitude --------------------------------------------------------------------------


def _magnitude(layer: Any) -> np.ndarray:
    return np.abs(kernel_of(layer).astype(np.float64))


def _filter_norms(layer: Any, norm: int) -> np.ndarray:
    return np.linalg.norm(filter_rows(layer), ord=norm, axis=1)


def _kernel_variable(layer: Any) -> Any:
    return layer.weights[kernel_index(layer)]


# --- SNIP -------------------------------------------------------------------------------


def _snip(
    model: keras.Model, targets: dict[str, Any], x: np.ndarray, y: Optional[np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    logits_model, copies = logits_copy(model)
    variables = [_kernel_variable(copies[id(layer)]).value for layer in targets.values()]
    totals = [np.zeros(v.shape, dtype=np.float64) for v in variables]
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        with tf.GradientTape() as tape:
            tape.watch(variables)  # also kernels of frozen (non-trainable) layers
            logits = logits_model(batch, training=False)
            labels = tf.argmax(logits, axis=-1) if y is None else y[start : start + batch_size]
            losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.reduce_sum(losses)
        for total, gradient in zip(totals, tape.gradient(loss, variables)):
            total += keras.ops.convert_to_numpy(gradient).astype(np.float64)
    return {
        path: np.abs(total / len(x) * kernel_of(layer).astype(np.float64))
        for (path, layer), total in zip(targets.items(), totals)
    }


# --- SynFlow ----------------------------------------------------------------------------


# --- Hessian ----------------------------------------------------------------------------


def _hessian(
    model: keras.Model,
    data: Optional[Dataset],
    layers: Optional[Sequence[str]],
    targets: dict[str, Any],
    samples: int,
    batch_size: int,
    seed: int,
    per_filter: bool,
) -> dict[str, np.ndarray]:
    data = _require_data(data, "hessian")
    # Imported here: this module depends on K-FAC only when the criterion is used.
    from compressor.techniques import kfac

    names = None if layers is None else list(targets)  # None: the layers K-FAC supports
    factors = kfac.kfac_factors(model, data, names, samples=samples, batch_size=batch_size, seed=seed)
    if per_filter:
        return kfac.kfac_filter_scores(model, factors)
    return kfac.kfac_weight_scores(model, factors)
