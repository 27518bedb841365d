"""Apply per-layer replacements to a Keras graph model, by cloning it.

`rewrite_model(model, {"conv": replacement})` returns a new model in which every call
`y = conv(x)` of the original becomes (see `compressor.surgery.replacement`)

    y = chain(x);  y = Add()([y, branch(x)]);  y = Activation(activation)(y)

Every other layer is a fresh copy (same config, weights copied), so the original model
keeps its graph and its weights, and the two models share no variables.

The shape of the result:

- Each graph model, top-level or nested, is cloned with `keras.models.clone_model`
  (through `compressor.graph.clone.clone_graph`): `clone_function` copies a layer or
  hands back the first layer of its replacement, `call_function` wires the whole
  replacement for each call of the original layer.
- Nested models stay nested, under their own names, so qualified names (`outer/inner`)
  of untouched layers are the same in the result.
- A Sequential model with a replaced layer inside becomes a Functional model with the
  same name, input and layer order (a replacement may add a branch, which a Sequential
  cannot express). A Sequential model without edits stays Sequential.
- A layer called several times gets one replacement, whose layers all its calls share.
- Layer names stay unique within each (nested) model: a replacement layer whose name is
  taken is renamed to the first free `name_1`, `name_2`, ... in graph order, so the
  same inputs always give the same names. The replaced layer's own name is free.

The result holds only the layers the replacements bring plus standard `Add` and
`Activation` layers, so it saves to `.keras` and loads without this package when the
replacements use standard Keras layers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import keras
import numpy as np

from compressor.errors import ModelLoadError, first_line
from compressor.graph.clone import clone_graph, copy_layer
from compressor.graph.keras_api import functional_graph
from compressor.surgery.editable import check_editable
from compressor.surgery.plan import PlanError
from compressor.surgery.replacement import Piece, Replacement

ReplacementSource = Union[Replacement, Callable[[keras.layers.Layer], Replacement]]


def rewrite_model(model: keras.Model, replacements: Mapping[str, ReplacementSource]) -> keras.Model:
    """A copy of `model` with some layers replaced.

    Args:
        model: A Functional model or a built Sequential model; left unchanged.
        replacements: Qualified layer name (`layer`, or `outer/inner` inside nested
            models, as in `compressor.graph.calls.layer_calls`) → a Replacement, or a
            factory called once with the original layer that returns one.

    Returns:
        A new model computing the same graph with the replacements wired in.

    Raises:
        PlanError: A name is not in the model or names a layer that cannot be replaced
            (see `editable_layers`); a factory returned no Replacement; a replacement
            cannot be wired on the layer's input, outputs another shape than the
            layer, or brings weights of the wrong shapes.
        ModelLoadError: The model (or a nested one) has no layer graph, or a layer
            cannot be copied from its config.
    """
    check_editable(model, replacements)
    rewriter = _Rewriter(replacements)
    rewritten = rewriter.clone_graph(model, prefix="")
    rewriter.set_weights()
    return rewritten


class _Rewriter:
    """Clones one model tree; remembers which weights go where once layers are built."""

    def __init__(self, replacements: Mapping[str, ReplacementSource]) -> None:
        self._sources = dict(replacements)
        self._copies: dict[Any, Any] = {}  # id(original) or (id, path) → its copy, across nesting levels
        self._weight_copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []  # (original, copy)
        self._pieces: list[tuple[str, Piece]] = []  # (replaced layer, piece) in graph order
        self._wirings: dict[int, _Wiring] = {}  # id(first chain layer) → wiring of its replacement

    def clone_graph(self, model: keras.Model, prefix: str) -> keras.Model:
        """Clone a Functional or Sequential model whose layers are named `prefix + name`."""
        graph = functional_graph(model)
        if graph is None:
            raise ModelLoadError(
                f"model '{model.name}' ({type(model).__name__}) has no layer graph: rewriting needs "
                "a Functional model or a Sequential model with a known input shape"
            )
        names = _Names(op.name for op in graph.operations if prefix + op.name not in self._sources)

        def clone_function(operation: Any) -> Any:
            return self._clone_operation(operation, prefix, names)

        # A Sequential model without an edit inside stays Sequential: only a call hook needs a Functional one.
        edited = not isinstance(model, keras.Sequential) or any(key.startswith(prefix) for key in self._sources)
        return clone_graph(model, clone_function, self._call if edited else None)

    def set_weights(self) -> None:
        """Copy the originals' weights into their copies; give each piece its weights."""
        for original, copy in self._weight_copies:
            copy.set_weights(original.get_weights())
        for name, piece in self._pieces:
            _set_piece_weights(name, piece)

    def _call(self, layer: Any, *args: Any, **kwargs: Any) -> Any:
        wiring = self._wirings.get(id(layer))
        return wiring(*args, **kwargs) if wiring is not None else layer(*args, **kwargs)

    def _clone_operation(self, operation: Any, prefix: str, names: "_Names") -> Any:
        path = prefix + operation.name
        if path in self._sources:
            return self._replace(path, operation, names)
        if isinstance(operation, keras.Model) and functional_graph(operation) is not None:
            key = (id(operation), path)
            if key not in self._copies:
                self._copies[key] = self.clone_graph(operation, path + "/")
            return self._copies[key]
        if id(operation) not in self._copies:
            copy = copy_layer(operation)
            self._copies[id(operation)] = copy
            if isinstance(operation, keras.layers.Layer):
                self._weight_copies.append((operation, copy))
        return self._copies[id(operation)]

    def _replace(self, path: str, layer: keras.layers.Layer, names: "_Names") -> keras.layers.Layer:
        source = self._sources[path]
        replacement = source if isinstance(source, Replacement) else source(layer)
        _check_replacement(path, replacement)
        chain = [self._adopt(path, piece, names) for piece in replacement.chain]
        branch = self._adopt(path, replacement.branch, names) if replacement.branch is not None else None
        add = keras.layers.Add(name=names.take(f"{layer.name}_add")) if branch is not None else None
        activation = None
        if replacement.activation is not None:
            try:
                activation = keras.layers.Activation(
                    replacement.activation, name=names.take(f"{layer.name}_activation")
                )
            except ValueError as exc:
                raise PlanError(
                    f"the replacement of layer '{path}' has an invalid activation: {first_line(exc)}"
                ) from exc
        wiring = _Wiring(path, layer, chain, branch, add, activation)
        self._wirings[id(chain[0])] = wiring
        return chain[0]

    def _adopt(self, path: str, piece: Piece, names: "_Names") -> keras.layers.Layer:
        """The piece's layer under a free name; a copy when it is built or already used."""
        layer = piece.layer
        name = names.take(layer.name)
        used = any(layer is other.layer for _, other in self._pieces)
        if layer.built or used or name != layer.name:
            layer = layer.__class__.from_config({**layer.get_config(), "name": name})
        self._pieces.append((path, Piece(layer, list(piece.weights))))
        return layer


