"""Hessian-based static pruning: EigenDamage on K-FAC statistics.

The statistics, K-FAC factors A (input channels) and G (pre-activation output
gradients) per layer, come from `compressor.techniques.kfac`, which explains their
scaling: ½ · A_ii · G_jj · W²_ij estimates the increase of the mean loss when a weight
is removed, in one unit for every layer.

EigenDamage (Wang et al. 2019) rotates W into the eigenbases of A = Q_A Λ_A Q_Aᵀ and
G = Q_G Λ_G Q_Gᵀ: W* = Q_Aᵀ W Q_G per tap. In that basis the K-FAC Fisher is
diagonal, so the OBD importance of W*_ij is exact under K-FAC: ½ λ_A,i λ_G,j
Σ_taps W*²_ij. Dropping input eigen-directions (rows of W*) and output ones
(columns) leaves the layer

    1×1 (Cin→R1, kernel Q_A[:, kept]) → k×k (R1→R2, W*[kept, kept], original
    strides/padding/dilation) → 1×1 (R2→Cout, Q_G[:, kept]ᵀ, original bias and activation)

the shape of Tucker-2, built by the same `chains.assemble_chain`. A pointwise kernel
(Dense, 1×1 Conv2D, Conv1D of size 1) has no spatial core to keep: its three
matrices are multiplied into two layers through min(R1, R2), which is always cheaper
than three (Cin·R1 + R1·R2 + R2·Cout > (Cin + Cout)·min(R1, R2)) and computes the
same function. Its cost is that of an "svd" edit of rank min(R1, R2); a k×k
kernel's is that of a "tucker" edit of ranks (R1, R2) (`hessian_cost`).

Limitations: those of the statistics (`compressor.techniques.kfac`): Dense, Conv1D
and Conv2D layers of exactly those classes, groups 1, not quantized, each called once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import keras
import numpy as np

from compressor.errors import CompressorError
from compressor.graph.calls import layer_calls
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
from compressor.techniques.kfac import SUPPORTED, KFactors, check_fit, kfac_factors, unsupported_reason
from compressor.techniques.chains import assemble_chain
from compressor.techniques.lowrank import RANK_FRACTIONS, svd_cost, tucker_cost
from compressor.techniques.params import RANKS, Param

if TYPE_CHECKING:
    from compressor.io.data import Dataset

# Eigenvalues are clipped at DAMPING × the largest: far below any direction that
# matters, far above float64 round-off (~1e-16), so that directions without variance
# rank by their weights rather than by round-off noise (and never negative).
DAMPING = 1e-6


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
    check_fit(layer.name, kernel.shape, factors.a.shape[0], factors.g.shape[0])
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
        return unsupported_reason(layer)

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        """None if the layer has a basis and some edit of it lowers its cost, else a reason a user can read."""
        return self._why_not(layer) or super().check(layer, input_shape, output_shape)

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
