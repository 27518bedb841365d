"""The options of `compress`, validated once, from flags and an optional TOML file.

A TOML file (`--config compress.toml`) uses the flags' names, with dashes or
underscores; flags given on the command line win over the file:

    method = "fixed_loss"
    max-acc-loss = 0.02
    techniques = "tucker,sparsity"     # or a list: ["tucker", "sparsity"]
    pruning-structure = "2:4"
    export = ["tflite", "onnx"]
    quantize = "int8"

Every flag has a key (tested); examples/compress.toml lists them all, except the two
opt-ins to running code, which only the command line can give (COMMAND_LINE_ONLY): a
config file may come from a less trusted place (a pull request, a shared CI folder)
than the command that uses it, so options from a file that import Python code
(custom-objects, and data values that are `pkg.module:function` hooks) are refused
unless `--allow-config-code` is on the command line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from compressor.errors import CompressorError
from compressor.surgery.plan import STRUCTURES, PlanError
from compressor.techniques.registry import CRITERIA, parse_techniques  # names only: no TensorFlow

METHODS = ("fixed_loss", "fixed_params")
BUDGET_ON = ("params", "flops")
# Kept in step with compressor.export.quantize.QUANTIZE_MODES (tested).
QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
COMMAND_LINE_ONLY = ("allow_model_code", "allow_config_code")
"""Opt-ins to running code: flags only, never keys of a config file."""
DATA_KEYS = ("data", "test_data", "train_data")


class ConfigError(CompressorError):
    """Options that contradict each other or are out of range."""


@dataclass(frozen=True)
class CompressOptions:
    """Everything one `compress` run needs.

    Attributes mirror the CLI flags; see `compress --help`.
    """

    model: Path
    out: Path
    method: Optional[str] = None
    data: Optional[str] = None
    test_data: Optional[str] = None
    train_data: Optional[str] = None
    max_acc_loss: Optional[float] = None
    compression_factor: Optional[float] = None
    budget_on: str = "params"
    techniques: tuple[str, ...] = ("tucker",)
    pruning_structure: str = "unstructured"
    block_size: Optional[tuple[int, int]] = None
    criterion: str = "magnitude"
    finetune_epochs: int = 0
    max_channel_fraction: float = 0.9
    export: tuple[str, ...] = ("tflite", "onnx", "keras")
    plan: Optional[Path] = None
    seed: int = 0
    cache_dir: Optional[Path] = None
    test_fraction: float = 0.5
    runs: int = 50
    warmup: int = 5
    threads: int = 1
    atol: float = 1e-4
    custom_objects: tuple[str, ...] = ()
    allow_model_code: bool = False
    quantize: str = "none"
    calibration_samples: int = 200
    int8_io: bool = False
    gating_target: float = 0.6
    gating_epochs: int = 5
    gating_network: bool = True
    overwrite: bool = False
    quiet: bool = False
    json: bool = False

    def __post_init__(self) -> None:
        if self.method is None and self.plan is None:
            raise ConfigError(f"choose a method: --method {' or --method '.join(METHODS)} (or replay a --plan)")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"Invalid method. Expected one of {METHODS}. Received: method={self.method!r}")
        if self.method == "fixed_loss":
            if self.max_acc_loss is None:
                raise ConfigError("--method fixed_loss needs --max-acc-loss (e.g. 0.02 for 2 points)")
            if self.data is None:
                raise ConfigError("--method fixed_loss needs labelled --data to measure accuracy on")
        if self.method == "fixed_params" and self.compression_factor is None:
            raise ConfigError("--method fixed_params needs --compression-factor (fraction kept, e.g. 0.5)")
        if self.budget_on not in BUDGET_ON:
            raise ConfigError(f"Invalid budget-on. Expected one of {BUDGET_ON}. Received: budget_on={self.budget_on!r}")
        structure = self.pruning_structure
        if structure not in STRUCTURES and not re.fullmatch(r"\d+:\d+", structure):
            raise ConfigError(
                f"Invalid pruning structure. Expected one of {STRUCTURES} or N:M (e.g. 2:4). "
                f"Received: pruning_structure={structure!r}"
            )
        if structure == "block" and self.block_size is None:
            raise ConfigError("--pruning-structure block needs --block-size ROWS,COLS (e.g. 2,2)")
        try:  # technique names come from compressor.techniques.registry
            parse_techniques(self.techniques)
        except PlanError as exc:
            raise ConfigError(str(exc)) from None
        if self.criterion not in CRITERIA:
            raise ConfigError(f"Invalid criterion. Expected one of {CRITERIA}. Received: criterion={self.criterion!r}")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ConfigError(f"Invalid finetune epochs. Expected an integer >= 0. Received: finetune_epochs={self.finetune_epochs!r}")
        if self.finetune_epochs and self.train_data is None:
            raise ConfigError("--finetune-epochs needs --train-data (the data the compressed model is fine-tuned on)")
        if not 0.0 < self.max_channel_fraction < 1.0:
            raise ConfigError(
                f"Invalid max channel fraction. Expected 0 < f < 1. Received: max_channel_fraction={self.max_channel_fraction}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"Invalid test fraction. Expected 0 < f < 1. Received: test_fraction={self.test_fraction}")
        for name in ("runs", "warmup", "threads"):
            value = getattr(self, name)
            if value < (1 if name == "runs" else 0):
                raise ConfigError(f"Invalid {name}. Expected an integer >= {1 if name == 'runs' else 0}. Received: {name}={value}")
        if not (math.isfinite(self.atol) and self.atol >= 0):
            raise ConfigError(f"Invalid atol. Expected a number >= 0. Received: atol={self.atol}")
        self._check_quantization()
        self._check_gating()
        for name in ("int8_io", "gating_network", "overwrite", "quiet", "json", "allow_model_code"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Invalid {name}. Expected true or false. Received: {name}={getattr(self, name)!r}")

    def _check_quantization(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"Invalid quantization mode. Expected one of {QUANTIZE_MODES}. Received: quantize={self.quantize!r}"
            )
        if isinstance(self.calibration_samples, bool) or not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise ConfigError(
                f"Invalid calibration samples. Expected an integer >= 1. Received: calibration_samples={self.calibration_samples!r}"
            )
        if self.int8_io and self.quantize != "int8":
            raise ConfigError(f"--int8-io needs --quantize int8. Received: quantize={self.quantize!r}")
        if self.quantize == "int8" and self.data is None and self.train_data is None:
            raise ConfigError("--quantize int8 calibrates on real inputs: pass --train-data or --data")
        if self.quantize != "none" and not {"tflite", "onnx"} & set(self.export):
            raise ConfigError(f"--quantize {self.quantize} quantizes tflite and onnx artifacts; --export {','.join(self.export)} has neither")

    def _check_gating(self) -> None:
        target = self.gating_target
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ConfigError(f"Invalid gating target. Expected a fraction of compute in (0, 1]. Received: gating_target={target!r}")
        epochs = self.gating_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"Invalid gating epochs. Expected an integer >= 1. Received: gating_epochs={epochs!r}")
        if "gating" in self.techniques and self.plan is None and self.train_data is None:
            raise ConfigError("--techniques gating trains the gates: pass --train-data (labelled)")
        if "gating" in self.techniques and self.quantize != "none" and "onnx" in self.export:
            raise ConfigError(
                f"--quantize {self.quantize} with gating: ONNX quantization does not reach the weights inside "
                "the gates' If branches; pass --export tflite,keras (TFLite quantizes gated models)"
            )

    def budget(self):
        """The Budget of the chosen method, or None when replaying a plan without one."""
        from compressor.search.budgets import Budget

        if self.method == "fixed_loss":
            return Budget.accuracy_drop(self.max_acc_loss)
        if self.method == "fixed_params":
            return Budget(self.budget_on, self.compression_factor)
        return None

    def pattern(self):
        """The sparsity pattern template (density is set by the search)."""
        from compressor.surgery.plan import SparsitySpec

        structure = self.pruning_structure
        if re.fullmatch(r"\d+:\d+", structure) or structure == "n:m":
            n, m = (int(v) for v in (structure if structure != "n:m" else "2:4").split(":"))
            if not 0 < n < m:
                raise ConfigError(f"Invalid N:M structure. Expected 0 < N < M. Received: {structure}")
            return SparsitySpec(n / m, "n:m", n=n, m=m)
        return SparsitySpec(1.0, structure, block_size=self.block_size)

    def input_files(self) -> list[Path]:
        """The files this run reads (model, data files, plan), which its outputs must never replace."""
        specs = [self.model, self.plan, self.data, self.test_data, self.train_data]
        return [Path(spec) for spec in specs if spec is not None and Path(spec).exists()]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
        return out


def parse_list(value: Any, name: str, lower: bool = True) -> tuple[str, ...]:
    """Accept "a,b" or ["a", "b"]."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise ConfigError(f"{name} must be a comma-separated string or a list. Received: {value!r}")
    items = [item.strip().lower() if lower else item.strip() for item in items if item.strip()]
    if not items:
        raise ConfigError(f"{name} is empty")
    return tuple(dict.fromkeys(items))


