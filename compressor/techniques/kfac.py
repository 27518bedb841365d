"""K-FAC statistics: per-layer Kronecker factors of the Fisher, gathered in one pass over data.

K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) models
the Fisher block of a layer with kernel W (taps, Cin, Cout) as A ⊗ G:

- A (Cin, Cin) = E[a aᵀ] of the layer's input channels. For a convolution it is
  averaged over examples, output positions AND kernel taps: every (position, tap)
  pair reads one input vector (zero where it reads padding), so A is the average of
  the diagonal (tap, tap) blocks of KFC's patch covariance. Position q of the input
  is weighted by how many (position, tap) pairs read it (`_tap_counts`).
- G (Cout, Cout) = E_n[Σ_p g_p g_pᵀ], g_p = ∂ℓ_n/∂z_p the gradient of one example's
  loss with respect to the layer's pre-activation output (before its fused
  activation) at output position p: averaged over examples, SUMMED over positions.

With these scales the Fisher diagonal of a weight is ≈ A_ii · G_jj for every layer
kind (a Dense layer has one position and one tap), so ½ · A_ii · G_jj · W²_ij
estimates the increase of the mean loss when that weight is removed, in the same
unit in every layer: one global threshold can compare layers (EigenDamage does,
`compressor.techniques.hessian`; the OBD scores below do per weight and per filter).
The loss is the negative log-likelihood of the model's classifier output; whether
that output is probabilities or logits is `compressor.graph.outputs`' answer: a
softmax is undone to logits where the graph shows one, other probability outputs are
logged (with a floor), and other outputs are taken as logits. Labels are drawn from
the model's own predictive distribution ("sampled": the true Fisher) or are the
data's ("true": the empirical Fisher). The pass itself runs the model op by op
(`compressor.techniques.kfac_recorder`).

Limitations: Dense, Conv1D and Conv2D layers of exactly those classes (subclasses
may compute something else), groups 1, not quantized, each called once; shared
layers are skipped with a reason. Layers inside nested graph models are handled,
under qualified names. Models need one input and one classifier output (N, classes).
Bias terms are not part of A (the bias is kept as it is by every edit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError
from compressor.graph.calls import layer_calls
from compressor.io.data import Dataset
from compressor.techniques.base import kernel_of
from compressor.techniques.kfac_recorder import PreactivationRecorder, channels_last

LABELS = ("sampled", "true")
SUPPORTED = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)


@dataclass(frozen=True)
class KFactors:
    """The K-FAC factors of one layer (module docstring for their scaling).

    Attributes:
        a: (Cin, Cin) input-channel second moment E[a aᵀ], averaged over
            positions and taps.
        g: (Cout, Cout) pre-activation output-gradient second moment, summed over
            positions.
        samples: How many examples they were estimated from.
    """

    a: np.ndarray
    g: np.ndarray
    samples: int


# --- which layers -----------------------------------------------------------------------


def kfac_layers(model: keras.Model) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers K-FAC statistics can be gathered for, and why the others cannot.

    Args:
        model: A Functional model or a built Sequential model.

    Returns:
        (qualified name → layer, qualified name → reason), over the model's Dense,
        Conv1D and Conv2D layers (and subclasses of them), in topological order.

    Raises:
        ModelLoadError: The model has no layer graph.
    """
    calls = [call for call in layer_calls(model) if isinstance(call.operation, SUPPORTED)]
    count: dict[int, int] = {}
    for call in calls:
        count[id(call.operation)] = count.get(id(call.operation), 0) + 1
    layers, skipped = {}, {}
    for call in calls:
        reason = unsupported_reason(call.operation)
        if reason is None and count[id(call.operation)] > 1:
            reason = f"called {count[id(call.operation)]} times: shared layers are not supported"
        if reason is None:
            layers[call.path] = call.operation
        else:
            skipped[call.path] = reason
    return layers, skipped


