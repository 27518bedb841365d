"""What the search chooses from: per layer, the edits a technique offers and their cost.

`layer_candidates` walks every leaf layer with weights. A layer the rewriter can
replace and a technique applies to gets its options (from light to heavy
compression), each with the params and FLOPs of what it makes of the layer and the
relative error of its effective kernel. Every other layer with weights is skipped
with a reason a user can read. FLOPs of a layer called several times (a shared
layer) are summed over its calls, as in `compressor.graph.cost.model_cost`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import keras

from compressor.errors import CompressorError, first_line
from compressor.graph.calls import LayerCall, layer_calls
from compressor.graph.cost import model_cost
from compressor.search.curves import option_errors
from compressor.search.kernels import KernelCache
from compressor.surgery.editable import editable_layers, why_not_editable
from compressor.surgery.plan import LayerEdit, SkippedLayer, SparsitySpec
from compressor.techniques.base import call_shapes, edit_cost, layer_cost
from compressor.techniques.registry import DEFAULT_REGISTRY, Registry, parse_techniques, technique_for

NO_OPTION = "no edit of it lowers both its params and its FLOPs"


@dataclass(frozen=True)
class Option:
    """One edit of one layer, with what it costs and how far its kernel moves.

    Attributes:
        edit: The edit, under the layer's qualified name.
        params: Params of what the edit makes of the layer.
        flops: Its FLOPs summed over the layer's calls, at batch 1.
        error: ||W − Ŵ||_F / ||W||_F of the layer's main kernel.
    """

    edit: LayerEdit
    params: int
    flops: int
    error: float

    def cost(self, kind: str) -> int:
        """Its "params" or "flops"."""
        return self.params if kind == "params" else self.flops


@dataclass(frozen=True)
class LayerCandidates:
    """A compressible layer, its own cost, and its options.

    Attributes:
        name: Qualified name (`outer/inner` inside nested models).
        layer: The original layer.
        params: Its params as it is.
        flops: Its FLOPs summed over its calls, at batch 1.
        options: From light to heavy compression; each lowers params and FLOPs.
    """

    name: str
    layer: Any = field(repr=False, compare=False)
    params: int
    flops: int
    options: tuple[Option, ...]

    def cost(self, kind: str) -> int:
        """Its own "params" or "flops"."""
        return self.params if kind == "params" else self.flops


def layer_candidates(
    model: keras.Model,
    techniques: Iterable[str],
    pattern: Optional[SparsitySpec] = None,
    kernels: Optional[KernelCache] = None,
    registry: Optional[Registry] = None,
    cache_dir: Optional[Path | str] = None,
) -> tuple[list[LayerCandidates], list[SkippedLayer]]:
    """The options of every compressible layer, and why the others are left alone.

    Args:
        model: A Functional or built Sequential model (nested models allowed).
        techniques: The user's technique names ("tucker", "svd", "sparsity", ...);
            see `compressor.techniques.registry`.
        pattern: The sparsity pattern of masks and of hybrid residuals (its density
            is ignored); default unstructured. Hybrid layers (a low-rank technique
            with "sparsity") get both plain low-rank options and options with a
            residual in this pattern.
        kernels: Where to keep the effective kernels built to measure errors, so the
            search's evaluations reuse them; default: a fresh cache, dropped after.
            Options a technique prices from the weights alone (every rank of a
            Tucker-2 or SVD layer from one factorization) are not built here.
        registry: The technique instances (`compressor.techniques.registry.prepare_registry`);
            default: the kernel cache's.
        cache_dir: Folder where the data-free kernel errors are cached across runs
            (`compressor.search.curves`); None: computed each time.

    Returns:
        (candidates in topological order, skipped layers with reasons). Layers
        without weights are in neither.

    Raises:
        PlanError: Unknown technique names.
        ModelLoadError: The model has no layer graph.
    """
    wanted = parse_techniques(techniques)
    kernels = KernelCache(registry=registry) if kernels is None else kernels
    registry = kernels.registry if registry is None else registry
    editable = editable_layers(model)
    priced: list[_Priced] = []
    skipped: dict[str, SkippedLayer] = {}
    order: list[str] = []
    for name, calls in _calls_with_weights(model).items():
        layer = calls[0].operation
        order.append(name)
        if name not in editable:
            skipped[name] = SkippedLayer(name, _not_editable_reason(model, name, layer, wanted, registry))
            continue
        try:
            found = _layer_options(name, layer, calls, wanted, pattern, registry)
        except CompressorError as exc:
            skipped[name] = SkippedLayer(name, first_line(exc))
            continue
        if isinstance(found, str):
            skipped[name] = SkippedLayer(name, found)
        else:
            priced.append(found)
    pending = [(p.name, p.layer, [edit for edit, _, _ in p.options]) for p in priced]
    errors, failed = option_errors(model, pending, kernels, cache_dir)
    candidates = {}
    for p in priced:
        if p.name in failed:
            skipped[p.name] = SkippedLayer(p.name, failed[p.name])
            continue
        options = [Option(edit, params, flops, error) for (edit, params, flops), error in zip(p.options, errors[p.name])]
        options.sort(key=lambda option: (option.params, option.flops), reverse=True)
        candidates[p.name] = LayerCandidates(p.name, p.layer, p.params, p.flops, tuple(options))
    return [candidates[name] for name in order if name in candidates], [skipped[name] for name in order if name in skipped]


def baseline_cost(model: keras.Model, candidates: Sequence[LayerCandidates]) -> tuple[int, int]:
    """(params, FLOPs) of the whole model, counted as the candidates count their layers.

    Equals `model_cost(model)` totals for models with fixed input shapes; with free
    spatial dimensions, candidate layers count at the nominal size their options do.
    """
    cost = model_cost(model)
    by_name = {layer.name: layer for layer in cost.layers}
    flops = cost.flops
    for candidate in candidates:
        known = by_name.get(candidate.name)
        flops += candidate.flops - (known.flops if known is not None else 0)
    return int(model.count_params()), int(flops)


def lowest_cost(model: keras.Model, techniques: Iterable[str], kind: str) -> tuple[int, int]:
    """(lowest, baseline) params or FLOPs: the model with every layer at its most compressing option, and as it is.

    Prices the options as `layer_candidates` does but measures no error, so it costs
    no factorization: what the per-layer techniques could reach at most, before any
    search (`compressor.pipeline.techniques` reads it to choose the default techniques).

    Args:
        model: A Functional or built Sequential model.
        techniques: Per-layer technique names.
        kind: "params" or "flops".
    """
    wanted = parse_techniques(techniques)
    editable = editable_layers(model)
    saved = 0
    for name, calls in _calls_with_weights(model).items():
        if name not in editable:
            continue
        try:
            found = _layer_options(name, calls[0].operation, calls, wanted, None, DEFAULT_REGISTRY)
        except CompressorError:
            continue
        if not isinstance(found, str):
            own = found.params if kind == "params" else found.flops
            saved += own - min(params if kind == "params" else flops for _, params, flops in found.options)
    baseline = int(model.count_params()) if kind == "params" else int(model_cost(model).flops)
    return baseline - saved, baseline


def _not_editable_reason(
    model: keras.Model, name: str, layer: Any, wanted: frozenset[str], registry: Registry
) -> str:
    """Why the rewriter cannot replace the layer, and why no technique would edit it if it could."""
    reason = why_not_editable(model, name) or "cannot be replaced"
    try:
        refusal = technique_for(layer, wanted, registry=registry).reason
    except (CompressorError, ValueError, TypeError, AttributeError):  # a layer call_shapes cannot cost
        refusal = None
    return f"{reason}; {refusal}" if refusal else reason


def _calls_with_weights(model: keras.Model) -> dict[str, list[LayerCall]]:
    grouped: dict[str, list[LayerCall]] = {}
    for call in layer_calls(model):
        if isinstance(call.operation, keras.layers.Layer) and not isinstance(call.operation, keras.layers.InputLayer):
            if getattr(call.operation, "weights", None):
                grouped.setdefault(call.path, []).append(call)
    return grouped


@dataclass(frozen=True)
class _Priced:
    """A layer's edits with their costs, before their errors are known."""

    name: str
    layer: Any
    params: int
    flops: int
    options: list[tuple[LayerEdit, int, int]]  # (edit, params, FLOPs)


def _layer_options(
    name: str,
    layer: Any,
    calls: list[LayerCall],
    wanted: frozenset[str],
    pattern: Optional[SparsitySpec],
    registry: Registry,
) -> _Priced | str:
    """The layer's edits that lower both its params and its FLOPs, with their costs, or the reason it has none."""
    shapes = [call_shapes(layer, call.input_shapes[0], call.output_shapes[0]) for call in calls]
    choice = technique_for(layer, wanted, *shapes[0], registry=registry)
    if choice.technique is None:
        return choice.reason or "no technique applies"
    edits = choice.technique.candidates(layer, pattern, choice.residual, *shapes[0])
    params = layer_cost(layer, *shapes[0])[0]
    flops = sum(layer_cost(layer, *shape)[1] for shape in shapes)
    options = []
    for edit in dict.fromkeys(dataclasses.replace(edit, layer=name) for edit in edits):
        costs = [edit_cost(layer, edit, *shape, registry=registry) for shape in shapes]
        option_flops = sum(cost[1] for cost in costs)
        if costs[0][0] >= params or option_flops >= flops:
            continue
        options.append((edit, costs[0][0], option_flops))
    if not options:
        return NO_OPTION
    return _Priced(name, layer, params, flops, options)
