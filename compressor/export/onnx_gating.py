"""ONNX export of gated and early-exit models: real `If` nodes whose branches onnxruntime accepts.

A gated residual block (`compressor.layers.gating`) traced at batch 1 is a
TensorFlow `If` whose branch functions take the block input and the block's frozen
weights as arguments. tf2onnx converts each branch function on its own, and reads
the shapes of a function's arguments from the function, not from its caller:

- `convert_variables_to_constants_v2` (its grappler/TFG pass) rewrites every branch
  function and marks each argument `_output_shapes: <unknown rank>`, the weights
  (variables before freezing, constants after) and the block input alike.
- `function_def_to_graph` lets that attribute override the caller's input shapes
  that tf2onnx passes in (which tf2onnx also shifts by one for `If`, since it drops
  the last caller input instead of the condition).

So inside a branch no tensor has a shape: tf2onnx's Conv2D handler sets the op type
to `Conv`, fails on the kernel shape (`len(None)`), and, converting with
`continue_on_error`, keeps the half-done node: TensorFlow's 4-long `strides` and
`dilations`, NHWC data, an HWIO kernel, no `pads` or `kernel_shape`. onnxruntime
rejects it ("Attribute dilations has incorrect size"); one that did load would compute
on the wrong layout. Conv1D and DepthwiseConv2D in a branch fail the same way; Dense
(a MatMul, which needs no layout change) happens to convert.

The fix is before conversion: `fill_branch_shapes` writes the shapes TensorFlow
infers for each `If`'s inputs into its branch functions' argument attributes, and
tf2onnx then converts the branches as it converts the main graph (NCHW Convs with
transposed constant kernels, inside the `If`). After conversion, `convert_gated`
refuses any node tf2onnx failed on and runs ONNX's strict shape inference, which
rejects the broken Conv that the default checker lets through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from compressor.errors import ExportError, first_line
from compressor.export.onnx_ops import tf2onnx_errors
from compressor.layers.early_exit import exit_layers
from compressor.layers.gating import gate_layers

if TYPE_CHECKING:  # TensorFlow and ONNX load only when a conversion runs.
    import onnx
    from tensorflow.core.framework.graph_pb2 import GraphDef

_IF_OPS = ("If", "StatelessIf")


def convert_gated(model: keras.Model, opset: int = 17) -> "onnx.ModelProto":
    """Convert a gated or early-exit model to ONNX with one `If` node per gated block or exit.

    The graph is traced at batch 1: only there does a gated block branch (at other
    batch sizes it computes every branch and masks it, see `GatedResidual`), so the
    ONNX input has a static batch of 1. The input is named "input" and the output
    "output", as in `writers.export_onnx`. Gate offsets are frozen into the graph:
    convert again after `set_offsets`.

    Args:
        model: A gated model (`gating.insert_gates`) or an early-exit model
            (`early_exit.insert_exits`) with one input and one output.
        opset: The ONNX opset, 7 to 21.

    Returns:
        The ONNX model. It passes `onnx.checker.check_model(..., full_check=True)`.

    Raises:
        ExportError: The model is not gated, the opset is out of range, or tf2onnx
            fails on a node or drops a gate's `If`.
    """
    import tensorflow as tf

    from compressor.export.writers import ONNX_INPUT_NAME, single_input_shape, tf2onnx_model

    gates = len(gate_layers(model)) + len(exit_layers(model))  # one condition each
    if not gates:
        raise ExportError(f"model '{model.name}' has no gated residual block or early exit; export it with export_onnx")
    if not 7 <= opset <= 21:
        raise ExportError(f"unsupported ONNX opset {opset}; expected a value from 7 to 21")
    shape = single_input_shape(model, "export")
    spec = [tf.TensorSpec((1, *shape[1:]), model.inputs[0].dtype, name=ONNX_INPUT_NAME)]
    try:
        with tf2onnx_errors() as errors:
            proto = tf2onnx_model(model, spec, opset, prepare=fill_branch_shapes)
    except Exception as exc:
        raise ExportError(f"ONNX conversion failed: {first_line(exc)}") from exc
    if errors:
        raise ExportError(f"ONNX conversion failed: tf2onnx: {errors[0]}")
    _check(proto, gates)
    return proto


def fill_branch_shapes(graph_def: "GraphDef") -> "GraphDef":
    """A copy of a frozen graph whose `If` branch functions know their input shapes.

    Each branch function argument gets the shape TensorFlow infers for the matching
    `If` input (module docstring: tf2onnx reads it from there). Nested `If`s are
    filled from the shapes inferred inside their enclosing branch. A function called
    by several `If`s gets the shapes they agree on.

    Args:
        graph_def: A frozen GraphDef, e.g. from `convert_variables_to_constants_v2`.

    Returns:
        The filled copy; `graph_def` is not changed.
    """
    import tensorflow as tf

    filled = type(graph_def)()
    filled.CopyFrom(graph_def)
    functions = {f.signature.name: f for f in filled.library.function}
    shapes: dict[str, list[Any]] = {}
    with tf.Graph().as_default() as graph:
        tf.import_graph_def(filled, name="")
    pending = _branch_calls(graph.get_operations())
    while pending:
        name, inputs = pending.pop()
        if name not in functions or not _merge(shapes, name, inputs):
            continue
        _set_arg_shapes(functions[name], shapes[name])
        pending.extend(_branch_calls(_function_graph(functions[name]).get_operations()))
    return filled


def _branch_calls(operations: list[Any]) -> list[tuple[str, list[Any]]]:
    """(branch function name, input shapes) for each branch of each `If` among `operations`."""
    calls = []
    for op in operations:
        if op.type in _IF_OPS:
            inputs = [t.shape for t in op.inputs[1:]]  # inputs[0] is the condition
            calls.extend((op.get_attr(branch).name, inputs) for branch in ("then_branch", "else_branch"))
    return calls


def _merge(shapes: dict[str, list[Any]], name: str, inputs: list[Any]) -> bool:
    """Record a call's input shapes for a function; whether what is recorded changed."""
    old = shapes.get(name)
    if old is None:
        shapes[name] = list(inputs)
        return True
    # Calls that disagree on a dimension leave it unknown (TensorShape(None) if even the rank differs).
    new = [a.most_specific_common_supertype([b]) or type(a)(None) for a, b in zip(old, inputs)]
    if [s.as_proto() for s in new] == [s.as_proto() for s in old]:
        return False
    shapes[name] = new
    return True


