"""Hessian-based static pruning: K-FAC statistics, OBD scores and EigenDamage.

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
unit in every layer: one global threshold can compare layers (EigenDamage does).
The loss is the negative log-likelihood of the model's classifier output; a softmax
is undone to logits where the graph shows one (a fused softmax activation, a
Softmax or Activation("softmax") layer), other probability outputs are logged (with
a floor), and other outputs are taken as logits. Labels are drawn from the model's
own predictive distribution ("sampled": the true Fisher) or are the data's ("true":
the empirical Fisher).

EigenDamage (Wang et al. 2019) rotates W into the eigenbases of A = Q_A Λ_A Q_Aᵀ and
G = Q_G Λ_G Q_Gᵀ: W* = Q_Aᵀ W Q_G per tap. In that basis the K-FAC Fisher is
diagonal, so the OBD importance of W*_ij is exact under K-FAC: ½ λ_A,i λ_G,j
Σ_taps W*²_ij. Dropping input eigen-directions (rows of W*) and output ones
(columns) leaves the layer

    1×1 (Cin→R1, kernel Q_A[:, kept]) → k×k (R1→R2, W*[kept, kept], original
    strides/padding/dilation) → 1×1 (R2→Cout, Q_G[:, kept]ᵀ, original bias and activation)

the shape of Tucker-2, built by the same `lowrank.assemble_chain`. A pointwise kernel
(Dense, 1×1 Conv2D, Conv1D of size 1) has no spatial core to keep: its three
matrices are multiplied into two layers through min(R1, R2), which is always cheaper
than three (Cin·R1 + R1·R2 + R2·Cout > (Cin + Cout)·min(R1, R2)) and computes the
same function. Its cost is that of an "svd" edit of rank min(R1, R2); a k×k
kernel's is that of a "tucker" edit of ranks (R1, R2) (`hessian_cost`).

Limitations: Dense, Conv1D and Conv2D layers of exactly those classes (subclasses
may compute something else), groups 1, not quantized, each called once; shared
layers are skipped with a reason. Layers inside nested graph models are handled,
under qualified names. Models need one input and one classifier output (N, classes).
Bias terms are not part of A (the bias is kept as it is by every edit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from compressor.errors import CompressorError
from compressor.graph.calls import layer_calls
from compressor.io.data import Dataset
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec
from compressor.surgery.replacement import Replacement
from compressor.techniques.base import (
    LayerTechnique,
    Shape,
    call_shapes,
    kernel_of,
    layer_cost,
    relative_error,
    round_half_up,
)
from compressor.techniques.lowrank import RANK_FRACTIONS, assemble_chain, svd_cost, tucker_cost
from compressor.techniques.params import RANKS, Param

LABELS = ("sampled", "true")
SUPPORTED = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)
# Eigenvalues are clipped at DAMPING × the largest: far below any direction that
# matters, far above float64 round-off (~1e-16), so that directions without variance
# rank by their weights rather than by round-off noise (and never negative).
DAMPING = 1e-6
# log(p) of a probability output is taken at p >= PROBABILITY_FLOOR (no -inf).
PROBABILITY_FLOOR = 1e-30


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


@dataclass(frozen=True)
class EigenBasis:
    """The K-FAC eigenbases of one layer, directions sorted by importance, most first.

    Attributes:
        q_a: (Cin, Cin) eigenvectors of A, one per column.
        lambda_a: (Cin,) their damped eigenvalues.
        q_g: (Cout, Cout) eigenvectors of G, one per column.
        lambda_g: (Cout,) their damped eigenvalues.
        in_importance: (Cin,) OBD importance of each input direction (column of q_a).
        out_importance: (Cout,) OBD importance of each output direction (column of q_g).
    """

    q_a: np.ndarray
    lambda_a: np.ndarray
    q_g: np.ndarray
    lambda_g: np.ndarray
    in_importance: np.ndarray
    out_importance: np.ndarray

    def rotate(self, kernel: np.ndarray) -> np.ndarray:
        """W* = Q_Aᵀ W Q_G per tap of a (..., Cin, Cout) kernel (W = Q_A W* Q_Gᵀ)."""
        return np.einsum("ia,...ij,jb->...ab", self.q_a, np.asarray(kernel, np.float64), self.q_g, optimize=True)

    def importance(self, kernel: np.ndarray) -> np.ndarray:
        """(Cin, Cout) importance ½ λ_A,i λ_G,j Σ_taps W*²_ij of each rotated weight."""
        rotated = self.rotate(kernel)
        squares = (rotated**2).reshape(-1, *rotated.shape[-2:]).sum(axis=0)
        return 0.5 * self.lambda_a[:, None] * self.lambda_g[None, :] * squares


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
        reason = _reason(call.operation)
        if reason is None and count[id(call.operation)] > 1:
            reason = f"called {count[id(call.operation)]} times: shared layers are not supported"
        if reason is None:
            layers[call.path] = call.operation
        else:
            skipped[call.path] = reason
    return layers, skipped


def _reason(layer: Any) -> Optional[str]:
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
        recorder = _Recorder(targets, tape)
        output = recorder.run(model, tf.convert_to_tensor(x, dtype=model.inputs[0].dtype))
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
        inputs[path] = _channels_last(layer, recorder.inputs[path])
        out[path] = _channels_last(layer, grad)
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


class _Recorder:
    """Runs a graph model op by op, recording each target's input and pre-activation.

    A target's kernel product and bias are computed here and watched on the tape,
    then its activation is applied; other layers are called with training=False;
    nested graph models are run op by op under `outer/`. Private Keras API used
    here (keras 3.x): `Function._run_through_graph(inputs, call_fn=...)` to intercept
    every call, `Layer._call_context_args`, `Sequential._functional`.
    """

    def __init__(self, targets: Mapping[str, Any], tape: tf.GradientTape) -> None:
        self._targets = targets
        self._tape = tape
        self.inputs: dict[str, tf.Tensor] = {}
        self.preacts: dict[str, tf.Tensor] = {}
        self._logits: dict[int, tf.Tensor] = {}  # id(a softmax's output) → its input logits

    def run(self, model: Any, x: Any, prefix: str = "") -> Any:
        graph = model._functional if isinstance(model, keras.Sequential) else model
        outputs = graph._run_through_graph(x, call_fn=lambda op, *args, **kwargs: self._call(prefix, op, args, kwargs))
        return keras.tree.flatten(outputs)[0]

    def _call(self, prefix: str, op: Any, args: tuple, kwargs: dict) -> Any:
        path = prefix + op.name
        if _is_graph(op) and all(key == "training" or value is None for key, value in kwargs.items()):
            return self.run(op, args[0], f"{path}/")
        if path in self._targets:
            preact = _preactivation(op, args[0])
            self._tape.watch(preact)
            self.inputs[path], self.preacts[path] = args[0], preact
            output = op.activation(preact) if op.activation is not None else preact
            if op.activation is keras.activations.softmax:
                self._logits[id(output)] = preact
            return output
        if "training" in getattr(op, "_call_context_args", ()):
            kwargs = {**kwargs, "training": False}
        output = op(*args, **kwargs)
        if _is_softmax(op):
            self._logits[id(output)] = args[0]
        return output

    def log_probs(self, output: tf.Tensor) -> tf.Tensor:
        """Log-probabilities of the model's classifier output (module docstring)."""
        if id(output) in self._logits:
            return tf.nn.log_softmax(tf.cast(self._logits[id(output)], tf.float32))
        output = tf.cast(output, tf.float32)
        values = output.numpy()
        if values.min() >= 0 and values.max() <= 1 + 1e-6 and np.allclose(values.sum(axis=1), 1, atol=1e-3):
            return tf.math.log(tf.maximum(output, PROBABILITY_FLOOR))
        return tf.nn.log_softmax(output)


