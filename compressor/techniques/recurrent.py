"""Truncated SVD of a recurrent layer's input and recurrent kernels (the "svd" technique's recurrent part).

An LSTM, GRU or SimpleRNN layer with u units and G gates holds an input kernel W
(Cin, G·u) and a recurrent kernel U (u, G·u). An edit of rank r replaces each by its
best rank-r factors (`lowrank.truncated_svd`) when that is smaller than the matrix
((rows + G·u)·r < rows·G·u), and keeps it whole otherwise; the layer becomes a
`keras.layers.RNN` of the matching `compressor.layers.recurrent` cell with the same
settings, bias and activations. Ranks are RANK_FRACTIONS of u.

A `keras.layers.Bidirectional` of such layers (forward and backward of one kind and
width) is edited as one layer with one rank: each direction becomes such an RNN, in
a new Bidirectional with the same merge mode and settings.

Its error is that of the two kernels together, ||[W; U] − [Ŵ; Û]||_F / ||[W; U]||_F:
the search (and the evaluator, `searched_kernel`/`assign_searched_kernel`) sees the
layer's two kernels stacked as one (Cin + u, G·u) matrix; a Bidirectional's are the
forward and backward stacks side by side, (Cin + u, 2·G·u), so its error is over all
four kernels.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import keras
import numpy as np

from compressor.graph.cost import recurrent_sides
from compressor.graph.flops import Shape, layer_flops
from compressor.layers.recurrent import GATES, LowRankGRUCell, LowRankLSTMCell, LowRankSimpleRNNCell
from compressor.surgery.replacement import Piece, Replacement

LOW_RANK_CELLS = {"LSTMCell": LowRankLSTMCell, "GRUCell": LowRankGRUCell, "SimpleRNNCell": LowRankSimpleRNNCell}
# The RNN layer's own settings the new layer keeps (its cell's come from the cell's config).
RNN_SETTINGS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")


def is_recurrent(layer: Any) -> bool:
    """Whether `layer` is a Keras LSTM, GRU or SimpleRNN layer or a Bidirectional of them (what this module edits)."""
    return bool(recurrent_sides(layer))


def recurrent_reason(layer: Any) -> Optional[str]:
    """None if the recurrent layer's kernels can be factorized, else why not."""
    sides = recurrent_sides(layer)
    if any(isinstance(side, keras.layers.GRU) and not side.cell.reset_after for side in sides):
        return "a GRU with reset_after=False: only the default reset_after=True is factorized"
    if len({(type(side.cell), side.cell.units) for side in sides}) > 1:
        return "its forward and backward layers differ in kind or units: one rank cannot serve both"
    return None


def units(layer: Any) -> int:
    """The recurrent layer's units (a Bidirectional's per direction)."""
    return recurrent_sides(layer)[0].cell.units


def kernels(layer: Any) -> tuple[np.ndarray, ...]:
    """(W, U) per direction: the input (Cin, G·u) and recurrent (u, G·u) kernels."""
    found: tuple[np.ndarray, ...] = ()
    for side in recurrent_sides(layer):
        cell = side.cell
        found += (keras.ops.convert_to_numpy(cell.kernel), keras.ops.convert_to_numpy(cell.recurrent_kernel))
    return found


def factored_rank(rows: int, cols: int, rank: int) -> Optional[int]:
    """`rank` when a rows×cols matrix's rank-`rank` factors are smaller than it; None: keep it whole."""
    return rank if (rows + cols) * rank < rows * cols else None


def ranks(layer: Any, fractions: Sequence[float]) -> list[int]:
    """Ranks at `fractions` of the layer's units (at least 1), distinct, in order."""
    return list(dict.fromkeys(max(1, int(round(f * units(layer)))) for f in fractions))


