"""Write a Keras model as .tflite, .onnx or .keras — each file atomically.

TFLite goes through the TFLite converter's Keras path (batch 1, the shape edge
runtimes run); ONNX through tf2onnx from a frozen trace with an explicit input signature
and a dynamic batch axis (tf2onnx's own Keras entry point trips over Keras 3 output
names). A model with several inputs or outputs keeps their names: the TFLite signature's
inputs and outputs, and the ONNX graph's, are the Keras input and output names
(`compressor.graph.signature`). A gated model (`compressor.layers.gating`) or an early-exit
model (`compressor.layers.early_exit`) is exported at a fixed batch of 1 in both formats, where
each gate's or exit's decision is one condition: TFLite gets IF ops, ONNX `If` nodes
(`compressor.export.onnx_gating`), and what is skipped costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import keras

from compressor.errors import ExportError, first_line
from compressor.export.failures import onnx_failure, tflite_failure
from compressor.export.onnx_ops import inline_compiled_functions, register_handlers, tf2onnx_errors
from compressor.graph.signature import input_names, is_multi_io, output_names
from compressor.graph.walk import nested_layers
from compressor.io.atomic import atomic_path, write_bytes_atomic
from compressor.io.models import save_model
from compressor.layers.early_exit import has_exits
from compressor.layers.gating import is_gated
from compressor.quiet import muted_stderr

FORMATS = ("tflite", "onnx", "keras")
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx", "keras": ".keras"}
DEFAULT_OPSET = 17
ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "output"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the TFLite converter's prints, INFO logs and MLIR diagnostics (on fd 2) out of the user's output.

    A failure's diagnostics are in the exception the converter raises, which
    `failures.tflite_failure` turns into one line.
    """
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), muted_stderr(), warnings.catch_warnings():
        # The converter calls a model built on a dict of inputs with a list: Keras warns, and maps them right.
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)
        yield


def single_input_shape(model: keras.Model, what: str = "quantization") -> tuple:
    """The model's one input shape (batch first), or ExportError naming `what` for several inputs/outputs."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} "
            f"outputs; {what} supports single-input, single-output models"
        )
    return tuple(model.inputs[0].shape)


def io_names(model: keras.Model) -> tuple[list[str], list[str]]:
    """The input and output names an exported graph gets: "input" and "output" for a
    single-input, single-output model, else the Keras names."""
    if not is_multi_io(model):
        return [ONNX_INPUT_NAME], [ONNX_OUTPUT_NAME]
    return list(input_names(model)), list(output_names(model))


def export_tflite(model: keras.Model, path: Path | str, sparse: bool = False) -> Path:
    """Convert to a float32 .tflite file (batch 1) and write it atomically.

    Args:
        model: The Keras model.
        path: Where to write.
        sparse: Store weights with enough zeros (the converter's threshold is about
            30%) in a sparse format: a smaller file. Convolutions then run dense
            after a DENSIFY op, so this does not make them faster.

    Raises:
        ExportError: The converter rejects the model.
    """
    import tensorflow as tf

    try:
        with _quiet():
            converter = tf.lite.TFLiteConverter.from_keras_model(tflite_model(model))
            if sparse:
                converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
            flatbuffer = converter.convert()
    except Exception as exc:
        raise tflite_failure(model, exc) from exc
    return write_bytes_atomic(path, flatbuffer)


def tflite_model(model: keras.Model) -> keras.Model:
    """What the TFLite converter gets: the model, or a gated, early-exit or recurrent model called on a batch-1 input.

    At batch 1 each gate's decision is one scalar: a real IF op. A recurrent layer
    (`LSTM`, `GRU`, `SimpleRNN`, also inside `Bidirectional`) becomes a TensorFlow while
    loop over a tensor list; the converter lowers it to a TFLite WHILE op only when the
    list's element shape is static, i.e. at a fixed batch.

    Converted through the Keras path, every IF branch holds its own weights as
    constants (batch norm folded into the convolutions), which XNNPACK runs. A frozen
    trace passes the weights into the branches as inputs instead: XNNPACK leaves such
    convolutions to the reference kernels, 3x slower on the digits ResNet-20.

    A model with several inputs or outputs is called on inputs named as its own and
    returns a dict output name -> tensor: the TFLite signature then names both.
    """
    recurrent = has_recurrent_layers(model)
    if is_multi_io(model):
        names, outputs = io_names(model)
        inputs = {
            name: keras.Input(batch_shape=(1, *t.shape[1:]) if recurrent else t.shape, dtype=t.dtype, name=name)
            for name, t in zip(names, keras.tree.flatten(model.inputs))
        }
        called = model(inputs) if len(inputs) > 1 else model(next(iter(inputs.values())))
        return keras.Model(inputs, dict(zip(outputs, keras.tree.flatten(called))), name=model.name)
    if not (is_gated(model) or has_exits(model) or recurrent):
        return model
    shape = single_input_shape(model, "export")
    inputs = keras.Input(batch_shape=(1, *shape[1:]), dtype=model.inputs[0].dtype, name=ONNX_INPUT_NAME)
    return keras.Model(inputs, model(inputs), name=model.name)


def has_recurrent_layers(model: keras.Model) -> bool:
    """Whether the model (or a model nested in it) holds a recurrent layer, wrapped ones included."""
    return any(isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)) for layer in nested_layers(model))


def export_onnx(model: keras.Model, path: Path | str, opset: int = DEFAULT_OPSET) -> Path:
    """Convert to ONNX with a dynamic batch axis (batch 1 for a gated or early-exit model) and write it atomically.

    The graph has one input named "input" and one output named "output"; a model with
    several inputs or outputs keeps its Keras input and output names.

    Raises:
        ExportError: The opset is out of range or tf2onnx rejects the model.
    """
    import onnx

    if not 7 <= opset <= 21:
        raise ExportError(f"unsupported ONNX opset {opset}; expected a value from 7 to 21 (default {DEFAULT_OPSET})")
    if is_gated(model) or has_exits(model):
        from compressor.export.onnx_gating import convert_gated

        proto = convert_gated(model, opset)
    else:
        proto = _convert(model, opset)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def _convert(model: keras.Model, opset: int) -> object:
    """tf2onnx's model from a frozen trace with a dynamic batch axis."""
    import tensorflow as tf

    names, _ = io_names(model)
    spec = [
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
        for name, t in zip(names, keras.tree.flatten(model.inputs))
    ]
    try:
        with tf2onnx_errors() as errors:
            proto = tf2onnx_model(model, spec, opset)
    except Exception as exc:
        raise ExportError(f"ONNX conversion failed: {first_line(exc)}") from exc
    if errors:  # tf2onnx logs what it cannot convert and leaves it in the model
        raise onnx_failure(model, errors, opset)
    return proto


