"""`compressor.compress`: the `compress` command as a Python call, on a model and data in memory or in files.

    import compressor

    result = compressor.compress(model, data=(x_val, y_val), method="fixed_loss", max_acc_loss=0.02, out="build")
    result.status                  # "ok" or "budget_not_met"
    result.model                   # the compressed keras.Model
    result.artifacts["tflite"]     # build/model.tflite

The keywords are the options of `compress` (`compressor.config.CompressOptions`), named
as in Python: `--max-acc-loss 0.02` is `max_acc_loss=0.02`, `--techniques channels,tucker`
is `techniques=("channels", "tucker")` (or the string). Errors name them that way too.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from compressor.api.inputs import as_dataset, as_model, data_name, is_path, model_name
from compressor.config import CLASS_METRICS, DATA_KEYS, CompressOptions, InMemory, check_names
from compressor.errors import OptionError, python_name
from compressor.option_fields import declared, help_text
from compressor.pipeline.context import Log, Progress

if TYPE_CHECKING:
    import keras

_EXPLICIT = ("out", *DATA_KEYS)  # parameters of `compress` itself; the other options come as **options


@dataclass(frozen=True)
class CompressResult:
    """What one `compress` call made.

    Attributes:
        model: The compressed Keras model (the one the `.keras` artifact holds).
        report: report.json as a dict (schema in the README).
        artifacts: Artifact paths by kind: "tflite", "onnx", "keras", and for quantized
            ones the mode and format, e.g. "int8.tflite" (as the file name ends).
        out: The output folder.
    """

    model: keras.Model
    report: Mapping[str, Any]
    artifacts: Mapping[str, Path]
    out: Path

    @property
    def status(self) -> str:
        """"ok", or "budget_not_met" (the best candidate is still written)."""
        return self.report["status"]

    @property
    def budget_met(self) -> Optional[bool]:
        """Whether the budget held on the artifact it is measured on (None: a replay without one)."""
        return self.report["budget"]["met"]


def compress(model: Any, data: Any = None, *, test_data: Any = None, train_data: Any = None, out: Any = None,
             progress: Optional[Progress] = None, log: Optional[Log] = None, **options: Any) -> CompressResult:
    """Compress a model under a budget; write, verify and time its artifacts in `out`.

    Args:
        model: A keras.Model (Functional or Sequential), or the path of a model file.
        data: Labelled data for the search: a path (.npz, image folder), a
            `pkg.module:function` hook, `(x, y)` arrays, `x` alone, a tf.data.Dataset of
            (x, y), or a compressor.Dataset. Needed by `method="fixed_loss"`.
        test_data: Held-out data the result is measured on (the same kinds).
        train_data: Data to fine-tune, train gates and calibrate int8 on (the same kinds).
        out: The output folder; None writes into a new folder under the system's temporary one.
        progress: Called as `progress(stage, done, total)` while the run works.
        log: Called with a line at each step.
        **options: The other options of `compress` (listed below), e.g.
            `method="fixed_params", compression_factor=0.5, techniques=("channels",)`.

    Returns:
        The compressed model, the report, and the artifacts' paths.

    Raises:
        OptionError: An unknown, invalid or contradictory option.
        CompressorError: A model, data or artifact problem (subclasses say which).
    """
    from compressor.graph.signature import sample_shapes
    from compressor.pipeline import Inputs, compress_model

    given = {"data": data, "test_data": test_data, "train_data": train_data}
    in_memory = {key: value for key, value in given.items() if value is not None and not is_path(value)}
    stand_ins = {key: InMemory(data_name(key, value)) if key in in_memory else value for key, value in given.items()}
    run = _options(model, _output_folder(out), {**stand_ins, **_keywords(options)})
    keras_model = as_model(model, run.custom_objects, run.allow_model_code)
    shape = sample_shapes(keras_model)
    numeric = run.metric_name not in CLASS_METRICS  # mse, mae, a hook: y holds numbers, not classes
    inputs = Inputs(model=keras_model, **{key: as_dataset(key, value, shape, numeric) for key, value in in_memory.items()})
    report, compressed = compress_model(run, progress, log, inputs)
    return CompressResult(compressed, report, artifact_paths(report), Path(run.out))


def artifact_paths(report: Mapping[str, Any]) -> dict[str, Path]:
    """The artifacts of a compress report by kind: "tflite", "onnx", "keras", "int8.tflite", ..."""
    paths = {}
    for entry in report["artifacts"]:
        mode = entry.get("quantize", "none")
        paths[entry["format"] if mode == "none" else f"{mode}.{entry['format']}"] = Path(entry["path"])
    return paths


def _keywords(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options, refusing any that `compress` does not take from Python."""
    known = {item.name for item in declared(CompressOptions, "api")} - set(_EXPLICIT)
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError("unknown option(s) {unknown}; expected some of {known}",
                          unknown=", ".join(unknown), known=", ".join(sorted(known)))
    return dict(options)


def _options(model: Any, out: Path, values: dict[str, Any]) -> CompressOptions:
    """The run's options, checked before any model work: values, budget, technique and format names."""
    run = CompressOptions.parse(model=Path(model) if is_path(model) else InMemory(model_name(model)), out=out, **values)
    run.budget()
    check_names(run)
    return run


def _output_folder(out: Any) -> Path:
    # A fresh name, not a folder: the run creates it only when it gets that far.
    if out is not None:
        return out
    return Path(tempfile.gettempdir()) / f"compressor-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _signature() -> inspect.Signature:
    """compress's signature with every option as a keyword and its default (what `help()` and IDEs show)."""
    base = inspect.signature(compress)
    fixed = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    head, tail = fixed[:-2], fixed[-2:]  # progress and log go last
    keywords = [
        inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=item.annotation)
        for item in declared(CompressOptions, "api") if item.name not in _EXPLICIT
    ]
    return base.replace(parameters=[*head, *keywords, *tail])


def _options_doc() -> str:
    lines = ["", "    Options:"]
    for item in declared(CompressOptions, "api"):
        if item.name not in _EXPLICIT:
            lines.append(f"        {item.name} (default {item.default!r}): {help_text(item.spec, python_name)}")
    return "\n".join(lines) + "\n"


compress.__signature__ = _signature()  # type: ignore[attr-defined]
compress.__doc__ = (compress.__doc__ or "") + _options_doc()
