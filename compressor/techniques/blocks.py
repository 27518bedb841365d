"""Block removal: identity residual blocks taken out whole, `y = x + f(x)` becoming `y = x`.

A block is what gating finds (`compressor.techniques.gating.find_residual_blocks`): a
branch that rejoins its own input through an `Add`. Removing it drops the branch's
layers and wires the Add's consumers to the block input. What follows the Add (a ReLU
after it, the next block) stays, so the model computes what it would if the branch
returned zeros; a gate that is shut for every input computes the same.

The remaining layers are copies of the model's (same names, same weights), so the
result can be fine-tuned without touching the model, and a removal recorded by the
Add names replays on the same model.
"""

from __future__ import annotations

from typing import Any, Iterable

import keras

from compressor.graph.clone import clone_graph, copy_layer
from compressor.surgery.plan import PlanError
from compressor.techniques.gating import ResidualBlock, find_residual_blocks


def removable_blocks(model: keras.Model) -> list[ResidualBlock]:
    """The model's identity residual blocks, in graph order (the ones `remove_blocks` can take out)."""
    return find_residual_blocks(model)


def remove_blocks(model: keras.Model, adds: Iterable[str]) -> keras.Model:
    """A copy of `model` without the residual blocks whose Add layers are named in `adds`.

    Args:
        model: A graph model; left unchanged.
        adds: Add names of blocks `removable_blocks` finds.

    Returns:
        A Functional model with the same inputs and outputs, holding copies of the
        other layers with their weights; uncompiled.

    Raises:
        PlanError: A name that is not a removable block of the model.
    """
    wanted = list(dict.fromkeys(adds))
    blocks = {block.add: block for block in removable_blocks(model)}
    unknown = [name for name in wanted if name not in blocks]
    if unknown:
        raise PlanError(f"cannot remove block {unknown[0]!r} of '{model.name}': it is not an identity residual "
                              f"block (those are: {', '.join(blocks) or 'none'})")
    removed = {name: blocks[name] for name in wanted}
    in_branch = {layer for block in removed.values() for layer in block.layers}
    copies: dict[int, Any] = {}
    originals: list[Any] = []

    def clone_layer(layer: Any) -> Any:
        copies[id(layer)] = copy_layer(layer)
        originals.append(layer)
        return copies[id(layer)]

    def call_layer(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name in in_branch:
            return keras.tree.flatten((args, kwargs))[0]  # nothing outside the branch reads it
        block = removed.get(layer.name)
        if block is not None:
            return args[0][block.shortcut]
        return layer(*args, **kwargs)

    result = clone_graph(model, clone_layer, call_layer, compiled=False, purpose="block removal")
    for original in originals:
        if isinstance(original, keras.layers.Layer) and original.name not in in_branch and original.name not in removed:
            copies[id(original)].set_weights(original.get_weights())
    return result
