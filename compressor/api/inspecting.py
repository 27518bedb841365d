"""`compressor.inspect`: each layer's parameters, FLOPs and applicable techniques (what `compressor inspect` shows).

    for layer in compressor.inspect("model.keras").layers:
        print(layer.name, layer.params, layer.flops, layer.techniques)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from compressor.api.inputs import as_model

if TYPE_CHECKING:
    from compressor.graph.cost import LayerCost


@dataclass(frozen=True)
class Inspection:
    """A model's cost, layer by layer.

    Attributes:
        model: The model's name.
        params: Total parameters.
        flops: Total FLOPs at batch 1 (a multiply-accumulate counts 2).
        layers: One `compressor.graph.cost.LayerCost` per leaf layer, in topological order.
        free_inputs: Inputs with free dimensions besides the batch: layers whose shapes
            depend on them count 0 FLOPs.
        inputs: (name, per-sample shape) of each model input, in order (None: a free dimension).
        outputs: (name, per-sample shape) of each model output, in order.
    """

    model: str
    params: int
    flops: int
    layers: tuple[LayerCost, ...]
    free_inputs: tuple[str, ...] = ()
    inputs: tuple[tuple[str, tuple], ...] = ()
    outputs: tuple[tuple[str, tuple], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """`{"params", "flops", "layers": [...]}`: what `compressor inspect --json` prints.

        A model with several inputs or outputs adds `inputs` and `outputs`: `{"name",
        "shape"}` per tensor (per-sample shape, null for a free dimension).
        """
        document = {"params": self.params, "flops": self.flops, "layers": [layer.to_dict() for layer in self.layers]}
        if len(self.inputs) > 1 or len(self.outputs) > 1:
            document["inputs"] = [{"name": n, "shape": list(s)} for n, s in self.inputs]
            document["outputs"] = [{"name": n, "shape": list(s)} for n, s in self.outputs]
        return document


def inspect(model: Any, *, custom_objects: Sequence[str] = (), allow_model_code: bool = False) -> Inspection:
    """Count a model's parameters and FLOPs per layer, and say which techniques could shrink each.

    Args:
        model: A keras.Model (Functional or Sequential), or the path of a model file.
        custom_objects: Modules to import first, which register custom layers (for a path).
        allow_model_code: Run code stored in the model file (a Lambda layer's); only for files you trust.

    Returns:
        The per-layer rows and totals.

    Raises:
        ModelLoadError: The model cannot be loaded or analysed (a subclassed model).
    """
    import keras

    from compressor.graph.cost import model_cost
    from compressor.graph.signature import input_names, output_names

    keras_model = as_model(model, custom_objects, allow_model_code)
    cost = model_cost(keras_model)
    free = tuple(x.name for x in keras_model.inputs if any(d is None for d in x.shape[1:]))
    inputs = tuple(zip(input_names(keras_model), (tuple(t.shape[1:]) for t in keras.tree.flatten(keras_model.inputs))))
    outputs = tuple(zip(output_names(keras_model), (tuple(t.shape[1:]) for t in keras.tree.flatten(keras_model.outputs))))
    return Inspection(keras_model.name, cost.params, cost.flops, _with_techniques(cost.layers, keras_model), free,
                      inputs, outputs)


def _with_techniques(rows: Sequence[LayerCost], model: Any) -> tuple[LayerCost, ...]:
    """The rows with each layer's techniques as the registry names them (`--techniques` names)."""
    import dataclasses

    from compressor.graph.calls import layer_calls
    from compressor.techniques.registry import DEFAULT_REGISTRY

    layers = {call.path: call.operation for call in layer_calls(model)}
    return tuple(
        dataclasses.replace(row, techniques=DEFAULT_REGISTRY.applicable(layers[row.name]) if row.name in layers else ())
        for row in rows
    )
