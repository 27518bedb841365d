"""The techniques by name: one registration each, and the registry of instances a run uses.

Users name techniques on the command line (`--techniques tucker,sparsity`); each name
is registered once, below, with what `--help` and option checks need (its kind and a
summary) and where its class lives, imported only when a technique is used, so that
this module imports no TensorFlow:

- "tucker": low-rank. Tucker-2 for k×k Conv2D layers, truncated SVD for 1×1 Conv2D,
  Conv1D and Dense layers (it brings "svd" along).
- "svd": truncated SVD only (1×1 Conv2D, Conv1D, Dense); k×k convolutions are left.
- "hessian": EigenDamage: the layer rotated into the eigenbases of its K-FAC factors
  and cut to its most important directions (1×1 → k×k → 1×1, as Tucker-2). Its
  K-FAC statistics are gathered on data before the search (`prepare_registry`);
  layers it does not apply to fall back to "tucker"/"svd" when those are asked for too.
- "sparsity": alone, masked kernels. With "tucker" or "svd": hybrid, a sparse
  residual on each low-rank edit; layers that cannot be factorized (depthwise,
  grouped, or where factorizing cannot lower the cost) get a masked kernel instead.
- "channels": a stage, not a per-layer technique: whole channels of dependency groups
  are removed first (`compressor.search.channels`); the others then edit what is left.
- "blocks": a stage too, before channels: identity residual blocks removed whole while
  the accuracy holds (`compressor.search.block_search`; fixed_loss only).
- "gating": a stage too: after the static ones, a learned gate before each residual
  block decides per input whether the block runs (`compressor.search.gating`).
- "early-exit": a stage too, last: small classifiers after chosen layers answer the
  inputs they are confident on, and the rest of the network does not run
  (`compressor.search.early_exit`).

Per-layer techniques are tried on a layer in `priority` order (lowest first); the
first that applies edits it (`technique_for`). A run's `Registry` holds the technique
instances its search and rewrite use: plain ones, and data-driven ones prepared on
data (`prepare_registry`, and `registry_for_plan` to replay a plan the same way).
Adding a technique: one module with its class (`compressor.techniques.base.LayerTechnique`)
and one `register(...)` line (README, "Adding a technique").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from compressor.errors import OptionError
from compressor.surgery.plan import PlanError

LAYER = "layer"  # edits single layers: proposes and builds per-layer edits
STAGE = "stage"  # a step of its own in the pipeline (no per-layer edits)
KINDS = (LAYER, STAGE)
AUTO = "auto"
"""The default `--techniques`: AUTO_BASE, with "channels" first when low rank alone cannot reach
the budget (`compressor.pipeline.techniques` decides, once the model is loaded)."""
AUTO_BASE = ("tucker",)
# Importance scores that rank weights (sparsity) and channels; kept in step with
# compressor.techniques.scores.CRITERIA (tested), here so that checking options imports no TensorFlow.
CRITERIA = ("magnitude", "snip", "synflow", "fpgm", "hessian")


@dataclass(frozen=True)
class TechniqueEntry:
    """One registered technique.

    Attributes:
        name: What users pass in `--techniques` and plans record as an edit's technique.
        kind: LAYER (a class that proposes and builds per-layer edits) or STAGE.
        summary: One line for `--help`.
        target: LAYER: the class, or "package.module:Class" to import when first used.
        priority: LAYER: the order techniques are tried on a layer, lowest first.
        includes: Other techniques the name also asks for ("tucker" brings "svd").
        applies: STAGE: "package.module:function" telling whether a layer is one the
            stage changes (for `compressor inspect`); None: no per-layer answer.
    """

    name: str
    kind: str
    summary: str
    target: Union[str, type, None] = None
    priority: int = 50
    includes: tuple[str, ...] = ()
    applies: Optional[str] = None


_ENTRIES: dict[str, TechniqueEntry] = {}
_CLASSES: dict[str, type] = {}


def register(
    name: str,
    target: Union[str, type, None] = None,
    *,
    summary: str,
    kind: str = LAYER,
    priority: int = 50,
    includes: Iterable[str] = (),
    applies: Optional[str] = None,
) -> TechniqueEntry:
    """Register a technique under `name` (once; tests may `unregister` it again).

    Args:
        name: The technique's name, lower case.
        target: LAYER: its class, or "package.module:Class" imported on first use.
        summary: One line for `--help`.
        kind: LAYER or STAGE.
        priority: LAYER: lower is tried first on a layer (hessian 10, tucker 20,
            svd 30, sparsity 90: the fallback).
        includes: Names that asking for this one also asks for.
        applies: STAGE: "package.module:function(layer) -> bool" for `inspect`.

    Returns:
        The entry.

    Raises:
        ValueError: A name already registered, an invalid kind, or a LAYER
            technique without a class.
    """
    if name in _ENTRIES:
        raise ValueError(f"technique {name!r} is already registered")
    if kind not in KINDS or name != name.strip().lower() or not name:
        raise ValueError(f"Invalid technique registration. Expected a lower-case name and kind in {KINDS}. Received: {name!r}, {kind!r}")
    if (kind == LAYER) != (target is not None):
        raise ValueError(f"a {kind} technique {'needs' if kind == LAYER else 'has no'} class: {name!r}")
    entry = TechniqueEntry(name, kind, summary, target, priority, tuple(includes), applies)
    _ENTRIES[name] = entry
    return entry


def unregister(name: str) -> None:
    """Forget a registered technique (for tests that register one of their own)."""
    _ENTRIES.pop(name, None)
    _CLASSES.pop(name, None)


register("blocks", kind=STAGE, summary="remove whole residual blocks, before channels (fixed_loss)")
register("channels", kind=STAGE, summary="remove whole channels, first", applies="compressor.techniques.stages:channels_apply")
register("tucker", "compressor.techniques.lowrank:Tucker", priority=20, includes=("svd",), summary="Tucker-2 / SVD")
register("svd", "compressor.techniques.lowrank:SVD", priority=30, summary="SVD of 1x1 convolutions, Conv1D, Dense")
register("hessian", "compressor.techniques.hessian:Hessian", priority=10, summary="K-FAC eigenbasis, gathered on data")
register("sparsity", "compressor.techniques.sparsity:Sparsity", priority=90,
         summary="masked kernels; with tucker or svd, sparse residuals")
register("gating", kind=STAGE, summary="learned per-input skipping of residual blocks, last")
register("early-exit", kind=STAGE, summary="internal classifiers that answer confident inputs early, last (fixed_loss)")


# --- names (no TensorFlow) ------------------------------------------------------------------


def technique_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_ENTRIES)


def layer_technique_names() -> tuple[str, ...]:
    """The names of the techniques that edit single layers."""
    return tuple(name for name, entry in _ENTRIES.items() if entry.kind == LAYER)


def stage_technique_names() -> tuple[str, ...]:
    """The names of the techniques that are stages of their own ("channels", "gating")."""
    return tuple(name for name, entry in _ENTRIES.items() if entry.kind == STAGE)


def entry(name: str) -> TechniqueEntry:
    """The registration of `name`.

    Raises:
        PlanError: No technique of that name.
    """
    if name not in _ENTRIES:
        raise PlanError(f"Invalid technique. Expected one of {technique_names()}. Received: {name!r}")
    return _ENTRIES[name]


def parse_techniques(names: Iterable[str]) -> frozenset[str]:
    """Validate a user's technique names (e.g. from "tucker,sparsity").

    Raises:
        PlanError: An unknown name, or none at all.
    """
    wanted = frozenset(name.strip().lower() for name in names if name.strip())
    if AUTO in wanted and len(wanted) > 1:
        raise PlanError(f"Invalid techniques. {AUTO} chooses them itself: pass it alone, or name the techniques. "
                        f"Received: {sorted(wanted)}")
    unknown = sorted(wanted - set(_ENTRIES) - {AUTO})
    if unknown or not wanted:
        raise PlanError(f"Invalid techniques. Expected {AUTO} or some of {technique_names()}. Received: {sorted(wanted)}")
    return wanted


def techniques_help() -> str:
    """The `--techniques` help: each name with its summary, stages marked."""
    parts = [f"{e.name} ({'a stage: ' if e.kind == STAGE else ''}{e.summary})" for e in _ENTRIES.values()]
    return (f"{AUTO} (default: {','.join(AUTO_BASE)}, with channels first when the model's params or FLOPs sit "
            "where low rank cannot reach the budget), " + ", ".join(parts)
            + "; combine with commas, e.g. channels,tucker,gating.")


# --- classes (imported on first use) --------------------------------------------------------


def technique_class(name: str) -> type:
    """The class of the per-layer technique `name`, imported on first use.

    Raises:
        PlanError: `name` is not a registered per-layer technique.
    """
    if name not in _CLASSES:
        found = _ENTRIES.get(name)
        if found is None or found.kind != LAYER:
            raise PlanError(f"Invalid technique. Expected one of {layer_technique_names()}. Received: technique={name!r}")
        cls = _load(found.target) if isinstance(found.target, str) else found.target
        from compressor.techniques.params import check_declared

        check_declared(name, getattr(cls, "params", ()))
        _CLASSES[name] = cls
    return _CLASSES[name]


def parameter_names() -> frozenset[str]:
    """Every parameter name some registered technique declares (imports every class)."""
    return frozenset(param.name for name in layer_technique_names() for param in technique_class(name).params)


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --- the instances one run uses -----------------------------------------------------------------


class Registry:
    """The technique instances a search, its kernel cache and the rewrite use.

    Per-layer techniques are plain instances of their classes unless a prepared
    instance (e.g. a Hessian holding K-FAC eigenbases) is given for that name. A
    registry does not change once made; `with_techniques` makes another.

    Args:
        prepared: Technique instances to use instead of the plain ones of their names.
    """

    def __init__(self, prepared: Iterable[Any] = ()) -> None:
        self._prepared = {technique.name: technique for technique in prepared}
        self._plain: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name in self._prepared:
            return self._prepared[name]
        cls = technique_class(name)
        if type(self._plain.get(name)) is not cls:  # first use, or registered anew
            self._plain[name] = cls()
        return self._plain[name]

    def with_techniques(self, *techniques: Any) -> "Registry":
        """A registry that uses these instances as well (replacing those of their names)."""
        return Registry([*self._prepared.values(), *techniques])

    def applicable(self, layer: Any) -> tuple[str, ...]:
        """Every technique that could change `layer`, whatever its data and cost (`inspect`'s column)."""
        found = []
        for name, registered in _ENTRIES.items():
            if registered.kind == LAYER and self[name].applies(layer) is None:
                found.append(name)
            elif registered.kind == STAGE and registered.applies and _load(registered.applies)(layer):
                found.append(name)
        return tuple(found)


DEFAULT_REGISTRY = Registry()
"""Plain instances of every per-layer technique: no data-driven preparation."""


@dataclass(frozen=True)
class Choice:
    """The technique one layer gets.

    Attributes:
        technique: The technique, or None when the layer is left as it is.
        residual: Hybrid: ask the technique for edits with a sparse residual too.
        reason: Why the layer is left as it is (when `technique` is None).
    """

    technique: Optional[Any]
    residual: bool = False
    reason: Optional[str] = None


def technique_for(
    layer: Any,
    wanted: Iterable[str],
    input_shape: Optional[tuple] = None,
    output_shape: Optional[tuple] = None,
    registry: Optional[Registry] = None,
) -> Choice:
    """The technique `layer` gets for the user's technique names (module docstring).

    The wanted per-layer techniques (with what they include) are tried in priority
    order; the first whose `check` passes edits the layer. It gets hybrid edits when
    a wanted technique `provides_residual` and it `takes_residual`.

    Args:
        layer: A built layer.
        wanted: The user's technique names.
        input_shape, output_shape: Its call's shapes, batch first, to judge whether
            an edit lowers its cost (default: its first call).
        registry: The instances to use; default: plain ones.

    Returns:
        The choice; when none applies, `reason` says why, preferring a reason that
        does not just point to another technique.

    Raises:
        PlanError: Unknown technique names.
    """
    registry = DEFAULT_REGISTRY if registry is None else registry
    names = _with_included(parse_techniques(wanted))
    tried = sorted((n for n in names if _ENTRIES[n].kind == LAYER), key=lambda n: _ENTRIES[n].priority)
    hybrid = any(getattr(registry[name], "provides_residual", False) for name in tried)
    reasons = []
    for name in tried:
        technique = registry[name]
        reason = technique.check(layer, input_shape, output_shape)
        if reason is None:
            return Choice(technique, residual=hybrid and getattr(technique, "takes_residual", False))
        reasons.append(reason)
    return Choice(None, reason=_best_reason(reasons))


def _with_included(names: Iterable[str]) -> set[str]:
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(entry(name).includes)
    return found


def _best_reason(reasons: list[str]) -> str:
    """The most telling reason: not one that points to another technique ("use svd")."""
    pointers = tuple(f"use {name}" for name in _ENTRIES)
    telling = [reason for reason in reasons if not any(pointer in reason for pointer in pointers)]
    return (telling or reasons or ["no per-layer technique was asked for"])[0]


# --- preparing data-driven techniques -----------------------------------------------------------


Log = Callable[[str], None]


def prepare_registry(
    names: Iterable[str],
    model: Any,
    data: Any,
    *,
    source: str,
    criterion: str = "magnitude",
    seed: int = 0,
    log: Optional[Log] = None,
) -> tuple[Registry, Optional[dict[str, Any]]]:
    """The registry a search uses: data-driven techniques prepared on `data`.

    Each wanted per-layer technique whose class needs data for these settings
    (`needs_data`: "hessian" its K-FAC statistics, "sparsity" scores of a
    criterion other than magnitude) is prepared on the model, in priority order.

    Args:
        names: The user's technique names (stages are ignored).
        model: The model the search edits.
        data: The Dataset to gather statistics on (None: none available).
        source: Which data that is ("train", "search"), for the record.
        criterion: The importance score of sparsity masks.
        seed: Seeds the statistics.
        log: Progress messages.

    Returns:
        (registry, statistics record for the plan, or None when nothing was gathered).

    Raises:
        OptionError: Statistics are needed and `data` is None.
        CompressorError: From the statistics passes.
    """
    names = tuple(names)
    needed = _needed(names, criterion)
    if not needed:
        return DEFAULT_REGISTRY, None
    if data is None:
        raise OptionError(
            "{techniques} {names} gathers {what} on data: pass {train_data} or {data}",
            names=",".join(names), what=needed[0][1],
        )
    return _prepare(needed, model, data, source=source, criterion=criterion, seed=seed, log=log)


def _needed(names: Iterable[str], criterion: str) -> list[tuple[str, str]]:
    """(name, what it gathers) of the wanted per-layer techniques that need data, in priority order."""
    wanted = sorted((n for n in parse_techniques(names) if _ENTRIES[n].kind == LAYER), key=lambda n: _ENTRIES[n].priority)
    needed = [(name, technique_class(name).needs_data(criterion)) for name in wanted]
    return [(name, what) for name, what in needed if what]


def _prepare(needed: list[tuple[str, str]], model: Any, data: Any, *, source: str, criterion: str, seed: int,
             log: Optional[Log]) -> tuple[Registry, dict[str, Any]]:
    log = log or (lambda message: None)
    record: dict[str, Any] = {"data": source, "seed": seed}
    prepared = []
    for name, _ in needed:
        technique, fields = technique_class(name).prepare(model, data, criterion=criterion, seed=seed, log=log)
        prepared.append(technique)
        record.update(fields)
    return Registry(prepared), record


def registry_for_plan(
    techniques: Iterable[str], statistics: Optional[Mapping[str, Any]], model: Any, data: Any, *,
    source: str, seed: int = 0, log: Optional[Log] = None,
) -> Registry:
    """The registry that rebuilds a plan's edits as they were made (`prepare_registry` from its record).

    Args:
        techniques: The techniques of the plan's edits.
        statistics: The plan's statistics record (None: none were gathered).
        model, data, source, seed, log: As for `prepare_registry`.

    Raises:
        OptionError: The plan's edits need statistics and `data` is None.
    """
    names = sorted(set(techniques))
    criterion = (statistics or {}).get("criterion", "magnitude")
    needed = _needed(names, criterion) if names else []
    if not needed:
        return DEFAULT_REGISTRY
    if data is None:
        raise OptionError("the plan's edits need {what} gathered on data: pass {train_data} or {data}", what=needed[0][1])
    return _prepare(needed, model, data, source=source, criterion=criterion, seed=seed, log=log)[0]


def has_sparse_weights(edits: Iterable[Any], registry: Optional[Registry] = None) -> bool:
    """Whether any edit leaves sparse weights (a mask, a sparse residual): TFLite then stores them sparsely."""
    registry = DEFAULT_REGISTRY if registry is None else registry
    return any(registry[edit.technique].sparse(edit) for edit in edits)
