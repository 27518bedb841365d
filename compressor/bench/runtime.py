"""Run exported artifacts with the edge runtimes: LiteRT for .tflite, onnxruntime for .onnx.

A TFLite artifact with int8 (or uint8) input and output tensors still takes float
data and returns float scores: `ArtifactRunner.prepare` quantizes the inputs with the
input tensor's scale and zero point (once, outside any timed loop), and `invoke`
dequantizes the output, so accuracy is computed as for a float artifact while the
timed graph runs on integer inputs.

An artifact with several inputs or outputs is fed and read by name (the TFLite
signature's names, the ONNX graph's; the Keras names when this package exported it):
its inputs are a dict name -> array, and `predict_outputs` returns every output.

This module must not import TensorFlow or Keras: it is what runs on a target board,
where only numpy, ai-edge-litert and onnxruntime are installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from compressor.errors import CompressorError, OptionError, first_line
from compressor.quiet import muted_stderr

FORMATS = {".tflite": "tflite", ".onnx": "onnx"}

DEFAULT_ONNX_PROVIDER = "CPUExecutionProvider"
XNNPACK = "xnnpack"
NO_DELEGATE = "none"

QuantParams = tuple[float, int]
"""(scale, zero_point) of an integer tensor: real = scale * (q - zero_point)."""

Batch = Union[np.ndarray, dict]
"""Inputs of one call: an array, or (several inputs) a dict input name -> array."""


@dataclass(frozen=True)
class TensorInfo:
    """One named input of an artifact: shape (None for dynamic dimensions, batch first), dtype, quantization."""

    name: str
    shape: tuple[Optional[int], ...]
    dtype: np.dtype
    quantization: Optional[QuantParams] = None


@dataclass
class ArtifactRunner:
    """One loaded artifact, ready to run.

    Attributes:
        path: The artifact file.
        format: "tflite" or "onnx".
        input_shape: Input shape with None for dynamic dimensions (batch first); the
            first input's for several inputs.
        input_dtype: numpy dtype the artifact expects (int8 for an int8-I/O model).
        invoke: Runs one prepared batch (see `prepare`); returns the first output,
            dequantized to float32 when the artifact outputs a quantized tensor.
        inputs: Every input by name, in the artifact's order (one for most artifacts).
        output_names: Every output's name, in the artifact's order.
        invoke_outputs: Runs one prepared batch; returns every output by name.
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
    inputs: tuple[TensorInfo, ...] = ()
    output_names: tuple[str, ...] = ()
    invoke_outputs: Optional[Callable[[Batch], dict[str, np.ndarray]]] = field(default=None, repr=False)

    @property
    def multi_input(self) -> bool:
        """Whether the artifact takes several inputs (fed as a dict by name)."""
        return len(self.inputs) > 1

    @property
    def quantized_io(self) -> bool:
        """Whether the artifact takes or returns quantized integer tensors."""
        return self.input_quantization is not None or self.output_quantization is not None

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size baked into the artifact, or None when it is dynamic."""
        return self.input_shape[0] if self.input_shape else None

    def predict(self, x: Batch, batch_size: int = 64, output: Optional[str] = None) -> np.ndarray:
        """Run any number of samples, in batches the artifact accepts.

        Args:
            x: Inputs, batch first, with the artifact's per-sample shape (a dict by
                input name for several inputs).
            batch_size: Batch used when the artifact's batch is dynamic.
            output: The output to return, by name; None: the first.

        Returns:
            That output for all samples, concatenated.

        Raises:
            CompressorError: The samples do not fit the artifact's input shape.
        """
        if output is None and self.invoke_outputs is None:
            return self._predict(self.invoke, x, batch_size)
        return self.predict_outputs(x, batch_size)[output or self.output_names[0]]

    def predict_outputs(self, x: Batch, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Every output for all samples, by output name (see `predict`)."""
        if self.invoke_outputs is None:
            return {self.output_names[0] if self.output_names else "output": self.predict(x, batch_size)}
        run = self.invoke_outputs
        parts = self._predict(lambda batch: [run(batch)[name] for name in self.output_names], x, batch_size)
        return dict(zip(self.output_names, parts))

    def _predict(self, run: Callable[[Batch], Any], x: Batch, batch_size: int) -> Any:
        x = self.prepare(x)
        n = _count(x)
        step = self.fixed_batch or batch_size
        outputs = []
        for i in range(0, n, step):
            chunk = _rows(x, slice(i, i + step))
            size = _count(chunk)
            if self.fixed_batch and size < step:
                # A fixed batch takes only full batches: pad the last one, drop the padding.
                padded = _map(chunk, lambda a: np.concatenate([a, np.repeat(a[-1:], step - size, axis=0)]))
                outputs.append(_map_out(run(padded), lambda a: a[:size]))
            else:
                outputs.append(run(chunk))
        if isinstance(outputs[0], list):
            return [np.concatenate([out[k] for out in outputs], axis=0) for k in range(len(outputs[0]))]
        return np.concatenate(outputs, axis=0)

    def prepare(self, x: Batch) -> Batch:
        """Check the per-sample shape and convert to what `invoke` takes.

        For a quantized integer input, data in any other dtype holds the model's
        real input values and is quantized with the input's scale and zero point;
        data already in the input's dtype is taken as quantized. An artifact with
        several inputs takes a dict by input name and gets one.
        """
        if not self.multi_input:
            if isinstance(x, dict):
                if len(x) != 1:
                    raise CompressorError(f"{self.path.name} takes one input, got arrays {', '.join(x)}")
                x = next(iter(x.values()))
            info = self.inputs[0] if self.inputs else TensorInfo("input", self.input_shape, self.input_dtype,
                                                                  self.input_quantization)
            return _prepare_one(info, x, self.path, "")
        if not isinstance(x, dict):
            raise CompressorError(f"{self.path.name} takes inputs {', '.join(i.name for i in self.inputs)}; "
                                  "give one array per input, by name")
        missing = [info.name for info in self.inputs if info.name not in x]
        if missing:
            raise CompressorError(f"{self.path.name} takes input {missing[0]!r}, which the data does not have "
                                  f"(it has {', '.join(x)})")
        return {info.name: _prepare_one(info, x[info.name], self.path, f" for input {info.name!r}")
                for info in self.inputs}


