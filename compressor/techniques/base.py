"""The technique protocol, and what all techniques share: kernels, costs, errors.

A technique turns one layer into cheaper layers. It declares what its edits carry
(`params`), says whether it applies to a layer (`applies`, `check`), proposes edits
for the search (`options`), costs an edit (`cost`), and builds its layers (`build`);
the rewriter in `compressor.surgery` wires them in. Adding a technique means one
module with a `LayerTechnique` subclass and one `register(...)` line
(`compressor.techniques.registry`; README, "Adding a technique").

Kernels are handled in their "pattern layout" (..., in_channels, out_channels):
the layout of Conv1D/2D/3D and Dense kernels. The other kernels are viewed in it:
a depthwise kernel (..., C, multiplier) as (..., 1, C × multiplier), so that one
output channel is one column; a transposed convolution's kernel (..., out, in) with
its last two axes swapped; a separable convolution by its pointwise kernel.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Sequence

import keras
import numpy as np

from compressor.errors import CompressorError
from compressor.graph.flops import CONV_TRANSPOSE, DEPTHWISE, SEPARABLE, Shape, layer_flops
from compressor.surgery.plan import LayerEdit, PlanError, SparsitySpec
from compressor.surgery.replacement import Replacement
from compressor.techniques import recurrent
from compressor.techniques.params import Param

NOMINAL_SIZE = 32  # spatial size assumed for free (None) dimensions when costing a layer


class Technique(Protocol):
    """One way of compressing a layer (`LayerTechnique` gives defaults for all but four).

    Attributes:
        name: The name it is registered under, and the `LayerEdit.technique` it handles.
        params: What its edits carry (`compressor.techniques.params.Param`).
        takes_residual: Its edits can carry a sparse `residual` (hybrid low-rank).
        provides_residual: Asking for it with a technique that takes a residual
            makes hybrid edits ("sparsity").
        uses_pattern: Its masks (or the residuals it provides) follow the user's
            sparsity pattern (`pruning_structure`, `block_size`).
    """

    name: str
    params: tuple[Param, ...]
    takes_residual: bool
    provides_residual: bool
    uses_pattern: bool

    def applies(self, layer: Any) -> Optional[str]:
        """None if it can edit this kind of layer at all (whatever data and cost), else a reason."""

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        """None if it edits `layer` in this run (it applies, and some edit lowers the cost), else a reason."""

    def options(
        self,
        layer: Any,
        residual: Optional[SparsitySpec] = None,
        input_shape: Optional[Shape] = None,
        output_shape: Optional[Shape] = None,
    ) -> list[LayerEdit]:
        """Candidate edits, from light to heavy compression, each lowering params and FLOPs.

        `residual` is a pattern template (its density is ignored): for low-rank
        techniques it asks for hybrid edits with a sparse residual in that pattern,
        for "sparsity" it is the pattern of the mask.
        """

    def candidates(
        self, layer: Any, pattern: Optional[SparsitySpec], hybrid: bool, input_shape: Shape, output_shape: Shape
    ) -> list[LayerEdit]:
        """What the search chooses from, for the user's sparsity `pattern` (and `hybrid` edits when asked)."""

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        """(params, FLOPs) at batch 1 of what `edit` makes of `layer`, at known call shapes (`edit_cost`)."""

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        """The new layers (and their weights) that stand in for `layer`."""

    def sparse(self, edit: LayerEdit) -> bool:
        """Whether the edit leaves sparse weights (a mask, a sparse residual)."""