def _set_arg_shapes(function: Any, shapes: list[Any]) -> None:
    """Write one shape per argument into the function's `_output_shapes` argument attributes."""
    for index, shape in enumerate(shapes[: len(function.signature.input_arg)]):
        attr = function.arg_attr[index].attr["_output_shapes"]
        attr.list.ClearField("shape")
        attr.list.shape.add().CopyFrom(shape.as_proto())


def _function_graph(function: Any) -> Any:
    """The function body as a graph, its placeholders shaped by its argument attributes."""
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph

    return function_def_to_graph(function)


def _check(proto: "onnx.ModelProto", gates: int) -> None:
    """Raise ExportError unless the model passes strict shape inference and keeps each gate's `If`.

    The default checker does not look inside `If` branches; the full check runs shape
    inference through them, as onnxruntime does when it loads the model.
    """
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX conversion produced an invalid model: {first_line(exc)}") from exc
    ifs = _count_ifs(proto.graph)
    if ifs != gates:
        raise ExportError(f"ONNX conversion kept {ifs} If nodes for {gates} gates and exits; they would not skip work")


def _count_ifs(graph: "onnx.GraphProto") -> int:
    """`If` nodes in `graph` and in the branches nested in them (an early exit's rest holds the next exit)."""
    count = 0
    for node in graph.node:
        if node.op_type == "If":
            count += 1
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                count += _count_ifs(attribute.g)
    return count
