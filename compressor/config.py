"""The options of `compress`, declared once: fields of `CompressOptions`, validated at construction.

Each field made with `option(...)` (see `compressor.option_fields`) is a flag of
`compress`, a key of its config file and a keyword of `compressor.compress`, with one
help line, one parser and one check. A TOML file (`--config compress.toml`) uses the
flags' names, with dashes or underscores; flags given on the command line win over it
(`compressor.config_file.build_options`, which also keeps the opt-ins to running code
on the command line):

    method = "fixed_loss"
    max-acc-loss = 0.02
    techniques = "tucker,sparsity"     # or a list: ["tucker", "sparsity"]
    pruning-structure = "2:4"
    export = ["tflite", "onnx"]
    quantize = "int8"

examples/compress.toml lists every key (tested) except those opt-ins.

Messages name options as `{placeholders}` (`compressor.errors.OptionError`): the
Python API words them `max_acc_loss=`; `build_options`, the command line's and the
config file's way in, raises ConfigError, which words them `--max-acc-loss`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

from compressor.errors import OptionError, flag_name
from compressor.option_fields import (
    as_path,
    block_shape,
    boolean,
    check_values,
    declared,
    integer,
    list_of,
    lowercase,
    names,
    number,
    one_of,
    open_fraction,
    option,
    parse_block_size,
    parse_values,
    path,
    text,
)
from compressor.surgery.plan import STRUCTURES, PlanError
from compressor.techniques.registry import AUTO, CRITERIA, parse_techniques, techniques_help  # names only: no TensorFlow

METHODS = ("fixed_loss", "fixed_params")
BUDGET_ON = ("params", "flops")
# Kept in step with compressor.export.quantize.QUANTIZE_MODES (tested).
QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
DATA_KEYS = ("data", "test_data", "train_data")
CLASS_METRICS = ("top1", "top5", "agreement")  # kept in step with compressor.metrics (tested)
BUILTIN_METRICS = ("top1", "top5", "mse", "mae", "agreement")
DISTRIBUTE = ("none", "mirrored")
"""Where fine-tuning runs: TensorFlow's default device, or every local device under MirroredStrategy."""
_N_M = re.compile(r"\d+:\d+")
_HOOK = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class ConfigError(OptionError):
    """Invalid options from the command line or a config file: the message names options as flags."""

    def __str__(self) -> str:
        return self.render(flag_name)


@dataclass(frozen=True)
class InMemory:
    """An input given as a Python object rather than a file: a Keras model, arrays, a tf.data.Dataset.

    The Python API puts the object itself in `compressor.pipeline.Inputs`; the options
    hold only this stand-in, so they stay plain data that validates ("fixed_loss needs
    data" holds either way), prints and goes into report.json by its name.

    Attributes:
        name: How reports and messages call the input, e.g. "data arrays".
    """

    name: str

    def __str__(self) -> str:
        return self.name


def _data(value: Any) -> Any:
    return str(value) if isinstance(value, (str, os.PathLike)) else value


def _data_check(name: str, value: Any) -> None:
    if not isinstance(value, (str, InMemory)):
        raise OptionError("Invalid {name}. Expected a path, a pkg.module:function hook, or in-memory data. "
                          "Received: {name}={value!r}", name=name, value=value)


def _structure(name: str, value: Any) -> None:
    if isinstance(value, str) and _N_M.fullmatch(value):
        n, m = (int(v) for v in value.split(":"))
        if not 0 < n < m:
            raise OptionError("Invalid N:M structure. Expected 0 < N < M. Received: {value}", value=value)
    elif value not in STRUCTURES:
        raise OptionError("Invalid pruning structure. Expected one of {structures} or N:M (e.g. 2:4). "
                          "Received: pruning_structure={value!r}", structures=STRUCTURES, value=value)


