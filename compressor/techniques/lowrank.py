"""Low-rank factorizations of a layer's kernel, optionally plus a sparse residual.

- Tucker-2 ("tucker") of a k×k Conv2D kernel W (kh, kw, Cin, Cout) over its channel
  modes: W ≈ G ×₃ U_in ×₄ U_out, run as 1×1 (Cin→R1, kernel U_in) → k×k (R1→R2,
  kernel G, the original strides/dilation/padding) → 1×1 (R2→Cout, kernel U_outᵀ,
  the original bias and activation). The 1×1 layers have no bias, so zero padding
  in the middle layer commutes with the first and the three compose exactly to the
  Tucker approximation.
- Truncated SVD ("svd") of a 1×1 Conv2D, Conv1D or Dense kernel seen as a
  (taps × Cin, Cout) matrix: W ≈ (U√Σ)(√Σ Vᵀ), run as the original layer narrowed to
  r outputs without bias, then a pointwise layer r→Cout with the bias and activation.
  A separable convolution's pointwise kernel likewise: the separable layer narrowed to
  r outputs (its depthwise kernel unchanged), then a 1×1 convolution r→Cout
  (`compressor.techniques.chains`).
- Hybrid: W ≈ L + S, L low-rank and S sparse in a `SparsitySpec` pattern, found by
  alternating L = lowrank(W − S) and S = the pattern's best part of W − L (robust-PCA
  style). S runs in a parallel branch: a layer configured like the original (kernel
  size, strides, padding, dilation) holding S, without bias. The chain's last layer
  keeps the bias, and the activation moves after the sum.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
from tensorly.decomposition import partial_tucker

from compressor.graph.flops import SEPARABLE
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec
from compressor.surgery.replacement import Replacement
from compressor.techniques.base import (
    LayerTechnique,
    Shape,
    activation_name,
    call_shapes,
    kept_count,
    kernel_index,
    kernel_name,
    kernel_of,
    layer_cost,
    relative_error,
)
from compressor.techniques import recurrent
from compressor.techniques.chains import assemble_chain
from compressor.techniques.params import PATTERN, RANK, RANKS, Param
from compressor.techniques.rank_errors import one_blas_thread, svd_errors, tucker2_errors
from compressor.techniques.sparsity import masked

ATTENTION_REASON = (
    "its query, key, value and output projections are EinsumDense layers inside the attention layer, "
    "which are not factorized; the Dense layers around it are"
)
RANK_FRACTIONS = (3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4, 1 / 8, 1 / 16)
RESIDUAL_DENSITIES = (0.1, 0.05, 0.02, 0.01)
HYBRID_ITERATIONS = 5
Factors = tuple[np.ndarray, ...]


# --- the math ---------------------------------------------------------------------------


def tucker2(kernel: np.ndarray, ranks: tuple[int, int]) -> Factors:
    """Tucker-2 of a (kh, kw, Cin, Cout) kernel over its channel modes.

    Deterministic: HOOI from an SVD initialization (tensorly `partial_tucker`).

    Args:
        kernel: The kernel.
        ranks: (R1, R2), at most (Cin, Cout).

    Returns:
        (core (kh, kw, R1, R2), u_in (Cin, R1), u_out (Cout, R2)), with
        `compose_tucker2` of them the approximation.
    """
    (core, (u_in, u_out)), _ = partial_tucker(
        np.asarray(kernel, dtype=np.float64), rank=list(ranks), modes=[2, 3], init="svd", random_state=0
    )
    return np.asarray(core), np.asarray(u_in), np.asarray(u_out)


def compose_tucker2(core: np.ndarray, u_in: np.ndarray, u_out: np.ndarray) -> np.ndarray:
    """The (kh, kw, Cin, Cout) kernel the Tucker-2 factors amount to."""
    return np.einsum("hwab,ia,ob->hwio", core, u_in, u_out, optimize=True)


def truncated_svd(matrix: np.ndarray, rank: int) -> Factors:
    """The best rank-`rank` factors (left (rows, r), right (r, cols)) of a matrix.

    The singular values are split as √Σ on both sides, so both factors have the
    same scale.
    """
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def low_rank_plus_sparse(
    kernel: np.ndarray,
    fit: Callable[[np.ndarray], Factors],
    compose: Callable[[Factors], np.ndarray],
    spec: SparsitySpec,
    iterations: int = HYBRID_ITERATIONS,
) -> tuple[Factors, np.ndarray]:
    """W ≈ L + S by alternating L = fit(W − S) and S = masked(W − L, spec).

    Args:
        kernel: W, in pattern layout (..., in, out).
        fit: Low-rank factors of a kernel.
        compose: The kernel that factors amount to.
        spec: Pattern and density of S.
        iterations: At most this many alternations; stops when the error stops falling.

    Returns:
        (factors of L, S), the pair with the least ||W − L − S||_F found; S keeps
        exactly `kept_count(kernel.shape, spec)` weights.
    """
    sparse = np.zeros_like(kernel)
    best: Optional[tuple[Factors, np.ndarray, float]] = None
    for _ in range(iterations):
        factors = fit(kernel - sparse)
        error = kernel - compose(factors)
        sparse = masked(error, spec)
        remaining = float(np.linalg.norm(error - sparse))
        if best is not None and remaining >= best[2] * (1 - 1e-6):
            break
        best = (factors, sparse, remaining)
    return best[0], best[1]


# --- costs -------------------------------------------------------------------------------


def tucker_cost(
    layer: Any, ranks: tuple[int, int], residual: Optional[SparsitySpec], input_shape: Shape, output_shape: Shape
) -> tuple[int, int]:
    """(params, FLOPs) at batch 1 of 1×1 (Cin→R1) → k×k (R1→R2) → 1×1 (R2→Cout), plus a residual.

    Shapes are a call's, fully known (`call_shapes`); FLOPs as in `edit_cost`.
    """
    kernel_shape = tuple(layer.kernel.shape)
    c_in, c_out = kernel_shape[-2:]
    r1, r2 = ranks
    taps = math.prod(kernel_shape[:-2])
    in_positions = math.prod(input_shape[1:]) // c_in
    out_positions = math.prod(output_shape[1:]) // c_out
    params = c_in * r1 + taps * r1 * r2 + r2 * c_out
    flops = 2 * (in_positions * c_in * r1 + out_positions * (taps * r1 * r2 + r2 * c_out))
    return _with_bias_and_residual(layer, params, flops, residual, output_shape)


def svd_cost(
    layer: Any, rank: int, residual: Optional[SparsitySpec], input_shape: Shape, output_shape: Shape
) -> tuple[int, int]:
    """(params, FLOPs) at batch 1 of the kernel as a (taps × Cin, Cout) matrix through `rank`, plus a residual.

    A separable convolution keeps its depthwise part as it is; its pointwise kernel is the matrix.
    """
    kernel_shape = main_kernel_shape(layer)
    rows, c_out = math.prod(kernel_shape[:-1]), kernel_shape[-1]
    out_positions = math.prod(output_shape[1:]) // c_out
    params = (rows + c_out) * rank
    flops = 2 * out_positions * (rows + c_out) * rank
    if isinstance(layer, SEPARABLE):
        taps = math.prod(layer.depthwise_kernel.shape)
        params += taps
        flops += 2 * out_positions * taps
    return _with_bias_and_residual(layer, params, flops, residual, output_shape)


def main_kernel_shape(layer: Any) -> tuple[int, ...]:
    """Shape of the kernel a technique works on (`kernel_name`: a separable one's pointwise kernel)."""
    return tuple(int(d) for d in layer.weights[kernel_index(layer)].shape)


def _with_bias_and_residual(
    layer: Any, params: int, flops: int, residual: Optional[SparsitySpec], output_shape: Shape
) -> tuple[int, int]:
    kernel_shape = main_kernel_shape(layer)
    c_out = kernel_shape[-1]
    out_size = math.prod(output_shape[1:])
    params += c_out if layer.use_bias else 0
    flops += out_size * (int(layer.use_bias) + int(activation_name(layer) is not None))
    kept = kept_count(kernel_shape, residual) if residual is not None else 0
    if kept:
        params += kept
        flops += 2 * (out_size // c_out) * kept + out_size  # the branch, and the Add joining it
    return params, flops


# --- the techniques ---------------------------------------------------------------------


class LowRank(LayerTechnique):
    """What Tucker-2 and SVD share: the option grid, hybrid residuals, and assembling layers."""

    takes_residual = True
    no_option_reason = "factorizing cannot lower its cost"

    def options(
        self,
        layer: Any,
        residual: Optional[SparsitySpec] = None,
        input_shape: Optional[Shape] = None,
        output_shape: Optional[Shape] = None,
    ) -> list[LayerEdit]:
        """Ranks at RANK_FRACTIONS of full rank (≥ 1), from light to heavy compression.

        With a `residual` template, each rank is paired with residual densities
        RESIDUAL_DENSITIES (or n/m for "n:m"). Only edits with fewer params AND fewer
        FLOPs than the layer are returned, sorted by params then FLOPs, descending;
        residuals that would keep no weight are left out.
        A layer the technique does not apply to gets none.

        Raises:
            PlanError: The residual pattern does not fit the layer's kernel.
        """
        if self.applies(layer) is not None or (residual is not None and _no_residual(layer)):
            return []  # a residual beside a separable convolution would run its depthwise part twice
        input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
        params, flops = layer_cost(layer, input_shape, output_shape)
        if residual is None:
            residuals: tuple[Optional[SparsitySpec], ...] = (None,)
        else:
            densities = (residual.n / residual.m,) if residual.structure == "n:m" else RESIDUAL_DENSITIES
            residuals = tuple(
                SparsitySpec(d, residual.structure, residual.block_size, residual.n, residual.m) for d in densities
            )
            kept_count(main_kernel_shape(layer), residuals[0])  # raises if the pattern does not fit
        found: dict[tuple, tuple[tuple[int, int], LayerEdit]] = {}
        for rank in self._layer_ranks(layer):
            for spec in residuals:
                edit = LayerEdit(layer.name, self.name, {self.params[0].name: rank, "residual": spec})
                kept = kept_count(main_kernel_shape(layer), spec) if spec else 0
                if spec is not None and not kept:
                    continue  # an empty residual: the plain low-rank edit
                cost = self.cost(layer, edit, input_shape, output_shape)
                if cost[0] < params and cost[1] < flops:
                    found.setdefault((rank, kept), (cost, edit))
        return [edit for _, edit in sorted(found.values(), key=lambda item: item[0], reverse=True)]

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        """The chain (and residual branch) of `edit`, with weights that compose to Ŵ.

        Raises:
            PlanError: The edit is not of this technique, the technique does not
                apply to the layer, its ranks exceed the kernel's, or its residual
                pattern does not fit.
        """
        self.check_edit(layer, edit)
        reason = self.applies(layer)
        if reason is not None:
            raise PlanError(f"cannot apply {self.name} to {layer.name!r}: {reason}")
        kernel = kernel_of(layer)
        self._validate_rank(layer.name, kernel.shape, edit)
        fit, compose = self._fit(kernel.shape, edit)
        wide = kernel.astype(np.float64)
        residual = edit.params.get("residual")
        if residual is not None and _no_residual(layer):
            raise PlanError(f"{self.name} edits of separable convolution {layer.name!r} take no residual")
        sparse = None
        with one_blas_thread():  # small problems: threads only spin on busy cores (`rank_errors`)
            if residual is not None and kept_count(kernel.shape, residual):
                factors, sparse = low_rank_plus_sparse(wide, fit, compose, residual)
            else:
                factors = fit(wide)
            approx = compose(factors) + (0 if sparse is None else sparse)
        notes = {
            "reconstruction_error": relative_error(wide, approx),
            "residual_weights": 0 if sparse is None else kept_count(kernel.shape, residual),
        }
        return assemble_chain(layer, self._kernels(kernel.shape, factors), sparse, notes)

    def sparse(self, edit: LayerEdit) -> bool:
        return edit.params.get("residual") is not None

    def kernel_errors(self, layer: Any, edits: Sequence[LayerEdit]) -> list[Optional[float]]:
        """Errors of the plain (residual-free) edits from one factorization (`rank_errors`); hybrids: None."""
        plain = [i for i, edit in enumerate(edits) if edit.technique == self.name and edit.params.get("residual") is None]
        found: list[Optional[float]] = [None] * len(edits)
        if plain and self.applies(layer) is None:
            kernel = kernel_of(layer)
            for i in plain:
                self._validate_rank(layer.name, kernel.shape, edits[i])
            errors = self._rank_errors(kernel, [edits[i].params[self.params[0].name] for i in plain])
            for i, error in zip(plain, errors):
                found[i] = error
        return found

    # Subclass hooks.
    def _layer_ranks(self, layer: Any) -> list:
        return self._ranks(main_kernel_shape(layer))

    def _rank_errors(self, kernel: np.ndarray, ranks: list) -> list[float]:
        raise NotImplementedError

    def _ranks(self, kernel_shape: tuple[int, ...]) -> list:
        raise NotImplementedError

    def _validate_rank(self, layer_name: str, kernel_shape: tuple[int, ...], edit: LayerEdit) -> None:
        raise NotImplementedError

    def _fit(self, kernel_shape: tuple[int, ...], edit: LayerEdit) -> tuple[Callable, Callable]:
        raise NotImplementedError

    def _kernels(self, kernel_shape: tuple[int, ...], factors: Factors) -> list[tuple[str, np.ndarray, bool]]:
        """The chain as (name suffix, kernel, spatial) triples; spatial: keeps the original's strides etc."""
        raise NotImplementedError


class Tucker(LowRank):
    """Tucker-2 of k×k Conv2D kernels (groups 1) into 1×1 → k×k → 1×1."""

    name = "tucker"
    params = (Param("ranks", RANKS), Param("residual", PATTERN, required=False))

    def applies(self, layer: Any) -> Optional[str]:
        reason = _common_reason(layer)
        if reason:
            return reason
        if isinstance(layer, keras.layers.Conv2D):
            if math.prod(layer.kernel_size) == 1:
                return "kernel is 1x1: use svd"
            return _grouped_reason(layer)
        factorized_by_svd = (keras.layers.Conv1D, keras.layers.Dense, keras.layers.MultiHeadAttention) + SEPARABLE
        if isinstance(layer, factorized_by_svd) or recurrent.is_recurrent(layer):
            return f"tucker factorizes kxk Conv2D kernels: use svd for {type(layer).__name__}"
        return f"tucker applies to Conv2D layers, not {type(layer).__name__}"

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        return tucker_cost(layer, edit.params["ranks"], edit.params.get("residual"), input_shape, output_shape)

    def _ranks(self, kernel_shape: tuple[int, ...]) -> list[tuple[int, int]]:
        c_in, c_out = kernel_shape[-2:]
        return list(dict.fromkeys((_fraction(f, c_in), _fraction(f, c_out)) for f in RANK_FRACTIONS))

    def _validate_rank(self, layer_name: str, kernel_shape: tuple[int, ...], edit: LayerEdit) -> None:
        c_in, c_out = kernel_shape[-2:]
        ranks = edit.params["ranks"]
        if ranks[0] > c_in or ranks[1] > c_out:
            raise PlanError(
                f"tucker ranks of {layer_name!r} must be at most its channels (in={c_in}, out={c_out}). "
                f"Received: ranks={ranks}"
            )

    def _rank_errors(self, kernel: np.ndarray, ranks: list) -> list[float]:
        return tucker2_errors(kernel, [tuple(r) for r in ranks])

    def _fit(self, kernel_shape: tuple[int, ...], edit: LayerEdit) -> tuple[Callable, Callable]:
        ranks = edit.params["ranks"]
        return (lambda kernel: tucker2(kernel, ranks)), (lambda factors: compose_tucker2(*factors))

    def _kernels(self, kernel_shape: tuple[int, ...], factors: Factors) -> list[tuple[str, np.ndarray, bool]]:
        core, u_in, u_out = factors
        return [
            ("tucker_in", u_in.reshape(1, 1, *u_in.shape), False),
            ("tucker_core", core, True),
            ("tucker_out", u_out.T.reshape(1, 1, *u_out.T.shape), False),
        ]


class SVD(LowRank):
    """Truncated SVD of 1×1 Conv2D, Conv1D and Dense kernels (groups 1) into two layers.

    A SeparableConv1D/2D is factorized through its pointwise kernel: separable
    (depthwise as it was, pointwise Cin → r) then a 1×1 convolution r → Cout.
    """

    name = "svd"
    params = (Param("rank", RANK), Param("residual", PATTERN, required=False))

    def applies(self, layer: Any) -> Optional[str]:
        reason = _common_reason(layer)
        if reason:
            return reason
        if isinstance(layer, keras.layers.Conv2D) and math.prod(layer.kernel_size) > 1:
            size = "x".join(str(k) for k in layer.kernel_size)
            return f"kernel is {size}: use tucker"
        if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
            return _grouped_reason(layer)
        if isinstance(layer, (keras.layers.Dense,) + SEPARABLE):
            return None
        if recurrent.is_recurrent(layer):
            return recurrent.recurrent_reason(layer)
        if isinstance(layer, keras.layers.MultiHeadAttention):
            return ATTENTION_REASON
        return (
            "svd applies to Dense, Conv1D, 1x1 Conv2D, separable convolution, LSTM, GRU and SimpleRNN layers "
            "(also in a Bidirectional), "
            f"not {type(layer).__name__}"
        )

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        if recurrent.is_recurrent(layer):
            return recurrent.recurrent_cost(layer, edit.params["rank"], input_shape, output_shape)
        return svd_cost(layer, edit.params["rank"], edit.params.get("residual"), input_shape, output_shape)

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        if not recurrent.is_recurrent(layer):
            return super().build(layer, edit)
        self.check_edit(layer, edit)
        reason = self.applies(layer)
        if reason is not None:
            raise PlanError(f"cannot apply {self.name} to {layer.name!r}: {reason}")
        if edit.params.get("residual") is not None:
            raise PlanError(f"{self.name} edits of recurrent layer {layer.name!r} take no residual")
        self._validate_rank(layer.name, (recurrent.units(layer), recurrent.units(layer)), edit)
        with one_blas_thread():
            return recurrent.build_recurrent(layer, edit.params["rank"], truncated_svd)

    def kernel_errors(self, layer: Any, edits: Sequence[LayerEdit]) -> list[Optional[float]]:
        if not recurrent.is_recurrent(layer) or self.applies(layer) is not None:
            return super().kernel_errors(layer, edits)
        plain = [i for i, edit in enumerate(edits) if edit.technique == self.name and edit.params.get("residual") is None]
        for i in plain:
            self._validate_rank(layer.name, (recurrent.units(layer), recurrent.units(layer)), edits[i])
        found: list[Optional[float]] = [None] * len(edits)
        for i, error in zip(plain, recurrent.recurrent_errors(layer, [edits[i].params["rank"] for i in plain])):
            found[i] = error
        return found

    def _layer_ranks(self, layer: Any) -> list:
        if recurrent.is_recurrent(layer):
            return recurrent.ranks(layer, RANK_FRACTIONS)
        return super()._layer_ranks(layer)

    def _ranks(self, kernel_shape: tuple[int, ...]) -> list[int]:
        full = min(math.prod(kernel_shape[:-1]), kernel_shape[-1])
        return list(dict.fromkeys(_fraction(f, full) for f in RANK_FRACTIONS))

    def _validate_rank(self, layer_name: str, kernel_shape: tuple[int, ...], edit: LayerEdit) -> None:
        rows, cols = math.prod(kernel_shape[:-1]), kernel_shape[-1]
        rank = edit.params["rank"]
        if rank > min(rows, cols):
            raise PlanError(
                f"svd rank of {layer_name!r} must be at most min({rows}, {cols}) = {min(rows, cols)}. "
                f"Received: rank={rank}"
            )

    def _rank_errors(self, kernel: np.ndarray, ranks: list) -> list[float]:
        return svd_errors(kernel.reshape(-1, kernel.shape[-1]), ranks)

    def _fit(self, kernel_shape: tuple[int, ...], edit: LayerEdit) -> tuple[Callable, Callable]:
        rows, rank = math.prod(kernel_shape[:-1]), edit.params["rank"]

        def fit(kernel: np.ndarray) -> Factors:
            return truncated_svd(kernel.reshape(rows, kernel_shape[-1]), rank)

        def compose(factors: Factors) -> np.ndarray:
            return (factors[0] @ factors[1]).reshape(kernel_shape)

        return fit, compose

    def _kernels(self, kernel_shape: tuple[int, ...], factors: Factors) -> list[tuple[str, np.ndarray, bool]]:
        left, right = factors
        taps = kernel_shape[:-2]
        pointwise = (1,) * len(taps)
        return [
            ("svd_in", left.reshape(*taps, kernel_shape[-2], left.shape[-1]), True),
            ("svd_out", right.reshape(*pointwise, *right.shape), False),
        ]


def _fraction(fraction: float, full: int) -> int:
    return max(1, int(round(fraction * full)))


def _no_residual(layer: Any) -> bool:
    """Layers whose edits take no sparse residual: separable convolutions and recurrent layers."""
    return isinstance(layer, SEPARABLE) or recurrent.is_recurrent(layer)


def _common_reason(layer: Any) -> Optional[str]:
    if kernel_name(layer) is None:
        return "has no kernel to factorize"
    if getattr(layer, "quantization_mode", None):
        return f"already quantized ({layer.quantization_mode})"
    return None


def _grouped_reason(layer: Any) -> Optional[str]:
    groups = getattr(layer, "groups", 1)
    return f"grouped convolution (groups={groups})" if groups != 1 else None
