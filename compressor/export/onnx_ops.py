"""What tf2onnx needs besides its own handlers for Keras 3 models, and its error log as a list.

Two gaps, both measured on Keras 3 models (ConvNeXt, transformer encoders):

- **Exact GELU.** Keras' `gelu(approximate=False)` is `0.5 * x * erfc(-x / sqrt(2))`
  in TensorFlow; tf2onnx has a handler for `Erf` but none for `Erfc`, and leaves the
  node as an op onnxruntime refuses. `Erfc` is registered here as `1 - Erf(x)` (ONNX
  `Erf` exists from opset 9). Where erfc is tiny, 1 - erf loses its relative precision,
  but in GELU it is multiplied by x there: the absolute error stays below 1e-7 * |x|.
- **Grouped convolutions.** Keras runs `Conv2D(groups=g)` (1 < g, depthwise ConvNeXt
  convs included) inside a `tf.function(jit_compile=True)`, because TensorFlow's CPU
  kernels lack grouped convolutions. The frozen graph keeps each such conv as a
  `StatefulPartitionedCall` to a function marked `_XlaMustCompile` and `_noinline`,
  which tf2onnx does not convert. `inline_compiled_functions` drops those two marks
  (a compilation hint, not a change of meaning); tf2onnx's grappler pass then inlines
  the call, and its `Conv2D` handler sets `group` from the kernel's input channels:
  an ONNX `Conv(group=g)`.

tf2onnx converts with `continue_on_error` and only logs what it cannot convert;
`tf2onnx_errors` collects those lines so the writer can raise instead of saving a
model onnxruntime would refuse.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from tensorflow.core.framework.graph_pb2 import GraphDef

_COMPILE_MARKS = ("_XlaMustCompile", "_noinline")
_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
_registered = False


def register_handlers() -> None:
    """Register the tf2onnx handlers this module adds (once per process)."""
    global _registered
    if _registered:
        return
    import numpy as np
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # registered by the decorator
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            """erfc(x) = 1 - erf(x): the node becomes an Erf, a Sub from one follows it."""
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
            node.type = "Erf"
            erf = node.output[0]
            sub = ctx.insert_new_node_on_output("Sub", erf, name=utils.make_name(node.name), inputs=[one.output[0], erf])
            ctx.copy_shape(erf, sub.output[0])
            ctx.set_dtype(sub.output[0], ctx.get_dtype(erf))

    _registered = True


def inline_compiled_functions(graph_def: "GraphDef") -> "GraphDef":
    """A copy of a frozen graph whose XLA-compiled function calls may be inlined.

    Args:
        graph_def: A frozen GraphDef.

    Returns:
        The copy; `graph_def` is not changed. Calls to functions marked for XLA
        compilation (and the functions) lose their compile and no-inline marks.
    """
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    compiled = set()
    for function in out.library.function:
        if function.attr["_XlaMustCompile"].b:
            compiled.add(function.signature.name)
            for mark in _COMPILE_MARKS:
                del function.attr[mark]
    for node in _all_nodes(out):
        if node.op in _CALL_OPS and node.attr["f"].func.name in compiled:
            for mark in _COMPILE_MARKS:
                if mark in node.attr:
                    del node.attr[mark]
    return out


def _all_nodes(graph_def: "GraphDef") -> Iterator:
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


@contextlib.contextmanager
def tf2onnx_errors() -> Iterator[list[str]]:
    """Collect tf2onnx's error log lines instead of printing them; also mute its prints.

    tf2onnx's graph_def entry point converts with `continue_on_error`: a node it
    fails on is only logged and stays half-converted in the model. The caller turns
    the collected lines into an ExportError.
    """
    logger = logging.getLogger("tf2onnx")
    errors: list[str] = []
    handler = _ListHandler(errors)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf2onnx's deprecation notices
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield errors
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _ListHandler(logging.Handler):
    """A log handler that appends each record's first line to a list."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])