def unsupported_reason(layer: Any) -> Optional[str]:
    """Why K-FAC statistics cannot be gathered for a Dense/Conv1D/Conv2D layer; None if they can."""
    if type(layer) not in SUPPORTED:
        return f"{type(layer).__name__} is not Dense, Conv1D or Conv2D itself (its call may differ)"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    if getattr(layer, "quantization_mode", None):
        return f"already quantized ({layer.quantization_mode})"
    return None


# --- the statistics pass ----------------------------------------------------------------


def kfac_factors(
    model: keras.Model,
    data: Dataset,
    layers: Optional[Sequence[str]] = None,
    *,
    labels: str = "sampled",
    samples: int = 512,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, KFactors]:
    """K-FAC factors of a model's layers, from one pass over data.

    Args:
        model: A classifier: Functional or built Sequential, one input, one
            (N, classes) output. Its BatchNormalization and Dropout layers run in
            inference mode.
        data: Inputs (and labels for labels="true").
        layers: Qualified names of the layers; default: all of `kfac_layers(model)`.
        labels: "sampled": labels drawn from the model's predictive distribution
            (the true Fisher; seeded); "true": `data.y` (the empirical Fisher).
        samples: At most this many examples: all of them when there are no more,
            else a seeded random subset.
        batch_size: Examples per forward/backward pass.
        seed: Seeds the subset and the sampled labels.

    Returns:
        Qualified layer name → its factors.

    Raises:
        CompressorError: Invalid options, "true" labels without labels in the
            data, a layer name that is not in the model or not supported, or a
            model that is not a single-input classifier.
    """
    _validate_options(labels, samples, batch_size, data)
    targets = _targets(model, layers)
    if not targets:
        return {}
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(data.x))[:samples]) if len(data.x) > samples else np.arange(len(data.x))
    sums = {path: _Sums(layer) for path, layer in targets.items()}
    for start in range(0, len(chosen), batch_size):
        index = chosen[start : start + batch_size]
        true = data.y[index] if labels == "true" else None
        inputs, grads = _batch_pass(model, targets, data.x[index], true, rng)
        for path in targets:
            sums[path].add(inputs[path], grads[path])
    return {path: total.factors(len(chosen)) for path, total in sums.items()}


def _validate_options(labels: str, samples: int, batch_size: int, data: Dataset) -> None:
    if labels not in LABELS:
        raise CompressorError(f"Invalid K-FAC labels. Expected one of {LABELS}. Received: labels={labels!r}")
    if labels == "true" and data.y is None:
        raise CompressorError(f"K-FAC with labels='true' needs labels (y) in the data; {data.source} has none")
    if samples < 1 or batch_size < 1:
        raise CompressorError(
            f"K-FAC needs samples >= 1 and batch_size >= 1. Received: samples={samples}, batch_size={batch_size}"
        )
    if len(data.x) == 0:
        raise CompressorError(f"K-FAC needs data; {data.source} has no samples")


def _targets(model: keras.Model, names: Optional[Sequence[str]]) -> dict[str, Any]:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CompressorError(
            f"K-FAC needs a model with one input and one output. Received: {len(model.inputs)} "
            f"inputs, {len(model.outputs)} outputs"
        )
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2 or shape[1] is None or shape[1] < 2:
        raise CompressorError(f"K-FAC needs a classifier output (N, classes >= 2). Received: output shape {shape}")
    supported, skipped = kfac_layers(model)
    if names is None:
        return supported
    for name in names:
        if name in skipped:
            raise CompressorError(f"cannot gather K-FAC statistics for layer {name!r}: {skipped[name]}")
        if name not in supported:
            raise CompressorError(f"no Dense, Conv1D or Conv2D layer named {name!r} in model {model.name!r}")
    return {name: supported[name] for name in names}


