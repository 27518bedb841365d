"""Run exported artifacts with the edge runtimes: LiteRT for .tflite, onnxruntime for .onnx.

A TFLite artifact with int8 (or uint8) input and output tensors still takes float
data and returns float scores: `ArtifactRunner.prepare` quantizes the inputs with the
input tensor's scale and zero point (once, outside any timed loop), and `invoke`
dequantizes the output, so accuracy is computed as for a float artifact while the
timed graph runs on integer inputs.

This module must not import TensorFlow or Keras: it is what runs on a target board,
where only numpy, ai-edge-litert and onnxruntime are installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compressor.errors import CompressorError, OptionError, first_line
from compressor.quiet import muted_stderr

FORMATS = {".tflite": "tflite", ".onnx": "onnx"}

DEFAULT_ONNX_PROVIDER = "CPUExecutionProvider"
XNNPACK = "xnnpack"
NO_DELEGATE = "none"

QuantParams = tuple[float, int]
"""(scale, zero_point) of an integer tensor: real = scale * (q - zero_point)."""


@dataclass
class ArtifactRunner:
    """One loaded artifact, ready to run.

    Attributes:
        path: The artifact file.
        format: "tflite" or "onnx".
        input_shape: Input shape with None for dynamic dimensions (batch first).
        input_dtype: numpy dtype the artifact expects (int8 for an int8-I/O model).
        invoke: Runs one prepared batch (see `prepare`); returns the first output,
            dequantized to float32 when the artifact outputs a quantized tensor.
        output_dtype: dtype of the artifact's raw output tensor.
        input_quantization: (scale, zero_point) of a quantized integer input, else None.
        output_quantization: (scale, zero_point) of a quantized integer output, else None.
        init_ms: Time to make it runnable, in ms: LiteRT's interpreter built and its
            tensors allocated, or onnxruntime's session created (the runtime's import
            and reading nothing else are not in it).
        delegate: TFLite: "xnnpack" when LiteRT applies its default XNNPACK delegate,
            "none" when it runs its builtin kernels alone; None for ONNX.
        provider: ONNX: the execution provider the session runs on; None for TFLite.
    """

    path: Path
    format: str
    input_shape: tuple[Optional[int], ...]
    input_dtype: np.dtype
    invoke: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    output_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    input_quantization: Optional[QuantParams] = None
    output_quantization: Optional[QuantParams] = None
    init_ms: float = 0.0
    delegate: Optional[str] = None
    provider: Optional[str] = None

    @property
    def quantized_io(self) -> bool:
        """Whether the artifact takes or returns quantized integer tensors."""
        return self.input_quantization is not None or self.output_quantization is not None

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size baked into the artifact, or None when it is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Run any number of samples, in batches the artifact accepts.

        Args:
            x: Inputs, batch first, with the artifact's per-sample shape.
            batch_size: Batch used when the artifact's batch is dynamic.

        Returns:
            The first output for all samples, concatenated.

        Raises:
            CompressorError: The samples do not fit the artifact's input shape.
        """
        x = self.prepare(x)
        step = self.fixed_batch or batch_size
        outputs = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if self.fixed_batch and len(chunk) < step:
                # A fixed batch takes only full batches: pad the last one, drop the padding.
                pad = np.repeat(chunk[-1:], step - len(chunk), axis=0)
                outputs.append(self.invoke(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                outputs.append(self.invoke(chunk))
        return np.concatenate(outputs, axis=0)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Check the per-sample shape and convert to what `invoke` takes.

        For a quantized integer input, data in any other dtype holds the model's
        real input values and is quantized with the input's scale and zero point;
        data already in the input's dtype is taken as quantized.
        """
        x = np.asarray(x)
        expected = self.input_shape[1:]
        got = tuple(x.shape[1:])
        if len(expected) != len(got) or any(e not in (None, g) for e, g in zip(expected, got)):
            raise CompressorError(
                f"data samples have shape {got} but {self.path.name} expects "
                f"{tuple('?' if d is None else d for d in expected)}"
            )
        if self.input_quantization is not None and x.dtype != self.input_dtype:
            return np.ascontiguousarray(quantize_values(x, self.input_quantization, self.input_dtype))
        return np.ascontiguousarray(x, dtype=self.input_dtype)


def quantize_values(x: np.ndarray, params: QuantParams, dtype: np.dtype) -> np.ndarray:
    """Real values to an integer tensor: round(x / scale) + zero_point, clipped to dtype.

    Rounds half away from zero, like TFLite's own Quantize kernel.
    """
    scale, zero_point = params
    scaled = np.asarray(x, dtype=np.float32) / np.float32(scale)
    rounded = np.trunc(scaled + np.copysign(np.float32(0.5), scaled)) + zero_point
    info = np.iinfo(dtype)
    return np.clip(rounded, info.min, info.max).astype(dtype)


def dequantize_values(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """An integer tensor to real values: scale * (q - zero_point), as float32."""
    scale, zero_point = params
    return (np.float32(scale) * (q.astype(np.float32) - np.float32(zero_point))).astype(np.float32)


def open_artifact(
    path: Path | str, threads: int = 1, xnnpack: bool = True, onnx_provider: Optional[str] = None
) -> ArtifactRunner:
    """Load a .tflite or .onnx file with its runtime.

    Args:
        path: The artifact.
        threads: Threads the runtime may use (0: the runtime's default).
        xnnpack: TFLite: let LiteRT apply its default XNNPACK delegate (False: its
            builtin kernels only, `OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`).
        onnx_provider: ONNX: the execution provider (default CPUExecutionProvider).

    Returns:
        A runner for the artifact.

    Raises:
        OptionError: An execution provider this onnxruntime does not have.
        CompressorError: Missing file, unknown extension, or a file the runtime rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"artifact not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CompressorError(
            f"cannot run {path.name}: expected a .tflite or .onnx file, got '{path.suffix}'"
        )
    try:
        if fmt == "tflite":
            return _open_tflite(path, threads, xnnpack)
        return _open_onnx(path, threads, check_onnx_provider(onnx_provider))
    except CompressorError:
        raise
    except Exception as exc:  # the runtimes raise assorted types for a bad file
        raise CompressorError(f"{fmt} runtime could not load {path}: {first_line(exc)}") from exc


def _single(items: list[Any], what: str, path: Path) -> Any:
    if len(items) != 1:
        raise CompressorError(
            f"{path.name} has {len(items)} {what}s; only single-input, single-output "
            "artifacts are supported"
        )
    return items[0]


def check_onnx_provider(name: Optional[str]) -> str:
    """The execution provider to run ONNX artifacts on: `name`, checked, or the default.

    Raises:
        OptionError: `name` is not one of `onnxruntime.get_available_providers()`.
    """
    if name is None:
        return DEFAULT_ONNX_PROVIDER
    import onnxruntime as ort

    available = ort.get_available_providers()
    if name not in available:
        raise OptionError("{onnx_provider} {name!r} is not available in onnxruntime {version} here; it has: {known}",
                          name=name, version=ort.__version__, known=", ".join(available))
    return name


def _open_tflite(path: Path, threads: int, xnnpack: bool) -> ArtifactRunner:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with muted_stderr():  # LiteRT announces its XNNPACK delegate on fd 2
        start = time.perf_counter_ns()
        interpreter = Interpreter(
            model_path=str(path), num_threads=threads or None, experimental_op_resolver_type=resolver
        )
        interpreter.allocate_tensors()
        init_ms = (time.perf_counter_ns() - start) / 1e6
    inp = _single(interpreter.get_input_details(), "input", path)
    out = _single(interpreter.get_output_details(), "output", path)
    signature = tuple(int(d) for d in inp.get("shape_signature", inp["shape"]))
    shape = tuple(None if d < 0 else d for d in signature)
    state = {"batch": int(inp["shape"][0]), "resizable": shape[0] is None}
    out_params = _tflite_quantization(out)

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        return dequantize_values(result, out_params) if out_params else result.copy()

    def invoke(x: np.ndarray) -> np.ndarray:
        if x.shape[0] != state["batch"] and state["resizable"]:
            try:
                interpreter.resize_tensor_input(inp["index"], list(x.shape))
                interpreter.allocate_tensors()
                state["batch"] = x.shape[0]
            except Exception:  # some graphs bake the batch into a Reshape: run one by one
                state["resizable"] = False
                interpreter.resize_tensor_input(inp["index"], [state["batch"], *x.shape[1:]])
                interpreter.allocate_tensors()
        if x.shape[0] != state["batch"]:
            return np.concatenate([run(x[i : i + state["batch"]]) for i in range(0, len(x), state["batch"])])
        return run(x)

    return ArtifactRunner(
        path, "tflite", shape, np.dtype(inp["dtype"]), invoke,
        output_dtype=np.dtype(out["dtype"]),
        input_quantization=_tflite_quantization(inp),
        output_quantization=out_params,
        init_ms=init_ms,
        delegate=XNNPACK if xnnpack else NO_DELEGATE,
    )


def _tflite_quantization(detail: dict) -> Optional[QuantParams]:
    """(scale, zero_point) of a quantized integer tensor; None for float or plain integer ones."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer) or not scale > 0:
        return None  # a scale of 0 marks an unquantized tensor (e.g. int32 token ids)
    return float(scale), int(zero_point)


_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def _open_onnx(path: Path, threads: int, provider: str) -> ArtifactRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    start = time.perf_counter_ns()
    session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    init_ms = (time.perf_counter_ns() - start) / 1e6
    inp = _single(session.get_inputs(), "input", path)
    out = _single(session.get_outputs(), "output", path)
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
    dtype = np.dtype(_ONNX_DTYPES.get(inp.type, np.float32))
    name = inp.name

    def invoke(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    # Quantized ONNX models (QDQ) keep float inputs and outputs: nothing to convert.
    output_dtype = np.dtype(_ONNX_DTYPES.get(out.type, np.float32))
    return ArtifactRunner(path, "onnx", shape, dtype, invoke, output_dtype=output_dtype, init_ms=init_ms,
                          provider=session.get_providers()[0])