def _is_graph(op: Any) -> bool:
    from keras.src.models.functional import Functional

    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None) is not None
    return isinstance(op, Functional)


def _is_softmax(op: Any) -> bool:
    if isinstance(op, keras.layers.Softmax):
        return op.axis in (-1, [-1], (-1,))
    return isinstance(op, keras.layers.Activation) and op.activation is keras.activations.softmax


def _preactivation(layer: Any, x: Any) -> tf.Tensor:
    """What `layer(x)` computes before its fused activation (kernel product + bias)."""
    dtype = layer.compute_dtype
    x, kernel = ops.cast(x, dtype), ops.cast(layer.kernel, dtype)
    if isinstance(layer, keras.layers.Dense):
        z = ops.matmul(x, kernel)
    else:
        z = _convolve(layer, x, kernel, layer.data_format)
    if layer.use_bias:
        bias = ops.cast(layer.bias, dtype)
        if _channels_first(layer):
            bias = ops.reshape(bias, (1, -1) + (1,) * (len(z.shape) - 2))
        z = z + bias
    return z


def _convolve(layer: Any, x: Any, kernel: Any, data_format: str) -> tf.Tensor:
    """The layer's convolution of x with another kernel (as Keras' Conv1D/Conv2D.call)."""
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        pad = [[0, 0], [left, 0], [0, 0]] if data_format == "channels_last" else [[0, 0], [0, 0], [left, 0]]
        x, padding = ops.pad(x, pad), "valid"
    strides, dilation = list(layer.strides), layer.dilation_rate
    return ops.conv(x, kernel, strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)