def _prepare_one(info: TensorInfo, x: Any, path: Path, which: str) -> np.ndarray:
    x = np.asarray(x)
    expected = info.shape[1:]
    got = tuple(x.shape[1:])
    if len(expected) != len(got) or any(e not in (None, g) for e, g in zip(expected, got)):
        raise CompressorError(
            f"data samples have shape {got}{which} but {path.name} expects "
            f"{tuple('?' if d is None else d for d in expected)}"
        )
    if info.quantization is not None and x.dtype != info.dtype:
        return np.ascontiguousarray(quantize_values(x, info.quantization, info.dtype))
    return np.ascontiguousarray(x, dtype=info.dtype)


def _count(x: Batch) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _rows(x: Batch, index: Any) -> Batch:
    return {name: values[index] for name, values in x.items()} if isinstance(x, dict) else x[index]


def _map(x: Batch, function: Callable[[np.ndarray], np.ndarray]) -> Batch:
    return {name: function(values) for name, values in x.items()} if isinstance(x, dict) else function(x)


def _map_out(outputs: Any, function: Callable[[np.ndarray], np.ndarray]) -> Any:
    return [function(o) for o in outputs] if isinstance(outputs, list) else function(outputs)


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
    ins, outs = _tflite_io(interpreter)
    inputs = tuple(_tflite_info(name, detail) for name, detail in ins)
    out_params = {name: _tflite_quantization(detail) for name, detail in outs}
    first = ins[0][1]
    state = {"batch": int(first["shape"][0]), "resizable": inputs[0].shape[0] is None}

    def feed(x: Batch) -> None:
        for name, detail in ins:
            interpreter.set_tensor(detail["index"], x[name] if isinstance(x, dict) else x)

    def run(x: Batch) -> dict[str, np.ndarray]:
        feed(x)
        interpreter.invoke()
        results = {}
        for name, detail in outs:
            result = interpreter.get_tensor(detail["index"])
            results[name] = dequantize_values(result, out_params[name]) if out_params[name] else result.copy()
        return results

    def resize(batch: int, x: Batch) -> None:
        for name, detail in ins:
            values = x[name] if isinstance(x, dict) else x
            interpreter.resize_tensor_input(detail["index"], [batch, *values.shape[1:]])
        interpreter.allocate_tensors()

    def invoke_outputs(x: Batch) -> dict[str, np.ndarray]:
        size = _count(x)
        if size != state["batch"] and state["resizable"]:
            try:
                resize(size, x)
                state["batch"] = size
            except Exception:  # some graphs bake the batch into a Reshape: run one by one
                state["resizable"] = False
                resize(state["batch"], x)
        if size != state["batch"]:
            parts = [run(_rows(x, slice(i, i + state["batch"]))) for i in range(0, size, state["batch"])]
            return {name: np.concatenate([part[name] for part in parts]) for name, _ in outs}
        return run(x)

    first_output = outs[0][0]
    invoke = lambda x: invoke_outputs(x)[first_output]  # noqa: E731
    if len(ins) == 1 and len(outs) == 1:  # the common case, lean: this is what the timed loop calls
        in_index, out_index, out_param = first["index"], outs[0][1]["index"], out_params[first_output]

        def run_one(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(in_index, x)
            interpreter.invoke()
            result = interpreter.get_tensor(out_index)
            return dequantize_values(result, out_param) if out_param else result.copy()

        def invoke(x: np.ndarray) -> np.ndarray:
            if x.shape[0] != state["batch"]:
                return invoke_outputs(x)[first_output]
            return run_one(x)

    return ArtifactRunner(
        path, "tflite", inputs[0].shape, inputs[0].dtype, invoke,
        output_dtype=np.dtype(outs[0][1]["dtype"]),
        input_quantization=inputs[0].quantization,
        output_quantization=out_params[first_output],
        init_ms=init_ms,
        delegate=XNNPACK if xnnpack else NO_DELEGATE,
        inputs=inputs,
        output_names=tuple(name for name, _ in outs),
        invoke_outputs=invoke_outputs if len(outs) > 1 else None,
    )


def _tflite_io(interpreter: Any) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(name, tensor detail) of each input and output: the signature's names when the file has one signature.

    The interpreter lists tensors in its own order (a two-input model may list its
    second input first); the signature names them.
    """
    signatures = interpreter.get_signature_list()
    if len(signatures) == 1:
        key = next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        order = signatures[key]
        ins = [(name, ins[name]) for name in order["inputs"]]
        outs = [(name, outs[name]) for name in order["outputs"]]
        if ins and outs:
            return ins, outs
    return ([(d["name"], d) for d in interpreter.get_input_details()],
            [(d["name"], d) for d in interpreter.get_output_details()])


def _tflite_info(name: str, detail: dict) -> TensorInfo:
    signature = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
    shape = tuple(None if d < 0 else d for d in signature)
    return TensorInfo(name, shape, np.dtype(detail["dtype"]), _tflite_quantization(detail))


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
    inputs = tuple(
        TensorInfo(i.name, tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape),
                   np.dtype(_ONNX_DTYPES.get(i.type, np.float32)))
        for i in session.get_inputs()
    )
    outs = session.get_outputs()
    names = [o.name for o in outs]

    def invoke_outputs(x: Batch) -> dict[str, np.ndarray]:
        feed = x if isinstance(x, dict) else {inputs[0].name: x}
        return dict(zip(names, session.run(names, feed)))

    if len(inputs) == 1 and len(outs) == 1:
        name = inputs[0].name

        def invoke(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]
    else:
        def invoke(x: Batch) -> np.ndarray:
            return invoke_outputs(x)[names[0]]

    # Quantized ONNX models (QDQ) keep float inputs and outputs: nothing to convert.
    output_dtype = np.dtype(_ONNX_DTYPES.get(outs[0].type, np.float32))
    return ArtifactRunner(path, "onnx", inputs[0].shape, inputs[0].dtype, invoke, output_dtype=output_dtype,
                          init_ms=init_ms, provider=session.get_providers()[0], inputs=inputs,
                          output_names=tuple(names), invoke_outputs=invoke_outputs if len(outs) > 1 else None)
