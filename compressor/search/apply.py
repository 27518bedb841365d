"""Apply a plan to the model it was made for: remove its blocks and channels, build each edit's layers, rewrite the graph."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import keras

from compressor.io.fingerprint import model_fingerprint
from compressor.surgery.editable import check_editable
from compressor.surgery.plan import LayerEdit, Plan, PlanError
from compressor.surgery.replacement import Replacement
from compressor.surgery.rewrite import rewrite_model
from compressor.techniques.registry import DEFAULT_REGISTRY, Registry

__all__ = ["apply_plan", "model_fingerprint"]


def apply_plan(model: keras.Model, plan: Plan, strict: bool = True, *, registry: Optional[Registry] = None) -> keras.Model:
    """A compressed copy of `model`: every edit of the plan built and wired in.

    Args:
        model: The model the plan was made for; left unchanged.
        plan: The plan (e.g. `Plan.load("plan.json")`).
        strict: When the plan records a model fingerprint that differs from the
            model's, raise (True) or only warn (False).
        registry: The technique instances that build the edits: the search's, or
            for a replayed plan `compressor.techniques.registry.registry_for_plan`;
            default: plain ones (data-driven edits need prepared ones).

    Returns:
        A new model.

    Raises:
        PlanError: The plan was made for another model (strict), names layers the
            model does not have or that cannot be replaced, or an edit does not fit
            its layer.
        ModelLoadError: The model has no layer graph.
    """
    _check_fingerprint(model, plan, strict)
    if plan.blocks:
        from compressor.techniques.blocks import remove_blocks

        model = remove_blocks(model, plan.blocks)
    if plan.channels:
        model = prune_planned_channels(model, plan)
    check_editable(model, [edit.layer for edit in plan.edits])
    registry = DEFAULT_REGISTRY if registry is None else registry
    return rewrite_model(model, {edit.layer: _factory(edit, registry) for edit in plan.edits})


def prune_planned_channels(model: keras.Model, plan: Plan) -> keras.Model:
    """`model` with the plan's channel removals applied (a new model).

    Raises:
        PlanError: A group of the plan is not in the model, or has another size.
    """
    from compressor.graph.groups import channel_groups
    from compressor.surgery.channels import prune_channels

    groups = channel_groups(model)
    sizes = {group.name: group.size for group in groups}
    for removal in plan.channels:
        if removal.group not in sizes:
            raise PlanError(f"the plan removes channels of group {removal.group!r}, which model '{model.name}' does not have")
        if sizes[removal.group] != removal.size:
            raise PlanError(
                f"the plan's group {removal.group!r} has {removal.size} channels; in model '{model.name}' it has "
                f"{sizes[removal.group]}"
            )
    return prune_channels(model, plan.removals, groups)


def _factory(edit: LayerEdit, registry: Registry) -> Any:
    def build(layer: Any) -> Replacement:
        return registry[edit.technique].build(layer, edit)

    return build


def _check_fingerprint(model: keras.Model, plan: Plan, strict: bool) -> None:
    expected = plan.model.get("fingerprint")
    if not expected:
        return
    actual = model_fingerprint(model)
    if actual == expected:
        return
    message = (
        f"the plan was made for model '{plan.model.get('name', '?')}' ({expected[:19]}…), but model "
        f"'{model.name}' has fingerprint {actual[:19]}…: its architecture or weights differ"
    )
    if strict:
        raise PlanError(message + "; apply it anyway with strict=False")
    warnings.warn(message, stacklevel=3)