def _gating_target(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OptionError("Invalid gating target. Expected a fraction of compute in (0, 1]. "
                          "Received: gating_target={value!r}", value=value)


def _confidence(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value < 1:
        raise OptionError("Invalid confidence. Expected 0.5 <= C < 1 (0.95 = 95%). Received: confidence={value!r}",
                          value=value)


def _metric_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not (value.strip().lower() in BUILTIN_METRICS or _HOOK.fullmatch(value.strip())):
        raise OptionError("Invalid metric. Expected one of {known} or pkg.module:function. Received: metric={value!r}",
                          known=", ".join(BUILTIN_METRICS), value=value)


_DATA = dict(cli_type=str, parse=_data, check=_data_check)
_OUTPUT_STYLE = ("cli", "file")  # how the command line prints; the Python API returns, never prints


@dataclass(frozen=True)
class CompressOptions:
    """Everything one `compress` run needs; see `compress --help`, or the `help` of each field.

    `model` is the run's subject (the command's argument, the API's first argument): a
    path, or an `InMemory` stand-in for a model given as an object.
    """

    model: Union[Path, InMemory]
    out: Path = option(help="Output folder.", flags=("--out", "-o"), parse=as_path, check=path)
    data: Optional[Union[str, InMemory]] = option(
        None, help="Labelled data for the search (.npz, image folder, or pkg.module:function); needed by fixed_loss.", **_DATA)
    test_data: Optional[Union[str, InMemory]] = option(
        None, help="Held-out data the final accuracy is measured on (default: a stratified split of {data}).", **_DATA)
    test_fraction: float = option(
        0.5, help="fixed_loss without {test_data}: the fraction of {data} held out to measure the result on (default 0.5).",
        check=open_fraction("test fraction"))
    train_data: Optional[Union[str, InMemory]] = option(
        None, help="Data to fine-tune on (and to gather scores/K-FAC statistics on); needed by {finetune_epochs}.", **_DATA)
    method: Optional[str] = option(
        None, help="fixed_loss (stay within {max_acc_loss}) or fixed_params (keep {compression_factor} of the cost).",
        check=one_of(METHODS, "method"))
    max_acc_loss: Optional[float] = option(
        None, help="fixed_loss: largest top-1 accuracy drop, as a fraction (0.02 = 2 points).",
        check=number("max accuracy loss"))
    metric: str = option(
        "top1", help="What the budget measures: top1 (default), top5, mse, mae (relative to the original's error), "
        "agreement (top-1 agreement with the original; needs no labels), or a pkg.module:function(y_true, y_pred) "
        "-> float hook.", check=_metric_name)
    max_metric_loss: Optional[float] = option(
        None, help="fixed_loss: largest loss of {metric}, in its unit: points of accuracy (0.02) for top1, top5 and "
        "agreement, the relative increase of the error (0.05 = 5% more than the original's) for mse and mae, the "
        "absolute change for a hook.", check=number("max metric loss", minimum=0))
    metric_higher_is_better: Optional[bool] = option(
        None, help="With a {metric} hook: whether larger values are better (required for a hook).",
        flags=("--metric-higher-is-better/--metric-lower-is-better",), check=boolean)
    metric_output: Optional[str] = option(
        None, help="The output {metric} reads, by name (default: the model's only output).", check=text("metric output"))
    confidence: float = option(
        0.95, help="fixed_loss: a model is kept only when its accuracy drop is within {max_acc_loss} with this "
        "one-sided confidence, measured on the guard split (default 0.95).", check=_confidence)
    guard_fraction: float = option(
        0.5, help="fixed_loss: the fraction of the search data set aside for accepting models; the search itself "
        "never sees it (default 0.5).", check=open_fraction("guard fraction"))
    guard_chance: float = option(
        0.8, help="fixed_loss with channels: a pruning step is shown to the guard only when the guard can be expected "
        "to accept it with this chance; its first rejection ends the search, so higher trades fine-tuning time for "
        "fewer early ends (default 0.8).", check=open_fraction("guard chance"))
    compression_factor: Optional[float] = option(
        None, help="fixed_params: fraction of params (or FLOPs) kept, 0 < F < 1.", check=number("compression factor"))
    budget_on: str = option("params", help="fixed_params: params (default) or flops.", check=one_of(BUDGET_ON, "budget-on"))
    techniques: tuple[str, ...] = option(
        (AUTO,), help=techniques_help(), cli_type=str, parse=list_of("techniques"), check=names("techniques"))
    criterion: str = option(
        "magnitude", help="Channel/weight importance: magnitude (default), snip, synflow, fpgm, hessian.",
        check=one_of(CRITERIA, "criterion"))
    finetune_epochs: int = option(
        0, help="Fine-tune the compressed model this many epochs (per pruning step) with the original as teacher; "
        "needs {train_data}.", check=integer(0, "finetune epochs"))
    finetune_steps: Optional[int] = option(
        None, help="At most N optimizer steps per fine-tuning run (each pruning step's, the final one's, a replay's): "
        "{finetune_epochs} passes over {train_data} cut off at N steps; the search data is then checked every N/4 "
        "steps for the early stop too (default: no cap).", check=integer(1, "finetune steps"))
    finetune_lr: float = option(
        1e-3, help="Fine-tuning's initial learning rate (Adam, cosine decay to 0 over each run's steps; default 0.001).",
        check=number("finetune lr", above=0))
    time_limit: Optional[float] = option(
        None, help="Minutes the channel search may run from the start of compress: it begins no fine-tuning run it "
        "expects to end later (a step is expected to take as long as the longest so far up to its first check) and "
        "keeps the last model it accepted; export and timing come after (default: no limit).", check=number("time limit", above=0))
    distribute: str = option(
        "none", help="Fine-tune on: none (default: TensorFlow's default device) or mirrored (every local GPU, "
        "tf.distribute.MirroredStrategy).", parse=lowercase, check=one_of(DISTRIBUTE, "distribute"))
    max_channel_fraction: float = option(
        0.9, help="Most of a channel group that may be removed (default 0.9).", check=open_fraction("max channel fraction"))
    channel_multiple: int = option(
        1, help="Channel pruning: every group left wider than N keeps a multiple of N channels, the tile the "
        "target's kernels compute channels in (16 for XNNPACK float on AVX-512, often 8 on ARM; "
        "benchmarks/channel_tiles.py measures it); default 1: any count.", check=integer(1, "channel multiple"))
    pruning_structure: str = option(
        "unstructured", help="Sparsity pattern: unstructured (default), filter, channel, block, or N:M such as 2:4.",
        parse=lowercase, check=_structure)
    block_size: Optional[tuple[int, int]] = option(
        None, help="Block for {pruning_structure} block, e.g. 2,2.", cli_type=str, parse=parse_block_size, check=block_shape)
    export: tuple[str, ...] = option(
        ("tflite", "onnx", "keras"), help="Artifacts to write: tflite,onnx,keras (default: all).", cli_type=str,
        parse=list_of("export"), check=names("export"))
    plan: Optional[Path] = option(
        None, help="Re-apply a plan.json to the original model instead of searching.", parse=as_path, check=path)
    seed: int = option(0, help="Seed for the data split and generated inputs (default 0).", check=integer(0, "seed"))
    cache_dir: Optional[Path] = option(
        None, help="Where kernel-error curves and sensitivity tables are cached (default ~/.cache/compressor).", parse=as_path, check=path)
    runs: int = option(50, help="Timed runs per artifact (default 50).", check=integer(1, "runs"))
    warmup: int = option(5, help="Untimed runs per artifact before the timed ones (default 5).", check=integer(0, "warmup"))
    threads: int = option(1, help="Runtime threads when timing (default 1).", check=integer(0, "threads"))
    atol: float = option(
        1e-4, help="Largest absolute output difference a float artifact may show against its Keras model (default 1e-4).",
        check=number("atol", minimum=0))
    quantize: str = option(
        "none", help="Also write quantized tflite/onnx artifacts: none (default), dynamic (int8 weights), float16, int8 "
        "(full integer, calibrated); the budget is measured on the quantized artifact.",
        parse=lowercase, check=one_of(QUANTIZE_MODES, "quantization mode"))
    calibration_samples: int = option(
        200, help="Samples that calibrate int8 quantization, from {train_data} (else {data}); default 200.",
        check=integer(1, "calibration samples"))
    int8_io: bool = option(
        False, help="With {quantize} int8: int8 input and output tensors in the TFLite artifact (default float).",
        flags=("--int8-io/--float-io",), check=boolean)
    gating_target: float = option(
        0.6, help="With {techniques} ...,gating: fraction of the compute each input should run on average, 0 < T <= 1 "
        "(default 0.6).", check=_gating_target)
    gating_epochs: int = option(
        5, help="Epochs of gate training on {train_data} (default 5).", check=integer(1, "gating epochs"))
    gating_network: bool = option(
        True, help="Train the network's weights along with the gates (default), or the gates alone.",
        flags=("--gating-network/--gates-only",), check=boolean)
    overwrite: bool = option(False, help="Replace earlier results in {out} (refused otherwise).", check=boolean)
    custom_objects: tuple[str, ...] = option(
        (), help="Python module to import first, which registers custom layers "
        "(@keras.saving.register_keras_serializable). Repeatable.",
        cli_type=list[str], parse=list_of("custom_objects", lower=False), check=names("custom objects"))
    allow_model_code: bool = option(
        False, help="Run Python code stored in the model file (e.g. Lambda layers); only for models you trust.",
        check=boolean, where=("cli", "api"))
    quiet: bool = option(
        False, help="No progress or tables; errors only (the exit code and report.json tell the rest).",
        flags=("--quiet", "-q"), check=boolean, where=_OUTPUT_STYLE)
    json: bool = option(
        False, help="Print the report as one JSON document on stdout instead of tables.", check=boolean, where=_OUTPUT_STYLE)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike, InMemory)):
            raise OptionError("Invalid model. Expected a path or an in-memory model. Received: model={value!r}",
                              value=self.model)
        check_values(self)
        self._check_method()
        try:  # technique names come from the registry (no TensorFlow)
            parse_techniques(self.techniques)
        except PlanError as exc:
            raise OptionError(str(exc)) from None
        if self.pruning_structure == "block" and self.block_size is None:
            raise OptionError("pruning structure block needs {block_size} ROWS,COLS (e.g. 2,2)")
        if self.finetune_epochs and self.train_data is None:
            raise OptionError("{finetune_epochs} needs {train_data} (the data the compressed model is fine-tuned on)")
        if self.finetune_steps is not None and not self.finetune_epochs:
            raise OptionError("{finetune_steps} caps the steps of fine-tuning: it needs {finetune_epochs} as well")
        self._check_quantization()
        self._check_gating()
        if "blocks" in self.techniques and self.plan is None and self.method != "fixed_loss":
            raise OptionError("{techniques} blocks removes residual blocks while the accuracy holds: it needs "
                              "{method} fixed_loss")
        self._check_exits()

    @classmethod
    def parse(cls, **values: Any) -> "CompressOptions":
        """Options from raw values (flag text, TOML values, Python keywords), each read by its option's parser.

        Lists may be "a,b" or sequences, paths str or Path, a block size "2,2" or (2, 2).

        Raises:
            OptionError: An unknown option name, or an invalid or contradictory value.
        """
        known = {item.name for item in declared(cls)}
        unknown = sorted(set(values) - known - {"model"})
        if unknown:
            raise OptionError("unknown option(s) {unknown}; expected some of {known}",
                              unknown=", ".join(unknown), known=", ".join(sorted(known)))
        parsed = parse_values(cls, values)
        if isinstance(parsed.get("model"), str):
            parsed["model"] = Path(parsed["model"])
        return cls(**parsed)

    def _check_method(self) -> None:
        if self.method is None and self.plan is None:
            raise OptionError("choose a method: {method} fixed_loss or fixed_params (or replay a {plan})")
        self._check_metric()
        if self.method == "fixed_loss":
            if self.max_acc_loss is None and self.max_metric_loss is None:
                if self.metric_name in CLASS_METRICS:
                    raise OptionError("method fixed_loss needs {max_acc_loss} (e.g. 0.02 for 2 points)")
                raise OptionError("method fixed_loss needs {max_metric_loss} for {metric} {name} (e.g. 0.05)",
                                  name=self.metric)
            if self.data is None:
                raise OptionError("method fixed_loss needs labelled {data} to measure accuracy on"
                                  if self.metric_name != "agreement" else "method fixed_loss needs {data} (unlabelled "
                                  "is enough for {metric} agreement) to measure agreement on")
        if self.method == "fixed_params" and self.compression_factor is None:
            raise OptionError("method fixed_params needs {compression_factor} (fraction kept, e.g. 0.5)")

    @property
    def metric_name(self) -> str:
        """The metric's built-in name in lower case, or the hook as given."""
        from compressor.metrics import BUILTIN

        return self.metric.strip().lower() if self.metric.strip().lower() in BUILTIN else self.metric.strip()

    def _check_metric(self) -> None:
        """How the metric options go together (`compressor.metrics`), without importing a hook."""
        name = self.metric_name
        if self.max_acc_loss is not None and self.max_metric_loss is not None:
            raise OptionError("give {max_acc_loss} or {max_metric_loss}, not both ({max_acc_loss} is the top-1 "
                              "spelling of {max_metric_loss})")
        if self.max_acc_loss is not None and name not in CLASS_METRICS:
            raise OptionError("{max_acc_loss} is an accuracy budget; metric {name} takes {max_metric_loss} (in its "
                              "unit, see {metric})", name=name)
        if self.metric_higher_is_better is not None and name in BUILTIN_METRICS:
            raise OptionError("{metric_higher_is_better} is for a pkg.module:function metric; {name} has its own "
                              "direction", name=name)
        if self.metric_higher_is_better is None and name not in BUILTIN_METRICS:
            raise OptionError("metric {name} is a function: say which way is better with "
                              "{metric_higher_is_better} (or its opposite)", name=name)
        top1_only = [what for what, used in (("{techniques} blocks", "blocks" in self.techniques),
                                             ("{techniques} channels", "channels" in self.techniques),
                                             ("{techniques} gating", "gating" in self.techniques),
                                             ("{techniques} early-exit", "early-exit" in self.techniques),
                                             ("{finetune_epochs}", self.finetune_epochs > 0)) if used]
        if top1_only and name not in ("top1", "agreement"):
            raise OptionError(" and ".join(top1_only) + " measure top-1 accuracy; metric {name} works with the "
                              "per-layer techniques (leave these out, or use {metric} top1 or agreement)", name=name)

    def metric_spec(self):
        """The run's `compressor.metrics.Metric` (a hook is imported here).

        Raises:
            OptionError: A hook that does not import.
        """
        from compressor.metrics import resolve_metric

        return resolve_metric(self.metric_name, self.metric_higher_is_better)

    def _check_quantization(self) -> None:
        if self.int8_io and self.quantize != "int8":
            raise OptionError("{int8_io} needs {quantize} int8. Received: quantize={mode!r}", mode=self.quantize)
        if self.quantize == "int8" and self.data is None and self.train_data is None:
            raise OptionError("{quantize} int8 calibrates on real inputs: pass {train_data} or {data}")
        if self.quantize != "none" and not {"tflite", "onnx"} & set(self.export):
            raise OptionError("{quantize} {mode} quantizes tflite and onnx artifacts; {export} {formats} has neither",
                              mode=self.quantize, formats=",".join(self.export))

    def _check_gating(self) -> None:
        if "gating" not in self.techniques:
            return
        if self.plan is None and self.train_data is None:
            raise OptionError("{techniques} gating trains the gates: pass {train_data} (labelled)")
        if self.quantize != "none" and "onnx" in self.export:
            raise OptionError(
                "{quantize} {mode} with gating: ONNX quantization does not reach the weights inside the gates' If "
                "branches; pass {export} tflite,keras (TFLite quantizes gated models)", mode=self.quantize)

    def _check_exits(self) -> None:
        if "early-exit" not in self.techniques:
            return
        if "gating" in self.techniques:
            raise OptionError("{techniques} early-exit and gating are two dynamic stages: choose one")
        if self.plan is None and self.method != "fixed_loss":
            raise OptionError("{techniques} early-exit calibrates its exits to an accuracy budget: it needs {method} fixed_loss")
        if self.train_data is None:
            raise OptionError("{techniques} early-exit trains its exits: pass {train_data} (labelled)")
        if self.quantize != "none" and "onnx" in self.export:
            raise OptionError(
                "{quantize} {mode} with early-exit: ONNX quantization does not reach the weights inside the exits' If "
                "branches; pass {export} tflite,keras (TFLite quantizes early-exit models)", mode=self.quantize)

    def budget(self):
        """The Budget of the chosen method, or None when replaying a plan without one."""
        from compressor.search.budgets import Budget

        if self.method == "fixed_loss":
            if self.max_metric_loss is not None and self.metric_name not in CLASS_METRICS:
                return Budget.metric_drop(self.max_metric_loss)
            return Budget.accuracy_drop(self.max_acc_loss if self.max_acc_loss is not None else self.max_metric_loss)
        if self.method == "fixed_params":
            return Budget(self.budget_on, self.compression_factor)
        return None

    def pattern(self):
        """The sparsity pattern template (density is set by the search)."""
        from compressor.surgery.plan import SparsitySpec

        structure = self.pruning_structure
        if _N_M.fullmatch(structure) or structure == "n:m":
            n, m = (int(v) for v in (structure if structure != "n:m" else "2:4").split(":"))
            return SparsitySpec(n / m, "n:m", n=n, m=m)
        return SparsitySpec(1.0, structure, block_size=self.block_size)

    def input_files(self) -> list[Path]:
        """The files this run reads (model, data files, plan), which its outputs must never replace."""
        specs = [self.model, self.plan, self.data, self.test_data, self.train_data]
        return [Path(spec) for spec in specs if isinstance(spec, (str, os.PathLike)) and Path(spec).exists()]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, (Path, InMemory)) else (list(value) if isinstance(value, tuple) else value)
        return out


def check_names(options: CompressOptions) -> None:
    """Check export format names (imports TensorFlow: after the cheap checks; technique names are checked with the options).

    Raises:
        ExportError: An unknown format name.
    """
    from compressor.export.writers import parse_formats

    parse_formats(",".join(options.export))
