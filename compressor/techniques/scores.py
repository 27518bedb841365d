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
- "synflow" (Tanaka et al. 2020): |θ ⊙ ∂R/∂θ|, data-free; see `_SynFlowNet` for the
  network R is computed on and why. A filter scores the sum of its weights' scores.
- "fpgm" (He et al. 2019): per filter only. Filter i scores Σ_j ||f_i − f_j||₂, the
  geometric-median objective evaluated at f_i (the paper's approximation, as in its
  code): the filters nearest the geometric median of their layer are the most
  replaceable by the others, so they score lowest.
- "hessian": K-FAC importances from `compressor.techniques.hessian` (needs data).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError, DataError, ModelLoadError, first_line
from compressor.graph.calls import layer_calls
from compressor.graph.flops import ACTIVATION, CONV, CONV_TRANSPOSE, DEPTHWISE, SEPARABLE
from compressor.io.data import Dataset, check_fits
from compressor.techniques.base import (
    NOMINAL_SIZE,
    kernel_index,
    kernel_name,
    kernel_of,
    pattern_kernel,
    round_half_up,
)

CRITERIA = ("magnitude", "snip", "synflow", "fpgm", "hessian")
SCORED = CONV + CONV_TRANSPOSE + DEPTHWISE + SEPARABLE + (keras.layers.Dense,)
NORMS = (1, 2)
# SynFlow weights that shift rather than scale (set to 0) and statistics kept as they are.
SHIFTS = ("bias", "beta", "moving_mean", "mean")
KEPT_STATISTICS = ("moving_variance", "variance", "count")


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
        return _SynFlowNet(model, targets).scores()
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
    network = _SynFlowNet(model, targets)
    masks = {path: np.ones(kernel_of(layer).shape, dtype=bool) for path, layer in targets.items()}
    total = sum(mask.size for mask in masks.values())
    for round_ in range(1, iterations + 1):
        keep = round_half_up(density ** (round_ / iterations) * total)
        masks = _global_top(network.scores(masks), masks, keep)
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

    The draw is the one `hessian.kfac_factors` makes, so the same seed picks the same examples.
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


# --- copies of the model ----------------------------------------------------------------


def _copy_graph(
    model: keras.Model, copy_layer: Callable[[Any], Any], dtype: Optional[str]
) -> tuple[keras.Model, dict[int, Any]]:
    """A clone of `model` built from `copy_layer(layer)` for each layer (weights unset).

    Nested graph models are cloned the same way (their inputs get `dtype` too, which
    `clone_model(recursive=True)` would not give them).

    Returns:
        (clone, copies): copies maps id(original layer) → its copy.
    """
    copies: dict[int, Any] = {}

    def clone(graph: keras.Model) -> keras.Model:
        def clone_function(operation: Any) -> Any:
            if id(operation) not in copies:
                nested = isinstance(operation, keras.Model)
                copies[id(operation)] = clone(operation) if nested else copy_layer(operation)
            return copies[id(operation)]

        def fresh(tensor: Any) -> Any:
            return keras.Input(batch_shape=tensor.shape, dtype=dtype or tensor.dtype, name=tensor.name)

        # A Sequential model takes one input tensor; a Functional one its own structure.
        structure = graph.inputs[0] if isinstance(graph, keras.Sequential) else graph.input
        inputs = keras.tree.map_structure(fresh, structure)
        return keras.models.clone_model(graph, input_tensors=inputs, clone_function=clone_function)

    return clone(model), copies


def _copy_layer(layer: Any, dtype: Optional[str] = None, linear: bool = False) -> Any:
    """A fresh copy from config, optionally in another dtype and without its activation.

    keras.ops operations in the graph (`x * 0.5`) have no dtype: they compute in their
    inputs' dtype.
    """
    try:
        config = layer.get_config()
        if dtype is not None and isinstance(layer, keras.layers.Layer):
            config["dtype"] = dtype
        if linear and isinstance(layer, ACTIVATION):
            return keras.layers.Identity(name=layer.name, dtype=config.get("dtype"))
        if linear and "activation" in config:
            config["activation"] = "linear"
        return layer.__class__.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise ModelLoadError(
            f"cannot copy layer '{layer.name}' ({type(layer).__name__}) from its config to score it: "
            f"{first_line(exc)}"
        ) from exc


def _set_weights(
    model: keras.Model, copies: dict[int, Any], transform: Callable[[str, np.ndarray], np.ndarray]
) -> None:
    """Give each copy its original's weights, passed through transform(name, value)."""
    originals = {id(layer): layer for layer in _all_layers(model)}
    for key, copy in copies.items():
        original = originals.get(key)
        if original is None or isinstance(copy, keras.Model) or type(copy) is not type(original):
            continue  # nested models hold their layers; an Identity stands in for an activation
        values = [
            transform(weight.name, keras.ops.convert_to_numpy(weight)).astype(target.dtype)
            for weight, target in zip(original.weights, copy.weights)
        ]
        copy.set_weights(values)


def _all_layers(model: keras.Model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def _softmax_outputs(model: keras.Model) -> set[int]:
    """ids of the layers whose softmax produces the model's outputs (nested models followed).

    Private Keras API (keras 3.x): `KerasTensor._keras_history`.
    """
    found: set[int] = set()
    for tensor in model.outputs:
        operation = tensor._keras_history.operation
        if isinstance(operation, keras.Model):
            found |= _softmax_outputs(operation)
        elif _applies_softmax(operation):
            found.add(id(operation))
    return found


def _applies_softmax(layer: Any) -> bool:
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = layer.get_config().get("activation") if hasattr(layer, "get_config") else None
    return activation == "softmax" or getattr(activation, "__name__", None) == "softmax"


def _kernel_variable(layer: Any) -> Any:
    return layer.weights[kernel_index(layer)]


# --- SNIP -------------------------------------------------------------------------------


def _snip(
    model: keras.Model, targets: dict[str, Any], x: np.ndarray, y: Optional[np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    softmax = _softmax_outputs(model)
    logits_model, copies = _copy_graph(
        model, lambda layer: _copy_layer(layer, linear=id(layer) in softmax), dtype=None
    )
    _set_weights(model, copies, lambda name, value: value)
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


class _SynFlowNet:
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
        self._network, copies = _copy_graph(
            model, lambda layer: _copy_layer(layer, "float64", linear=True), dtype="float64"
        )
        _set_weights(model, copies, _synflow_weight)
        self._variables = {path: _kernel_variable(copies[id(layer)]) for path, layer in targets.items()}
        self._magnitudes = {path: _magnitude(layer) for path, layer in targets.items()}
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


def _global_top(
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
    from compressor.techniques import hessian

    names = None if layers is None else list(targets)  # None: the layers K-FAC supports
    factors = hessian.kfac_factors(model, data, names, samples=samples, batch_size=batch_size, seed=seed)
    if per_filter:
        return hessian.kfac_filter_scores(model, factors)
    return hessian.kfac_weight_scores(model, factors)