def parse_block_size(value: Any) -> Optional[tuple[int, int]]:
    """Accept "2,2", "2x2" or [2, 2]."""
    if value is None:
        return None
    parts = re.split(r"[,x]", value) if isinstance(value, str) else list(value)
    try:
        rows, cols = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid block size. Expected ROWS,COLS (e.g. 2,2). Received: {value!r}") from None
    if rows < 1 or cols < 1:
        raise ConfigError(f"Invalid block size. Expected positive ROWS,COLS. Received: {value!r}")
    return rows, cols


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file into option names (dashes become underscores).

    Raises:
        ConfigError: Missing file, invalid TOML, or an unknown key.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    known = {f.name for f in fields(CompressOptions)} - {"model"} - set(COMMAND_LINE_ONLY)
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    for key in COMMAND_LINE_ONLY:
        if key in values:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{path}: {key.replace('_', '-')} cannot be set in a config file; it allows code to run, "
                f"so only the command line gives it ({flag})"
            )
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(k.replace('_', '-') for k in known))}"
        )
    return values


def build_options(
    model: Path, flags: Mapping[str, Any], config: Optional[Path] = None, allow_config_code: bool = False
) -> CompressOptions:
    """Merge the TOML file (if any) with the flags given (None = not given); flags win.

    Args:
        model: The model path.
        flags: Option values from the command line; None where a flag was not given.
        config: A TOML file with the same keys.
        allow_config_code: Let the file's options import Python code (custom-objects,
            data hooks); the command line's `--allow-config-code`.

    Raises:
        ConfigError: Invalid or contradictory options, or options from the file that
            would import code without `allow_config_code`.
    """
    from_file: dict[str, Any] = read_toml(config) if config else {}
    given = {key: value for key, value in flags.items() if value is not None}
    if config and not allow_config_code:
        _refuse_config_code(config, {key: value for key, value in from_file.items() if key not in given})
    merged = {**from_file, **given}
    if "out" not in merged:
        raise ConfigError("choose an output folder with --out DIR")
    for key in ("techniques", "export"):
        if key in merged:
            merged[key] = parse_list(merged[key], key)
    if "custom_objects" in merged:
        merged["custom_objects"] = parse_list(merged["custom_objects"], "custom_objects", lower=False)
    if isinstance(merged.get("quantize"), str):
        merged["quantize"] = merged["quantize"].strip().lower()
    merged["block_size"] = parse_block_size(merged.get("block_size"))
    for key in ("out", "plan", "cache_dir"):
        if merged.get(key) is not None:
            merged[key] = Path(merged[key])
    for key in ("data", "test_data", "train_data"):
        if merged.get(key) is not None:
            merged[key] = str(merged[key])
    try:
        return CompressOptions(model=Path(model), **merged)
    except TypeError as exc:
        raise ConfigError(f"invalid option value: {exc}") from exc


def _refuse_config_code(config: Path, used: Mapping[str, Any]) -> None:
    """Refuse the config file's options (those no flag overrides) that would import Python code."""
    from compressor.io.data import is_hook

    if used.get("custom_objects"):
        raise ConfigError(
            f"{config}: custom-objects imports Python modules ({_shown(used['custom_objects'])}); a config file "
            "runs no code unless --allow-config-code is given on the command line"
        )
    for key in DATA_KEYS:
        value = used.get(key)
        if value is not None and is_hook(str(value)):
            raise ConfigError(
                f"{config}: {key.replace('_', '-')} = {str(value)!r} is a Python hook (it imports code); a config "
                "file runs no code unless --allow-config-code is given on the command line"
            )


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
