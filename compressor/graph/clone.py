"""The one way this package copies a graph model: `keras.models.clone_model` and its hooks.

Every rewrite clones, never edits in place (the original keeps its graph and its
weights): the rewriter replaces layers (`compressor.surgery.rewrite`), the channel
slicer narrows them (`compressor.surgery.channels`), the scores copy a model in
another dtype or without its softmax (`compressor.techniques.scores`), gating puts
gates before residual blocks and takes them out (`compressor.techniques.gating`).
Each passes the two hooks of `clone_model`:

- `clone_layer(layer)` (clone_model's `clone_function`): the layer to use in the
  copy, called once per layer; a shared layer's copy is shared too.
- `call_layer(layer, *args, **kwargs)` (its `call_function`): wires each call of a
  copied layer; it may call other layers around it or instead of it.

`clone_graph` adds what clone_model leaves to its callers: new inputs named after the
model's input layers (clone_model names them after their tensors, which a Sequential
leaves auto-named), another input dtype on request, a frozen model's clone frozen,
and a Sequential model's graph cloned as a Functional model of the same name when a
call hook needs it (clone_model takes no `call_function` for a Sequential model).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import keras

from compressor.errors import ModelLoadError, first_line
from compressor.graph.keras_api import functional_graph, producer, safe_mode_off

CloneLayer = Callable[[Any], Any]
CallLayer = Callable[..., Any]


def clone_graph(
    model: keras.Model,
    clone_layer: CloneLayer,
    call_layer: Optional[CallLayer] = None,
    *,
    input_dtype: Optional[str] = None,
    functional: bool = False,
    compiled: bool = True,
    purpose: str = "rewriting",
) -> keras.Model:
    """A clone of a graph model built by `keras.models.clone_model`'s hooks (module docstring).

    Args:
        model: A Functional model or a built Sequential model; left unchanged.
        clone_layer: Called once per layer and nested model: what stands for it in the
            clone (a copy, the layer itself, or another layer).
        call_layer: Called for each call of a cloned layer as `call_layer(layer, *args,
            **kwargs)`; returns the call's outputs. Default: the plain call.
        input_dtype: Dtype of the clone's inputs; default the model's.
        functional: Return a Functional model even for a Sequential one (implied by
            `call_layer`).
        compiled: Compile the clone as the model is compiled (when it is); False
            leaves a Functional clone uncompiled.
        purpose: What the clone is for, named when the model has no graph.

    Returns:
        The clone: a Sequential model for a Sequential one unless `functional` or
        `call_layer` is given, else a Functional model of the model's name; frozen
        when the model is.

    Raises:
        ModelLoadError: The model has no layer graph.
    """
    graph = functional_graph(model)
    if graph is None:
        raise ModelLoadError(
            f"model '{model.name}' ({type(model).__name__}) has no layer graph: {purpose} needs "
            "a Functional model or a Sequential model with a known input shape"
        )
    if isinstance(model, keras.Sequential) and call_layer is None and not functional:
        # A Sequential input is named after its input layer anyway; a new tensor only for another dtype.
        inputs = None if input_dtype is None else keras.tree.flatten(fresh_inputs(graph, input_dtype))[0]
        return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    cloned = keras.models.clone_model(
        graph, input_tensors=fresh_inputs(graph, input_dtype), clone_function=clone_layer, call_function=call_layer
    )
    if isinstance(model, keras.Sequential) or (cloned.compiled and not compiled):
        # A Sequential model's graph is cloned uncompiled; clone_model compiles a Functional one.
        cloned = keras.Model(cloned.input, cloned.output, name=model.name)
        if compiled and model.compiled:
            cloned.compile_from_config(model.get_compile_config())
    if not model.trainable:
        cloned.trainable = False
    return cloned


def fresh_inputs(graph: keras.Model, dtype: Optional[str] = None) -> Any:
    """New Input tensors like a Functional graph's (same structure), named after its input layers."""

    def fresh(tensor: Any) -> Any:
        name = producer(tensor).name
        return keras.Input(batch_shape=tensor.shape, dtype=dtype or tensor.dtype, sparse=tensor.sparse, name=name)

    return keras.tree.map_structure(fresh, graph.input)


def copy_layer(
    layer: Any, config: Optional[Callable[[], dict]] = None, *, failure: str = "cannot copy", why: str = ""
) -> Any:
    """A new, unbuilt layer from the layer's config (or from `config()`, an edited one).

    Safe mode is off for the copy: a Lambda's function comes back from the bytecode of
    a layer already in memory, code that loading the model ran or allowed, so safe mode
    would guard nothing here.

    Args:
        layer: The layer (or nested model) to copy.
        config: Gives the config to build from (called here, so that its failures are
            reported like `from_config`'s); default `layer.get_config`.
        failure: How an error message starts ("cannot copy", "cannot rebuild", ...).
        why: What the copy is for, in an error message (" to score it").

    Raises:
        ModelLoadError: `from_config` fails: "{failure} layer 'name' (Type) from its config{why}: ...".
    """
    try:
        with safe_mode_off():
            return layer.__class__.from_config((config or layer.get_config)())
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise ModelLoadError(
            f"{failure} layer '{layer.name}' ({type(layer).__name__}) from its config{why}: {first_line(exc)}"
        ) from exc