def recurrent_cost(layer: Any, rank: int, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
    """(params, FLOPs) at batch 1 of the layer with its kernels through `rank` where that is smaller.

    FLOPs follow `compressor.graph.flops` (per time step and direction): only the
    matrix products change, from rows·G·u to r·(rows + G·u) multiply-accumulates each.
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

    A Bidirectional becomes a Bidirectional of two such RNNs (forward, then backward
    with go_backwards) with the original's merge mode, dtype, trainability and name + "_svd".

    Args:
        layer: An LSTM, GRU or SimpleRNN layer, or a Bidirectional of them.
        rank: The edit's rank.
        truncated_svd: (matrix, rank) -> (left, right) factors.
    """
    built = [_low_rank_rnn(side, rank, truncated_svd) for side in recurrent_sides(layer)]
    pieces = [weight for _, weights, _ in built for weight in weights]
    found = built[0][2]  # both directions have the same kernel shapes (`recurrent_reason`)
    if isinstance(layer, keras.layers.Bidirectional):
        settings = layer.get_config()
        new = keras.layers.Bidirectional(
            built[0][0], backward_layer=built[1][0], merge_mode=layer.merge_mode, name=f"{layer.name}_svd",
            dtype=settings.get("dtype"), trainable=layer.trainable,
        )  # fmt: skip
    else:
        new = built[0][0]
    approx = composed(layer, pieces)
    original = searched_kernel(layer).astype(np.float64)
    notes = {"reconstruction_error": _relative(original, approx), "residual_weights": 0, **found}
    return Replacement(chain=[Piece(new, pieces)], notes=notes)


def composed(layer: Any, weights: Sequence[np.ndarray]) -> np.ndarray:
    """What a low-rank replacement's weights amount to, shaped like `searched_kernel`.

    The weights are each direction's in turn: whole kernels or factor pairs, then the bias.
    """
    found, position = [], 0
    for side in recurrent_sides(layer):
        stacked, position = _composed_side(side, weights, position)
        found.append(stacked)
    return np.concatenate(found, axis=1)


def searched_kernel(layer: Any) -> np.ndarray:
    """The layer's kernels as the search sees them: [W; U] stacked, (Cin + u, G·u); a Bidirectional's side by side."""
    found = kernels(layer)
    return np.concatenate([np.concatenate(found[i : i + 2], axis=0) for i in range(0, len(found), 2)], axis=1)


def assign_searched_kernel(layer: Any, stacked: np.ndarray) -> None:
    """Set each direction's W and U from what `searched_kernel` gives."""
    start = 0
    for side in recurrent_sides(layer):
        cell = side.cell
        rows, cols = cell.kernel.shape[0], GATES[_cell_kind(cell)] * cell.units
        cell.kernel.assign(stacked[:rows, start : start + cols])
        cell.recurrent_kernel.assign(stacked[rows:, start : start + cols])
        start += cols


def recurrent_errors(layer: Any, edit_ranks: Sequence[int]) -> list[float]:
    """||K − K̂||_F / ||K||_F per rank (K: `searched_kernel`), from the singular values of each W and U."""
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


def _low_rank_rnn(side: Any, rank: int, truncated_svd: Any) -> tuple[Any, list[np.ndarray], dict]:
    """(RNN of a low-rank cell with `side`'s settings, its weights, its {input,recurrent}_rank) for one layer."""
    cell = side.cell
    dtype = keras.ops.convert_to_numpy(cell.kernel).dtype
    weights, found = [], {}
    for kind, matrix in zip(("input", "recurrent"), kernels(side)):
        kept = factored_rank(*matrix.shape, rank)
        found[f"{kind}_rank"] = kept
        weights += [matrix] if kept is None else list(truncated_svd(matrix, kept))
    if cell.use_bias:
        weights.append(keras.ops.convert_to_numpy(cell.bias))
    config = {**cell.get_config(), **found, "name": f"{cell.name}_svd"}
    new_cell = LOW_RANK_CELLS[_cell_kind(cell)].from_config(config)
    settings = side.get_config()
    new = keras.layers.RNN(
        new_cell, name=f"{side.name}_svd", dtype=settings.get("dtype"), trainable=side.trainable,
        **{key: settings[key] for key in RNN_SETTINGS if key in settings},
    )  # fmt: skip
    return new, [np.asarray(w, dtype=dtype) for w in weights], found


def _composed_side(side: Any, weights: Sequence[np.ndarray], position: int) -> tuple[np.ndarray, int]:
    """[Ŵ; Û] of one direction from its weights at `position`, and the position after its bias."""
    (w_rows, cols), (u_rows, _) = _kernel_shapes(side)
    found = []
    for rows in (w_rows, u_rows):
        first = np.asarray(weights[position], dtype=np.float64)
        if first.shape == (rows, cols):
            found.append(first)
            position += 1
        else:
            found.append(first @ np.asarray(weights[position + 1], dtype=np.float64))
            position += 2
    return np.concatenate(found, axis=0), position + (1 if side.cell.use_bias else 0)


def _kernel_shapes(layer: Any) -> list[tuple[int, int]]:
    """(rows, cols) of W then U, per direction."""
    found = []
    for side in recurrent_sides(layer):
        cell = side.cell
        cols = GATES[_cell_kind(cell)] * cell.units
        found += [(int(cell.kernel.shape[0]), cols), (cell.units, cols)]
    return found


def _cell_kind(cell: Any) -> str:
    return type(cell).__name__


def _relative(kernel: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(kernel))
    diff = float(np.linalg.norm(kernel - approx))
    return diff / norm if norm else diff
