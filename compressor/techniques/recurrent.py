"""Truncated SVD of a recurrent layer's input and recurrent kernels (the "svd" technique's recurrent part).

An LSTM, GRU or SimpleRNN layer with u units and G gates holds an input kernel W
(Cin, G·u) and a recurrent kernel U (u, G·u). An edit of rank r replaces each by its
best rank-r factors (`lowrank.truncated_svd`) when that is smaller than the matrix
((rows + G·u)·r < rows·G·u), and keeps it whole otherwise; the layer becomes a
`keras.layers.RNN` of the matching `compressor.layers.recurrent` cell with the same
settings, bias and activations. Ranks are RANK_FRACTIONS of u.

Its error is that of the two kernels together, ||[W; U] − [Ŵ; Û]||_F / ||[W; U]||_F:
the search (and the evaluator, `searched_kernel`/`assign_searched_kernel`) sees the
layer's two kernels stacked as one (Cin + u, G·u) matrix.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import keras
import numpy as np

from compressor.graph.flops import Shape, layer_flops
from compressor.layers.recurrent import GATES, LowRankGRUCell, LowRankLSTMCell, LowRankSimpleRNNCell
from compressor.surgery.plan import LayerEdit
from compressor.surgery.replacement import Piece, Replacement

RECURRENT = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
LOW_RANK_CELLS = {"LSTMCell": LowRankLSTMCell, "GRUCell": LowRankGRUCell, "SimpleRNNCell": LowRankSimpleRNNCell}
# The RNN layer's own settings the new layer keeps (its cell's come from the cell's config).
RNN_SETTINGS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")


def is_recurrent(layer: Any) -> bool:
    """Whether `layer` is a Keras LSTM, GRU or SimpleRNN layer (what this module factorizes)."""
    return isinstance(layer, RECURRENT)


def recurrent_reason(layer: Any) -> Optional[str]:
    """None if the recurrent layer's kernels can be factorized, else why not."""
    if isinstance(layer, keras.layers.GRU) and not layer.cell.reset_after:
        return "a GRU with reset_after=False: only the default reset_after=True is factorized"
    return None


def kernels(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W, U): the input (Cin, G·u) and recurrent (u, G·u) kernels."""
    cell = layer.cell
    return keras.ops.convert_to_numpy(cell.kernel), keras.ops.convert_to_numpy(cell.recurrent_kernel)


def factored_rank(rows: int, cols: int, rank: int) -> Optional[int]:
    """`rank` when a rows×cols matrix's rank-`rank` factors are smaller than it; None: keep it whole."""
    return rank if (rows + cols) * rank < rows * cols else None


def ranks(layer: Any, fractions: Sequence[float]) -> list[int]:
    """Ranks at `fractions` of the layer's units (at least 1), distinct, in order."""
    return list(dict.fromkeys(max(1, int(round(f * layer.cell.units))) for f in fractions))


def recurrent_cost(layer: Any, rank: int, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
    """(params, FLOPs) at batch 1 of the layer with both kernels through `rank` where that is smaller.

    FLOPs follow `compressor.graph.flops` (per time step): only the two matrix
    products change, from rows·G·u to r·(rows + G·u) multiply-accumulates each.
    """
    params, flops = int(layer.count_params()), layer_flops(layer, [input_shape], [output_shape])
    steps = input_shape[1]
    for rows, cols in _kernel_shapes(layer):
        kept = factored_rank(rows, cols, rank)
        if kept is not None:
            saved = rows * cols - (rows + cols) * kept
            params -= saved
            flops -= 2 * steps * saved
    return params, flops


def build_recurrent(layer: Any, rank: int, truncated_svd: Any) -> Replacement:
    """A `keras.layers.RNN` of a low-rank cell with the layer's settings and the factors of rank `rank`.

    Args:
        layer: An LSTM, GRU or SimpleRNN layer.
        rank: The edit's rank.
        truncated_svd: (matrix, rank) -> (left, right) factors.
    """
    cell = layer.cell
    dtype = keras.ops.convert_to_numpy(cell.kernel).dtype
    weights, found = [], {}
    for kind, matrix in zip(("input", "recurrent"), kernels(layer)):
        kept = factored_rank(*matrix.shape, rank)
        found[f"{kind}_rank"] = kept
        weights += [matrix] if kept is None else list(truncated_svd(matrix, kept))
    if cell.use_bias:
        weights.append(keras.ops.convert_to_numpy(cell.bias))
    config = {**cell.get_config(), **found, "name": f"{cell.name}_svd"}
    new_cell = LOW_RANK_CELLS[type(cell).__name__].from_config(config)
    settings = layer.get_config()
    new = keras.layers.RNN(
        new_cell, name=f"{layer.name}_svd", dtype=settings.get("dtype"), trainable=layer.trainable,
        **{key: settings[key] for key in RNN_SETTINGS if key in settings},
    )  # fmt: skip
    pieces = [np.asarray(w, dtype=dtype) for w in weights]
    approx = composed(layer, pieces)
    original = searched_kernel(layer).astype(np.float64)
    notes = {"reconstruction_error": _relative(original, approx), "residual_weights": 0, **found}
    return Replacement(chain=[Piece(new, pieces)], notes=notes)


def composed(layer: Any, weights: Sequence[np.ndarray]) -> np.ndarray:
    """[Ŵ; Û] from a low-rank cell's weights (whole kernels or factor pairs, then the bias)."""
    (w_rows, cols), (u_rows, _) = _kernel_shapes(layer)
    found, position = [], 0
    for rows in (w_rows, u_rows):
        first = np.asarray(weights[position], dtype=np.float64)
        if first.shape == (rows, cols):
            found.append(first)
            position += 1
        else:
            found.append(first @ np.asarray(weights[position + 1], dtype=np.float64))
            position += 2
    return np.concatenate(found, axis=0)


def searched_kernel(layer: Any) -> np.ndarray:
    """The layer's kernels as the search sees them: [W; U] stacked, (Cin + u, G·u)."""
    return np.concatenate(kernels(layer), axis=0)


def assign_searched_kernel(layer: Any, stacked: np.ndarray) -> None:
    """Set W and U from a stacked [W; U] (what `searched_kernel` gives)."""
    rows = layer.cell.kernel.shape[0]
    layer.cell.kernel.assign(stacked[:rows])
    layer.cell.recurrent_kernel.assign(stacked[rows:])


def recurrent_errors(layer: Any, edit_ranks: Sequence[int]) -> list[float]:
    """||[W; U] − [Ŵ; Û]||_F / ||[W; U]||_F per rank, from the singular values of W and U."""
    spectra = [np.linalg.svd(m.astype(np.float64), compute_uv=False) for m in kernels(layer)]
    total = sum(float(np.sum(s**2)) for s in spectra)
    errors = []
    for rank in edit_ranks:
        dropped = 0.0
        for s, (rows, cols) in zip(spectra, _kernel_shapes(layer)):
            kept = factored_rank(rows, cols, rank)
            dropped += 0.0 if kept is None else float(np.sum(s[kept:] ** 2))
        errors.append(math.sqrt(dropped / total) if total else 0.0)
    return errors


def _kernel_shapes(layer: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    cell = layer.cell
    cols = GATES[type(cell).__name__] * cell.units
    return (int(cell.kernel.shape[0]), cols), (cell.units, cols)


def _relative(kernel: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(kernel))
    diff = float(np.linalg.norm(kernel - approx))
    return diff / norm if norm else diff