def _batch_pass(
    model: keras.Model, targets: Mapping[str, Any], x: np.ndarray, true: Optional[np.ndarray], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each target's input and the gradients of Σ_n ℓ_n at its pre-activation output.

    The loss is summed over the batch, so each example's slice of the gradient is
    that example's own gradient (inference mode: examples do not interact).
    Only the pre-activations are watched: a tape that also watched the variables it
    reads would run the backward pass on past them, into kernels and the layers before
    the first target (e.g. a filter gradient of the model's 1-channel input), gradients
    nobody reads, through native kernels that need not run.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        recorder = PreactivationRecorder(model, targets, tape)
        output = recorder.run(tf.convert_to_tensor(x, dtype=model.inputs[0].dtype))
        log_probs = recorder.log_probs(output)
        y = _sampled_labels(log_probs.numpy(), rng) if true is None else _checked_labels(true, log_probs.shape[-1])
        loss = -tf.reduce_sum(tf.gather(log_probs, tf.constant(y), batch_dims=1))
    paths = list(targets)
    missing = [path for path in paths if path not in recorder.preacts]
    if missing:  # e.g. inside a nested model called with a mask
        raise CompressorError(f"K-FAC could not follow the calls of layers {', '.join(missing)}; leave them out")
    grads = tape.gradient(loss, [recorder.preacts[path] for path in paths])
    inputs, out = {}, {}
    for path, grad in zip(paths, grads):
        layer, preact = targets[path], recorder.preacts[path]
        grad = tf.zeros_like(preact) if grad is None else grad  # the output does not depend on it
        inputs[path] = channels_last(layer, recorder.inputs[path])
        out[path] = channels_last(layer, grad)
    return inputs, out


def _sampled_labels(log_probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    probs = np.exp(log_probs.astype(np.float64))
    cumulative = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    draws = rng.random(len(probs))[:, None]
    return np.minimum((cumulative < draws).sum(axis=1), probs.shape[1] - 1)


def _checked_labels(y: np.ndarray, classes: int) -> np.ndarray:
    if y.size and y.max() >= classes:
        raise CompressorError(
            f"labels must be class indices below {classes} (the model's outputs). Received: max label {y.max()}"
        )
    return y.astype(np.int64)


def _tap_counts(layer: Any, spatial: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """How many (output position, tap) pairs read each input position; and their total.

    Counted with integers in numpy from the layer's padding, strides and dilation:
    exact, and no convolution runs (a TensorFlow gradient of an all-ones convolution
    counts the same, in float32, through native kernels that are not needed here).
    A convolution's reads are separable, so the count is the outer product of the
    per-axis counts. The total includes pairs that read padding.

    Args:
        layer: A Conv1D or Conv2D layer.
        spatial: The spatial shape of its input (channels_last order, no channels).

    Returns:
        (counts shaped like `spatial`, float64; pairs per example).
    """
    counts, pairs = np.ones(()), 1
    for size, kernel, stride, dilation in zip(spatial, layer.kernel_size, layer.strides, layer.dilation_rate):
        axis_counts, axis_pairs = _axis_tap_counts(layer.padding, size, kernel, stride, dilation)
        counts, pairs = np.multiply.outer(counts, axis_counts), pairs * axis_pairs
    return counts, pairs


def _axis_tap_counts(padding: str, size: int, kernel: int, stride: int, dilation: int) -> tuple[np.ndarray, int]:
    """`_tap_counts` along one axis, with Keras' (TensorFlow's) padding rules."""
    span = (kernel - 1) * dilation + 1
    if padding == "same":
        outputs = -(-size // stride)
        before = max((outputs - 1) * stride + span - size, 0) // 2  # the odd pad goes after
    elif padding == "causal":
        before = span - 1
        outputs = (size + before - span) // stride + 1
    else:
        before, outputs = 0, (size - span) // stride + 1
    outputs = max(outputs, 0)
    reads = (np.arange(outputs)[:, None] * stride + np.arange(kernel)[None, :] * dilation - before).ravel()
    inside = reads[(reads >= 0) & (reads < size)]
    return np.bincount(inside, minlength=size).astype(np.float64), outputs * kernel


class _Sums:
    """Running sums of one layer's a aᵀ (tap-weighted) and g gᵀ over examples."""

    def __init__(self, layer: Any) -> None:
        self._layer = layer
        self._weights: Optional[np.ndarray] = None
        self._pairs = 0  # (position, tap) pairs per example: the divisor of A
        self._a = 0.0
        self._g = 0.0

    def add(self, a: np.ndarray, g: np.ndarray) -> None:
        if self._weights is None:
            self._weights, self._pairs = self._positions(a.shape[1:-1])
        rows = a.reshape(len(a), -1, a.shape[-1])
        weighted = (rows * self._weights[None, :, None]).reshape(-1, a.shape[-1])
        self._a = self._a + weighted.T @ rows.reshape(-1, a.shape[-1])
        grads = g.reshape(-1, g.shape[-1])
        self._g = self._g + grads.T @ grads

    def factors(self, samples: int) -> KFactors:
        return KFactors(a=self._a / (samples * self._pairs), g=self._g / samples, samples=samples)

    def _positions(self, spatial: tuple[int, ...]) -> tuple[np.ndarray, int]:
        if isinstance(self._layer, keras.layers.Dense):  # each position (if any) read once
            return np.ones(math.prod(spatial)), math.prod(spatial)
        counts, pairs = _tap_counts(self._layer, tuple(spatial))
        return counts.reshape(-1), pairs


# --- OBD scores with the K-FAC diagonal -------------------------------------------------


def kfac_weight_scores(model: keras.Model, factors: Mapping[str, KFactors]) -> dict[str, np.ndarray]:
    """OBD saliency ½ · A_ii · G_jj · W²_tij of every kernel weight.

    Args:
        model: The model the factors were gathered on.
        factors: From `kfac_factors`.

    Returns:
        Qualified layer name → scores shaped like its kernel (the estimated increase
        of the mean loss when that one weight is zeroed).

    Raises:
        CompressorError: A name is not a layer of the model, or its factors do not
            fit its kernel.
    """
    scores = {}
    for name, kernel, factor in _kernels_with_factors(model, factors):
        scores[name] = 0.5 * np.diag(factor.a)[:, None] * np.diag(factor.g)[None, :] * kernel**2
    return scores


def kfac_filter_scores(model: keras.Model, factors: Mapping[str, KFactors]) -> dict[str, np.ndarray]:
    """OBD saliency of removing each output channel: ½ · G_jj · Σ_taps w_jᵀ A w_j.

    Args:
        model: The model the factors were gathered on.
        factors: From `kfac_factors`.

    Returns:
        Qualified layer name → (Cout,) scores.

    Raises:
        CompressorError: A name is not a layer of the model, or its factors do not
            fit its kernel.
    """
    scores = {}
    for name, kernel, factor in _kernels_with_factors(model, factors):
        quadratic = np.einsum("...ij,ik,...kj->j", kernel, factor.a, kernel, optimize=True)
        scores[name] = 0.5 * np.diag(factor.g) * quadratic
    return scores


def _kernels_with_factors(
    model: keras.Model, factors: Mapping[str, KFactors]
) -> list[tuple[str, np.ndarray, KFactors]]:
    """(name, kernel in float64, factors) of each layer named in `factors`."""
    layers = {call.path: call.operation for call in layer_calls(model)}
    found = []
    for name, factor in factors.items():
        if name not in layers:
            raise CompressorError(f"K-FAC factors name layer {name!r}, which is not in model {model.name!r}")
        kernel = kernel_of(layers[name]).astype(np.float64)
        check_fit(name, kernel.shape, factor.a.shape[0], factor.g.shape[0])
        found.append((name, kernel, factor))
    return found


def check_fit(name: str, kernel_shape: tuple[int, ...], c_in: int, c_out: int) -> None:
    """Raise unless a (..., c_in, c_out) kernel is what factors of c_in and c_out channels fit."""
    if tuple(kernel_shape[-2:]) != (c_in, c_out):
        raise CompressorError(
            f"K-FAC statistics of {name!r} are for {c_in} input and {c_out} output channels; "
            f"its kernel has shape {tuple(kernel_shape)}"
        )