class _Wiring:
    """The replacement of one layer, wired anew for each call of that layer."""

    def __init__(
        self,
        path: str,
        original: keras.layers.Layer,
        chain: list[keras.layers.Layer],
        branch: Optional[keras.layers.Layer],
        add: Optional[keras.layers.Layer],
        activation: Optional[keras.layers.Layer],
    ) -> None:
        self.path, self.original = path, original
        self.chain, self.branch, self.add, self.activation = chain, branch, add, activation

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The layer is editable, so its call has exactly one tensor argument; other
        # arguments (training=...) concern the original layer and are dropped.
        x = next(t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor))
        try:
            y = x
            for layer in self.chain:
                y = layer(y)
            if self.branch is not None:
                y = self.add([y, self.branch(x)])
            if self.activation is not None:
                y = self.activation(y)
        except (ValueError, TypeError) as exc:
            raise PlanError(
                f"the replacement of layer '{self.path}' cannot be wired on its input of shape "
                f"{tuple(x.shape)}: {first_line(exc)}"
            ) from exc
        expected = _output_shape(self.original, x)
        if expected is not None and tuple(y.shape) != expected:
            raise PlanError(
                f"the replacement of layer '{self.path}' outputs shape {tuple(y.shape)}; "
                f"the layer outputs {expected}"
            )
        return y


class _Names:
    """The layer names taken in one model; hands out free ones deterministically."""

    def __init__(self, taken: Iterable[str]) -> None:
        self._taken = set(taken)

    def take(self, name: str) -> str:
        unique, suffix = name, 0
        while unique in self._taken:
            suffix += 1
            unique = f"{name}_{suffix}"
        self._taken.add(unique)
        return unique


def _check_replacement(path: str, replacement: Any) -> None:
    if not isinstance(replacement, Replacement):
        raise PlanError(
            f"the replacement of layer '{path}' must be a Replacement. Received: {type(replacement).__name__}"
        )
    if not replacement.chain:
        raise PlanError(f"the replacement of layer '{path}' has an empty chain; it needs at least one layer")
    pieces = list(replacement.chain) + ([replacement.branch] if replacement.branch is not None else [])
    for piece in pieces:
        if not isinstance(piece, Piece) or not isinstance(piece.layer, keras.layers.Layer):
            raise PlanError(
                f"the replacement of layer '{path}' must hold Pieces of Keras layers. Received: {piece!r}"
            )


def _set_piece_weights(path: str, piece: Piece) -> None:
    expected = [tuple(variable.shape) for variable in piece.layer.weights]
    received = [tuple(np.shape(value)) for value in piece.weights]
    if expected != received:
        raise PlanError(
            f"the replacement of layer '{path}': {type(piece.layer).__name__} '{piece.layer.name}' "
            f"has weights of shapes {expected}; received weights of shapes {received}"
        )
    piece.layer.set_weights([np.asarray(value) for value in piece.weights])


def _output_shape(layer: keras.layers.Layer, x: Any) -> Optional[tuple]:
    """The shape the original layer gives `x`; None when Keras cannot tell."""
    try:
        return tuple(keras.tree.flatten(layer.compute_output_spec(x))[0].shape)
    except Exception:  # noqa: BLE001 - shape inference is only a check here
        return None