class LayerTechnique:
    """Defaults of the `Technique` protocol: a subclass sets `name` and `params` and
    implements `applies`, `options`, `cost` and `build`.

    A data-driven technique (K-FAC bases, importance scores) also overrides
    `needs_data` and `prepare`: `compressor.techniques.registry.prepare_registry`
    calls them before the search, and again when a plan is replayed.
    """

    name = ""
    params: tuple[Param, ...] = ()
    takes_residual = False
    provides_residual = False
    uses_pattern = False
    no_option_reason = "no edit of it lowers its cost"

    def applies(self, layer: Any) -> Optional[str]:
        raise NotImplementedError

    def check(
        self, layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
    ) -> Optional[str]:
        """None if it applies and some edit lowers the layer's cost, else a reason."""
        reason = self.applies(layer)
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
        raise NotImplementedError

    def candidates(
        self, layer: Any, pattern: Optional[SparsitySpec], hybrid: bool, input_shape: Shape, output_shape: Shape
    ) -> list[LayerEdit]:
        """Its plain options, and with `hybrid` those with a residual in `pattern` (default unstructured)."""
        edits = self.options(layer, None, input_shape, output_shape)
        if hybrid:
            edits += self.options(layer, pattern or SparsitySpec(density=1.0), input_shape, output_shape)
        return edits

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
        raise NotImplementedError

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        raise NotImplementedError

    def sparse(self, edit: LayerEdit) -> bool:
        return False

    def kernel_errors(self, layer: Any, edits: Sequence[LayerEdit]) -> list[Optional[float]]:
        """||W − Ŵ||_F / ||W||_F of each edit, from the kernel alone, without building the edit.

        A technique overrides this when it can price many edits of a layer at once
        (one factorization for every rank) from nothing but the layer's weights: the
        search then caches these errors across runs, keyed by the model's weights.
        None for an edit means "build it to know" (the default for every edit).
        """
        return [None] * len(edits)

    def gradual_target(self, edit: LayerEdit, criterion: str) -> Optional[SparsitySpec]:
        """The mask fine-tuning should reach step by step instead of starting from it (None: keep its zeros fixed)."""
        return None

    @classmethod
    def needs_data(cls, criterion: str) -> Optional[str]:
        """What it gathers on data before the search with these settings (e.g. "K-FAC statistics"); None: nothing."""
        return None

    @classmethod
    def prepare(
        cls, model: Any, data: Any, *, criterion: str, seed: int, log: Callable[[str], None]
    ) -> tuple["LayerTechnique", dict[str, Any]]:
        """An instance prepared on `data`, and what to record in the plan to prepare it again."""
        return cls(), {}

    def check_edit(self, layer: Any, edit: LayerEdit) -> None:
        """Refuse to build an edit of another technique.

        Raises:
            PlanError: `edit.technique` is not this technique.
        """
        if edit.technique != self.name:
            raise PlanError(f"the {self.name} technique cannot build a {edit.technique!r} edit of {layer.name!r}")


# --- kernels ---------------------------------------------------------------------------


def kernel_name(layer: Any) -> Optional[str]:
    """Name of the weight a technique works on: "pointwise_kernel" or "kernel"; None if none."""
    names = {weight.name for weight in getattr(layer, "weights", ())}
    if isinstance(layer, SEPARABLE):
        return "pointwise_kernel" if "pointwise_kernel" in names else None
    return "kernel" if "kernel" in names else None


def kernel_index(layer: Any) -> int:
    """Position of the main kernel in `layer.weights` (and in `layer.get_weights()`)."""
    name = kernel_name(layer)
    return next(i for i, weight in enumerate(layer.weights) if weight.name == name)


def kernel_of(layer: Any) -> np.ndarray:
    """The layer's main kernel as numpy, in the layer's own layout."""
    return keras.ops.convert_to_numpy(layer.weights[kernel_index(layer)])


def pattern_kernel(layer: Any, kernel: Optional[np.ndarray] = None) -> np.ndarray:
    """A kernel viewed in pattern layout (..., in, out) (module docstring)."""
    kernel = kernel_of(layer) if kernel is None else kernel
    if isinstance(layer, DEPTHWISE):
        return kernel.reshape(*kernel.shape[:-2], 1, kernel.shape[-2] * kernel.shape[-1])
    if isinstance(layer, CONV_TRANSPOSE):
        return np.swapaxes(kernel, -1, -2)
    return kernel


def restore_kernel(layer: Any, pattern: np.ndarray) -> np.ndarray:
    """Inverse of `pattern_kernel`: back to the layer's own layout."""
    if isinstance(layer, DEPTHWISE):
        return pattern.reshape(kernel_of(layer).shape)
    if isinstance(layer, CONV_TRANSPOSE):
        return np.swapaxes(pattern, -1, -2)
    return pattern