def _channels_first(layer: Any) -> bool:
    return not isinstance(layer, keras.layers.Dense) and layer.data_format == "channels_first"


def _channels_last(layer: Any, tensor: Any) -> np.ndarray:
    values = np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float64)
    return np.moveaxis(values, 1, -1) if _channels_first(layer) else values


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
        _check_fit(name, kernel.shape, factor.a.shape[0], factor.g.shape[0])
        found.append((name, kernel, factor))
    return found


def _check_fit(name: str, kernel_shape: tuple[int, ...], c_in: int, c_out: int) -> None:
    if tuple(kernel_shape[-2:]) != (c_in, c_out):
        raise CompressorError(
            f"K-FAC statistics of {name!r} are for {c_in} input and {c_out} output channels; "
            f"its kernel has shape {tuple(kernel_shape)}"
        )


# --- EigenDamage --------------------------------------------------------------------------


def eigen_decompose(layer: Any, factors: KFactors) -> EigenBasis:
    """The layer's K-FAC eigenbases, and the importance of each eigen-direction.

    Input direction i has importance Σ_j ½ λ_A,i λ_G,j Σ_taps W*²_ij, output direction
    j Σ_i likewise (`EigenBasis.importance`). Eigenvalues are damped: clipped at
    DAMPING × the largest. Eigenvector signs are fixed (largest entry positive) so
    that the same statistics always give the same basis.

    Args:
        layer: A supported (Dense, Conv1D, Conv2D) built layer.
        factors: Its K-FAC factors.

    Returns:
        The basis, directions sorted by importance, most important first (ties keep
        descending eigenvalue order).

    Raises:
        CompressorError: The factors do not fit the layer's kernel.
    """
    kernel = kernel_of(layer).astype(np.float64)
    _check_fit(layer.name, kernel.shape, factors.a.shape[0], factors.g.shape[0])
    lambda_a, q_a = damped_eigh(factors.a)
    lambda_g, q_g = damped_eigh(factors.g)
    unsorted = EigenBasis(q_a, lambda_a, q_g, lambda_g, np.zeros(len(lambda_a)), np.zeros(len(lambda_g)))
    importance = unsorted.importance(kernel)
    in_order = np.argsort(-importance.sum(axis=1), kind="stable")
    out_order = np.argsort(-importance.sum(axis=0), kind="stable")
    return EigenBasis(
        q_a=q_a[:, in_order],
        lambda_a=lambda_a[in_order],
        q_g=q_g[:, out_order],
        lambda_g=lambda_g[out_order],
        in_importance=importance.sum(axis=1)[in_order],
        out_importance=importance.sum(axis=0)[out_order],
    )