def tf2onnx_model(model: keras.Model, spec: list, opset: int, prepare: Callable[[object], object] = lambda graph: graph) -> object:
    """tf2onnx's ONNX model of a frozen trace for `spec`, named as `io_names` says ("input" and "output" for one of each).

    Exact GELU's `Erfc` and grouped convolutions convert through `onnx_ops`.

    Args:
        prepare: Applied to the frozen GraphDef before conversion.
    """
    import tf2onnx

    register_handlers()
    graph_def, traced_inputs, traced_outputs = _frozen_graph(model, spec)
    inputs, outputs = io_names(model)
    proto, _ = tf2onnx.convert.from_graph_def(
        prepare(inline_compiled_functions(graph_def)),
        name=model.name,
        input_names=traced_inputs,
        output_names=traced_outputs,
        opset=opset,
        tensors_to_rename={**dict(zip(traced_inputs, inputs)), **dict(zip(traced_outputs, outputs))},
    )
    return proto


def _frozen_graph(model: keras.Model, spec: list) -> tuple[object, list[str], list[str]]:
    """Trace the model and freeze every capture into a constant.

    tf2onnx's own entry points leave captured constants that are not variables
    (e.g. the mean/variance of EfficientNet's Normalization layer) as extra graph
    inputs; freezing first turns all of them into constants.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    names, _ = io_names(model)
    if len(spec) == 1:
        forward = tf.function(lambda x: model(x, training=False), input_signature=spec, autograph=False)
    else:  # inputs by name: a model built on a list takes a dict as well as one built on a dict
        forward = tf.function(lambda *xs: keras.tree.flatten(model(dict(zip(names, xs)), training=False)),
                              input_signature=spec, autograph=False)
    frozen = convert_variables_to_constants_v2(
        forward.get_concrete_function(), lower_control_flow=False, aggressive_inlining=True
    )
    graph = frozen.graph.as_graph_def(add_shapes=True)
    return graph, [t.name for t in frozen.inputs[: len(spec)]], [t.name for t in frozen.outputs]


def export_keras(model: keras.Model, path: Path | str) -> Path:
    """Re-save as .keras (atomically)."""
    return save_model(model, path)


def parse_formats(text: str) -> tuple[str, ...]:
    """Parse "tflite,onnx" into known format names, in order, without repeats.

    Raises:
        ExportError: An unknown or empty format list.
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ExportError(
            f"invalid export format {','.join(unknown) or repr(text)}; expected a comma-separated "
            f"list of {', '.join(FORMATS)}"
        )
    return tuple(dict.fromkeys(names))