def kept_count(shape: Sequence[int], spec: SparsitySpec) -> int:
    """How many weights of a pattern-layout kernel of this shape `spec` keeps.

    The single source of truth for both `sparsity.mask` and `edit_cost`: a pattern
    keeps round(density × units) whole units (weights, filters, input channels or
    blocks; halves round up); "n:m" keeps n/m of the weights whatever its density.

    Raises:
        PlanError: The kernel has fewer than 2 axes, or a block size or m does not
            divide the channel counts.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise PlanError(f"a sparsity pattern needs a kernel with (in, out) axes. Received: shape={shape}")
    size, c_in, c_out = math.prod(shape), shape[-2], shape[-1]
    structure = spec.structure
    if structure == "unstructured":
        return round_half_up(spec.density * size)
    if structure == "filter":
        return round_half_up(spec.density * c_out) * (size // c_out)
    if structure == "channel":
        return round_half_up(spec.density * c_in) * (size // c_in)
    if structure == "block":
        rows, cols = spec.block_size
        if c_in % rows or c_out % cols:
            raise PlanError(
                f"block size {rows}x{cols} does not divide the kernel's channels "
                f"(in={c_in}, out={c_out}): choose a block size that divides both"
            )
        blocks = size // (rows * cols)
        return round_half_up(spec.density * blocks) * rows * cols
    if c_in % spec.m:
        raise PlanError(
            f"n:m sparsity with m={spec.m} needs input channels divisible by m. Received: in_channels={c_in}"
        )
    return size // spec.m * spec.n


def round_half_up(value: float) -> int:
    """Nearest integer, halves up (Python's round() rounds halves to even)."""
    return int(math.floor(value + 0.5))


# --- shapes and costs -------------------------------------------------------------------


def call_shapes(
    layer: Any, input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
) -> tuple[Shape, Shape]:
    """Fully known input and output shapes (batch first, batch 1) to cost a layer at.

    Args:
        layer: A built layer.
        input_shape: Shape of the call to cost; default: its first call in a model.
        output_shape: Its output shape; default: computed from `input_shape`.

    Returns:
        (input_shape, output_shape). Free (None) dimensions besides the batch count as
        `NOMINAL_SIZE`; a layer never called is costed at NOMINAL_SIZE spatial size.
    """
    if input_shape is None:
        try:
            input_shape = tuple(layer.input.shape)
        except (AttributeError, ValueError, RuntimeError):
            input_shape = _nominal_input_shape(layer)
    known = (1,) + tuple(NOMINAL_SIZE if d is None else int(d) for d in input_shape[1:])
    if output_shape is None or known != (1,) + tuple(input_shape[1:]) or None in tuple(output_shape[1:]):
        output_shape = tuple(layer.compute_output_shape(known))
    return known, (1,) + tuple(int(d) for d in output_shape[1:])


def _nominal_input_shape(layer: Any) -> Shape:
    kernel = keras.ops.convert_to_numpy(layer.weights[0]) if layer.weights else None
    if kernel is None:
        raise CompressorError(f"layer {layer.name!r} is not built: call it on an input first")
    if isinstance(layer, keras.layers.Dense):
        return (None, kernel.shape[0])
    if isinstance(layer, CONV_TRANSPOSE):
        channels = kernel.shape[-1]
    else:
        channels = kernel.shape[-2] * getattr(layer, "groups", 1)
    spatial = (NOMINAL_SIZE,) * (kernel.ndim - 2)
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return (None, channels, *spatial) if first else (None, *spatial, channels)


def layer_cost(layer: Any, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
    """(params, FLOPs) of the layer as it is, at batch 1."""
    return int(layer.count_params()), layer_flops(layer, [input_shape], [output_shape])


def edit_cost(
    layer: Any,
    edit: LayerEdit,
    input_shape: Optional[Shape] = None,
    output_shape: Optional[Shape] = None,
    registry: Any = None,
) -> tuple[int, int]:
    """Params and FLOPs (batch 1) of what `edit` makes of `layer`: its technique's `cost`.

    FLOPs follow `compressor.graph.flops`: 2 per multiply-accumulate, 1 per output
    element for a bias add, for an activation, and for the Add that joins a residual
    branch. Sparse weights (a sparsity mask, a low-rank edit's residual) count as
    their non-zeros, for params AND FLOPs: a sparse-storage artifact holds only the
    non-zeros, and each of them is one multiply-accumulate per position it is applied
    at. (Kept weights are counted: a kept weight that is exactly 0 still counts.)

    Args:
        layer: The original, built layer.
        edit: An edit of it.
        input_shape, output_shape: Shapes of its call, batch first (`call_shapes`).
        registry: The technique instances (`compressor.techniques.registry.Registry`);
            default: plain ones (costs need no prepared data).

    Returns:
        (params, flops).

    Raises:
        PlanError: The edit does not fit the layer (e.g. its sparsity pattern).
    """
    from compressor.techniques.registry import DEFAULT_REGISTRY  # the registry imports the technique modules

    input_shape, output_shape = call_shapes(layer, input_shape, output_shape)
    technique = (DEFAULT_REGISTRY if registry is None else registry)[edit.technique]
    return technique.cost(layer, edit, input_shape, output_shape)


def masked_cost(layer: Any, kept: int, input_shape: Shape, output_shape: Shape) -> tuple[int, int]:
    """(params, FLOPs) of `layer` with only `kept` weights of its main kernel left (the others zero).

    Each kernel weight is one multiply-accumulate per position the kernel is applied
    at: per output position, or per input position for a transposed convolution.
    """
    params, flops = layer_cost(layer, input_shape, output_shape)
    pattern_shape = pattern_kernel(layer).shape
    dropped = math.prod(pattern_shape) - kept
    if isinstance(layer, CONV_TRANSPOSE):
        positions = math.prod(input_shape[1:]) // pattern_shape[-2]
    else:
        positions = math.prod(output_shape[1:]) // pattern_shape[-1]
    return params - dropped, flops - 2 * positions * dropped


def activation_name(layer: Any) -> Optional[Any]:
    """The layer's fused activation as serialized in its config; None for none/linear."""
    name = layer.get_config().get("activation")
    return None if name in (None, "linear") else name


# --- reconstruction error ---------------------------------------------------------------


def effective_kernel(layer: Any, replacement: Replacement) -> np.ndarray:
    """The one kernel the replacement's layers amount to, in the layer's own layout.

    A chain of several layers is composed (all but its one spatial kernel are
    pointwise), plus the residual branch's kernel; a one-layer chain (a masked
    clone) is read at the position of the original's main kernel. A recurrent
    layer's is its two kernels stacked (`searched_kernel`).
    """
    if recurrent.is_recurrent(layer):
        return recurrent.composed(layer, replacement.chain[0].weights)
    if len(replacement.chain) == 1:
        kernel = np.asarray(replacement.chain[0].weights[kernel_index(layer)], dtype=np.float64)
    else:
        kernel = compose_kernels([piece_kernel(piece) for piece in replacement.chain])
    if replacement.branch is not None:
        kernel = kernel + piece_kernel(replacement.branch)
    return kernel


def searched_kernel(layer: Any) -> np.ndarray:
    """The kernel the search compares effective kernels with: `kernel_of`, a recurrent layer's [W; U]."""
    return recurrent.searched_kernel(layer) if recurrent.is_recurrent(layer) else kernel_of(layer)


def assign_searched_kernel(layer: Any, kernel: np.ndarray) -> None:
    """Set the layer's main kernel (a recurrent layer's W and U) to a `searched_kernel`-shaped value."""
    if recurrent.is_recurrent(layer):
        recurrent.assign_searched_kernel(layer, kernel)
    else:
        layer.weights[kernel_index(layer)].assign(kernel)


def piece_kernel(piece: Any) -> np.ndarray:
    """A new layer's main kernel in float64: its first weight, a separable convolution's pointwise one."""
    return np.asarray(piece.weights[1 if isinstance(piece.layer, SEPARABLE) else 0], dtype=np.float64)


def compose_kernels(kernels: Sequence[np.ndarray]) -> np.ndarray:
    """The kernel of a chain of linear layers with one spatial kernel and pointwise others.

    Args:
        kernels: Kernels in pattern layout (..., in, out), in chain order; Dense
            kernels are (in, out).

    Returns:
        A kernel shaped like the spatial one, with the chain's first input and last
        output channels.
    """
    taps = [math.prod(k.shape[:-2]) for k in kernels]
    at = int(np.argmax(taps))  # first of the largest: the spatial kernel, or the first of 1x1s
    before = np.eye(kernels[0].shape[-2])
    for k in kernels[:at]:
        before = before @ k.reshape(k.shape[-2:])
    after = np.eye(kernels[at].shape[-1])
    for k in kernels[at + 1 :]:
        after = after @ k.reshape(k.shape[-2:])
    return np.einsum("ia,...ab,bo->...io", before, kernels[at], after, optimize=True)


def reconstruction_error(
    layer: Any, edit: LayerEdit, replacement: Optional[Replacement] = None, registry: Any = None
) -> float:
    """||W − Ŵ||_F / ||W||_F of the layer's main kernel W.

    Ŵ is the kernel the edit's layers amount to: the composed factors plus the
    sparse residual, or the masked kernel.

    Args:
        layer: The original, built layer.
        edit: An edit of it.
        replacement: Its already built replacement, to avoid building it again.
        registry: The technique instances that build it; default: plain ones.

    Returns:
        The relative error, 0 for an exact replacement.
    """
    if replacement is None:
        from compressor.techniques.registry import DEFAULT_REGISTRY  # the registry imports the technique modules

        replacement = (DEFAULT_REGISTRY if registry is None else registry)[edit.technique].build(layer, edit)
    kernel = searched_kernel(layer).astype(np.float64)
    approx = effective_kernel(layer, replacement)
    return relative_error(kernel, approx)


def relative_error(kernel: np.ndarray, approx: np.ndarray) -> float:
    """||kernel − approx||_F / ||kernel||_F (0 when the kernel is all zeros and so is approx)."""
    norm = float(np.linalg.norm(kernel))
    diff = float(np.linalg.norm(np.asarray(kernel, np.float64) - approx))
    return diff / norm if norm else diff