def damped_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at DAMPING × the largest) and eigenvectors of a PSD matrix."""
    symmetric = np.asarray(matrix, np.float64)
    values, vectors = np.linalg.eigh((symmetric + symmetric.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    values = np.maximum(values, DAMPING * max(float(values[0]), 0.0))
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return values, vectors * np.where(signs == 0, 1.0, signs)


def eigendamage_allocate(
    model: keras.Model, bases: Mapping[str, EigenBasis], fraction: float, *, max_per_layer: float = 0.9
) -> dict[str, tuple[int, int]]:
    """Kept ranks after dropping the least important eigen-directions of all layers.

    The budget counts directions: round(fraction × all input and output directions
    of all layers) are dropped, least important first under one global threshold
    (importances are comparable across layers: module docstring). A side (input or
    output) of a layer never loses more than floor(max_per_layer × its directions)
    and always keeps one; when the caps bind, fewer are dropped.

    Args:
        model: The model the bases belong to (their names are checked against it).
        bases: Qualified layer name → its basis (`eigen_decompose`).
        fraction: Fraction of directions to drop, in [0, 1).
        max_per_layer: Largest fraction of one side's directions to drop, in (0, 1].

    Returns:
        Qualified layer name → kept ranks (R1, R2): keep the first R1 input and R2
        output directions of its basis.

    Raises:
        CompressorError: Invalid fraction or max_per_layer, or a name that is not a
            layer of the model.
    """
    if not 0.0 <= fraction < 1.0:
        raise CompressorError(
            f"Invalid fraction of eigen-directions to drop. Expected 0 <= fraction < 1. Received: fraction={fraction}"
        )
    if not 0.0 < max_per_layer <= 1.0:
        raise CompressorError(
            f"Invalid max_per_layer. Expected 0 < max_per_layer <= 1. Received: max_per_layer={max_per_layer}"
        )
    unknown = sorted(set(bases) - {call.path for call in layer_calls(model)})
    if unknown:
        raise CompressorError(f"eigenbases name layers that are not in model {model.name!r}: {', '.join(unknown)}")
    # One "side" per layer and direction kind: (name, 0) its inputs, (name, 1) its outputs.
    sides = {}
    for name, basis in bases.items():
        sides[(name, 0)], sides[(name, 1)] = basis.in_importance, basis.out_importance
    caps = {key: min(math.floor(max_per_layer * len(imp)), len(imp) - 1) for key, imp in sides.items()}
    candidates = sorted((float(value), key) for key, imp in sides.items() for value in imp)
    target, dropped = round_half_up(fraction * len(candidates)), dict.fromkeys(sides, 0)
    for _, key in candidates:  # least important first: one threshold for all layers
        if sum(dropped.values()) >= target:
            break
        if dropped[key] < caps[key]:
            dropped[key] += 1
    return {name: tuple(len(sides[(name, s)]) - dropped[(name, s)] for s in (0, 1)) for name in bases}


# --- the technique ------------------------------------------------------------------------

KFAC_SAMPLES = 512  # examples the K-FAC statistics of a run are gathered on (at most)


def hessian_cost(
    layer: Any, edit: LayerEdit, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
) -> tuple[int, int]:
    """Params and FLOPs (batch 1) of a "hessian" edit's layers.

    A k×k kernel costs as a "tucker" edit of the same ranks (the same three layers);
    a pointwise kernel as an "svd" edit of rank min(R1, R2) (module docstring).
    """
    input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
    ranks = edit.params["ranks"]
    if _spatial(tuple(layer.kernel.shape)):
        return tucker_cost(layer, ranks, None, input_shape, output_shape)
    return svd_cost(layer, min(ranks), None, input_shape, output_shape)


def _spatial(kernel_shape: tuple[int, ...]) -> bool:
    return math.prod(kernel_shape[:-2]) > 1


class Hessian(LayerTechnique):
    """EigenDamage: keep a layer's most important K-FAC eigen-directions (the Technique protocol).

    Args:
        bases: Qualified layer name → its basis (`eigen_decompose`); default none
            (a plain instance costs edits but applies to no layer). A layer is found
            by its qualified name (an edit's `layer`), else by its own name when
            exactly one basis ends with it.
    """

    name = "hessian"
    params = (Param("ranks", RANKS),)
    no_option_reason = "factorizing cannot lower its cost"

    def __init__(self, bases: Optional[Mapping[str, EigenBasis]] = None) -> None:
        self._bases = dict(bases or {})

    @classmethod
    def needs_data(cls, criterion: str) -> Optional[str]:
        return "K-FAC statistics"

    @classmethod
    def prepare(
        cls, model: Any, data: Dataset, *, criterion: str, seed: int, log: Callable[[str], None]
    ) -> tuple["Hessian", dict[str, Any]]:
        """The eigenbases of every editable layer's K-FAC factors, from at most KFAC_SAMPLES examples (sampled labels)."""
        from compressor.surgery.editable import editable_layers

        log("gathering K-FAC statistics")
        factors = kfac_factors(model, data, seed=seed, samples=KFAC_SAMPLES)
        layers = editable_layers(model)
        bases = {name: eigen_decompose(layers[name], factor) for name, factor in factors.items() if name in layers}
        return cls(bases), {"kfac_samples": min(KFAC_SAMPLES, len(data)), "labels": "sampled"}

    def applies(self, layer: Any) -> Optional[str]:
        """None for Dense, Conv1D and Conv2D layers (groups 1, not quantized), whatever their statistics."""
        if not isinstance(layer, SUPPORTED):
            return f"hessian applies to Dense, Conv1D and Conv2D layers, not {type(layer).__name__}"
        return _reason(layer)

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        """None if the layer has a basis and some edit of it lowers its cost, else a reason a user can read."""
        reason = self._why_not(layer)
        if reason is None and not self.options(layer, None, input_shape, output_shape):
            return self.no_option_reason
        return reason

    def options(
        self,
        layer: Any,
        residual: Optional[SparsitySpec] = None,
        input_shape: Optional[Shape] = None,
        output_shape: Optional[Shape] = None,
    ) -> list[LayerEdit]:
        """Ranks at RANK_FRACTIONS of each side (≥ 1), from light to heavy compression.

        Only edits with fewer params AND fewer FLOPs than the layer are returned,
        sorted by params then FLOPs, descending; none for a layer without a basis.

        Raises:
            PlanError: A residual was asked for (hessian edits have none).
        """
        if residual is not None:
            raise PlanError(f"hessian edits have no sparse residual; {layer.name!r} was asked for one")
        if self._why_not(layer) is not None:
            return []
        input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
        params, flops = layer_cost(layer, input_shape, output_shape)
        c_in, c_out = tuple(layer.kernel.shape)[-2:]
        name = self._name(layer)
        found: dict[tuple[int, int], tuple[tuple[int, int], LayerEdit]] = {}
        for fraction in RANK_FRACTIONS:
            ranks = (max(1, round(fraction * c_in)), max(1, round(fraction * c_out)))
            edit = LayerEdit(name, self.name, ranks=ranks)
            cost = hessian_cost(layer, edit, input_shape, output_shape)
            if cost[0] < params and cost[1] < flops:
                found.setdefault(ranks, (cost, edit))
        return [edit for _, edit in sorted(found.values(), key=lambda item: item[0], reverse=True)]

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        return hessian_cost(layer, edit, input_shape, output_shape)

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        """The layers that keep the first (R1, R2) eigen-directions of the layer's basis.

        The layer's current kernel is rotated, so the chain composes to
        Q_A[:, :R1] W*[:R1, :R2] Q_G[:, :R2]ᵀ (exactly W at full ranks).

        Raises:
            PlanError: The edit is not a "hessian" edit, the layer is not supported
                or has no basis, or the ranks exceed its channels.
        """
        if edit.technique != self.name:
            raise PlanError(f"the hessian technique builds hessian edits without residual; received {edit.to_dict()}")
        reason = self._why_not(layer, edit.layer)
        if reason is not None:
            raise PlanError(f"cannot apply hessian to {edit.layer!r}: {reason}")
        basis = self._basis(layer, edit.layer)
        kernel = kernel_of(layer).astype(np.float64)
        (r1, r2), (c_in, c_out) = edit.params["ranks"], kernel.shape[-2:]
        if r1 > c_in or r2 > c_out:
            raise PlanError(
                f"hessian ranks of {edit.layer!r} must be at most its channels (in={c_in}, out={c_out}). "
                f"Received: ranks={(r1, r2)}"
            )
        core = basis.rotate(kernel)[..., :r1, :r2]
        q_in, q_out = basis.q_a[:, :r1], basis.q_g[:, :r2]
        approx = np.einsum("ia,...ab,jb->...ij", q_in, core, q_out, optimize=True)
        importance = basis.importance(kernel)
        notes = {
            "reconstruction_error": relative_error(kernel, approx),
            "dropped_importance": float(importance.sum() - importance[:r1, :r2].sum()),
            "residual_weights": 0,
        }
        return assemble_chain(layer, _chain(kernel.shape, q_in, core, q_out), None, notes)

    def _why_not(self, layer: Any, name: Optional[str] = None) -> Optional[str]:
        reason = self.applies(layer)
        if reason is not None:
            return reason
        basis = self._basis(layer, name)
        if basis is None:
            return "no K-FAC statistics for this layer"
        c_in, c_out = tuple(layer.kernel.shape)[-2:]
        if (len(basis.lambda_a), len(basis.lambda_g)) != (c_in, c_out):
            basis_channels = f"{len(basis.lambda_a)}→{len(basis.lambda_g)}"
            return f"its K-FAC basis is for {basis_channels} channels, the layer has {c_in}→{c_out}"
        return None

    def _basis(self, layer: Any, name: Optional[str] = None) -> Optional[EigenBasis]:
        return self._bases.get(name if name in self._bases else self._name(layer))

    def _name(self, layer: Any) -> str:
        if layer.name in self._bases:
            return layer.name
        matches = [key for key in self._bases if key.rsplit("/", 1)[-1] == layer.name]
        return matches[0] if len(matches) == 1 else layer.name


def _chain(
    kernel_shape: tuple[int, ...], q_in: np.ndarray, core: np.ndarray, q_out: np.ndarray
) -> list[tuple[str, np.ndarray, bool]]:
    """The (name suffix, kernel, spatial) triples `assemble_chain` takes, as `Tucker._kernels` gives them."""
    taps, (c_in, c_out) = kernel_shape[:-2], kernel_shape[-2:]
    if _spatial(kernel_shape):
        pointwise = (1,) * len(taps)
        return [
            ("hessian_in", q_in.reshape(*pointwise, *q_in.shape), False),
            ("hessian_core", core, True),
            ("hessian_out", q_out.T.reshape(*pointwise, *q_out.T.shape), False),
        ]
    matrix = core.reshape(core.shape[-2:])
    # Two layers through the smaller rank: fold the core into the wider side.
    first, second = (q_in, matrix @ q_out.T) if q_in.shape[1] <= q_out.shape[1] else (q_in @ matrix, q_out.T)
    return [
        ("hessian_in", first.reshape(*taps, c_in, first.shape[1]), True),
        ("hessian_out", second.reshape(*taps, second.shape[0], c_out), False),
    ]
