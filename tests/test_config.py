"""Options of `compress`: validation, TOML config, flags over file, data split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.config import CompressOptions, ConfigError
from compressor.config_file import COMMAND_LINE_ONLY, build_options
from compressor.option_fields import declared
from compressor.io.data import Dataset
from compressor.pipeline import split_data


def _opts(**flags):
    flags.setdefault("out", Path("out"))
    return build_options(Path("m.keras"), flags)


def test_fixed_loss_options_and_budget():
    options = _opts(method="fixed_loss", max_acc_loss=0.02, data="val.npz", techniques="tucker,sparsity")
    assert options.techniques == ("tucker", "sparsity")
    budget = options.budget()
    assert (budget.kind, budget.limit) == ("accuracy_drop", 0.02)


def test_fixed_params_budget_on_flops():
    budget = _opts(method="fixed_params", compression_factor=0.25, budget_on="flops").budget()
    assert (budget.kind, budget.limit) == ("flops", 0.25)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "choose a method"),
        ({"method": "fast"}, "Invalid method"),
        ({"method": "fixed_loss", "data": "d.npz"}, "needs --max-acc-loss"),
        ({"method": "fixed_loss", "max_acc_loss": 0.02}, "needs labelled --data"),
        ({"method": "fixed_params"}, "needs --compression-factor"),
        ({"method": "fixed_params", "compression_factor": 0.5, "budget_on": "latency"}, "Invalid budget-on"),
        ({"method": "fixed_params", "compression_factor": 0.5, "pruning_structure": "diagonal"}, "Invalid pruning structure"),
        ({"method": "fixed_params", "compression_factor": 0.5, "pruning_structure": "block"}, "needs --block-size"),
        ({"method": "fixed_params", "compression_factor": 0.5, "block_size": "2,zero"}, "Invalid block size"),
        ({"method": "fixed_params", "compression_factor": 0.5, "runs": 0}, "Invalid runs"),
        ({"method": "fixed_params", "compression_factor": 0.5, "criterion": "random"}, "Invalid criterion"),
        ({"method": "fixed_params", "compression_factor": 0.5, "finetune_epochs": 2}, "needs --train-data"),
        ({"method": "fixed_params", "compression_factor": 0.5, "finetune_epochs": -1, "train_data": "t.npz"}, "Invalid finetune epochs"),
        ({"method": "fixed_params", "compression_factor": 0.5, "max_channel_fraction": 1.0}, "Invalid max channel fraction"),
        ({"method": "fixed_params", "compression_factor": 0.5, "channel_multiple": 0}, "Invalid channel multiple"),
        ({"method": "fixed_loss", "max_acc_loss": 0.02, "guard_chance": 1.0}, "Invalid guard chance"),
        ({"method": "fixed_loss", "max_acc_loss": 0.02, "guard_chance": 0}, "Invalid guard chance"),
    ],
)
def test_invalid_options(flags, message):
    with pytest.raises(ConfigError, match=message):
        _opts(**flags)


@pytest.mark.parametrize("factor", [0.0, 1.0, 1.5, -0.1])
def test_compression_factor_outside_unit_interval(factor):
    from compressor.search.budgets import BudgetError

    with pytest.raises(BudgetError, match="Expected 0 < F < 1"):
        _opts(method="fixed_params", compression_factor=factor).budget()


@pytest.mark.parametrize("loss", [-0.01, 2.0])
def test_negative_or_point_valued_accuracy_loss(loss):
    from compressor.search.budgets import BudgetError

    with pytest.raises(BudgetError, match="max_acc_loss"):
        _opts(method="fixed_loss", max_acc_loss=loss, data="d.npz").budget()


def test_structures_give_patterns():
    nm = _opts(method="fixed_params", compression_factor=0.5, pruning_structure="2:4").pattern()
    assert (nm.structure, nm.n, nm.m, nm.density) == ("n:m", 2, 4, 0.5)
    block = _opts(method="fixed_params", compression_factor=0.5, pruning_structure="block", block_size="2x4").pattern()
    assert (block.structure, block.block_size) == ("block", (2, 4))
    with pytest.raises(ConfigError, match="0 < N < M"):
        _opts(method="fixed_params", compression_factor=0.5, pruning_structure="4:2").pattern()


def test_toml_config_and_flags_win(tmp_path):
    config = tmp_path / "compress.toml"
    config.write_text('method = "fixed_params"\ncompression-factor = 0.5\nexport = ["tflite"]\nout = "from_file"\n')
    options = build_options(Path("m.keras"), {"compression_factor": 0.3, "out": None}, config)
    assert options.method == "fixed_params"
    assert options.compression_factor == 0.3  # the flag wins
    assert options.export == ("tflite",)
    assert options.out == Path("from_file")


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_options(Path("m.keras"), {"out": "o"}, bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('speed = "max"\n')
    with pytest.raises(ConfigError, match="unknown key\\(s\\) speed"):
        build_options(Path("m.keras"), {"out": "o"}, unknown)
    with pytest.raises(ConfigError, match="config file not found"):
        build_options(Path("m.keras"), {"out": "o"}, tmp_path / "absent.toml")


def test_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), 25)
    data = Dataset(np.arange(100, dtype=np.float32)[:, None], y, "d")
    search, held = split_data(data, 0.4, seed=3)
    assert len(search) + len(held) == 100
    assert not set(search.x[:, 0]) & set(held.x[:, 0])
    np.testing.assert_array_equal(np.bincount(held.y), [10, 10, 10, 10])
    again, _ = split_data(data, 0.4, seed=3)
    np.testing.assert_array_equal(search.x, again.x)
    with pytest.raises(Exception, match="at least 4"):
        split_data(Dataset(np.zeros((2, 1), np.float32), np.array([0, 1]), "tiny"), 0.5, 0)


def test_fine_tuning_options_from_toml(tmp_path):
    config = tmp_path / "compress.toml"
    config.write_text('method = "fixed_loss"\nmax-acc-loss = 0.02\ndata = "v.npz"\ntrain-data = "t.npz"\n'
                      'techniques = "channels,tucker"\ncriterion = "fpgm"\nfinetune-epochs = 3\n')
    options = build_options(Path("m.keras"), {"out": tmp_path / "o", "finetune_epochs": 1}, config)
    assert (options.train_data, options.criterion, options.finetune_epochs) == ("t.npz", "fpgm", 1)
    assert options.techniques == ("channels", "tucker")


def test_config_criteria_match_the_scores_module():
    from compressor.config import CRITERIA
    from compressor.techniques.scores import CRITERIA as SCORED

    assert CRITERIA == SCORED


# --- every flag in the config file ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _compress_flags() -> dict[str, str]:
    """Option name -> its first flag, read from the `compress` command itself."""
    import typer.main

    from compressor.cli.compress import app

    command = typer.main.get_command(app)
    return {param.name: param.opts[0] for param in command.params if param.opts[0].startswith("--")}


def test_every_flag_has_a_config_key():
    from dataclasses import fields

    from compressor.config import CompressOptions

    keys = {f.name for f in fields(CompressOptions)}
    flags = _compress_flags()
    # The opt-ins to running code are flags only: a config file cannot give them (tested below).
    command_line_only = {"allow_model_code", "allow_config_code"}
    assert command_line_only <= set(flags)
    names = {name if name != "json_out" else "json" for name in flags} - {"config"} - command_line_only
    assert names - keys == set(), f"flags without a config key: {sorted(names - keys)}"
    # And each key is spelled like its flag.
    for name, flag in flags.items():
        if name not in ("config", "json_out"):
            assert flag == "--" + name.replace("_", "-"), (name, flag)


def test_config_file_equals_the_same_flags(tmp_path):
    (tmp_path / "c.toml").write_text(
        'method = "fixed_loss"\nmax-acc-loss = 0.03\ndata = "val.npz"\ntrain_data = "train.npz"\n'
        'techniques = ["channels", "tucker"]\ncriterion = "fpgm"\nfinetune-epochs = 2\n'
        'quantize = "INT8"\ncalibration-samples = 50\nint8-io = true\noverwrite = true\nquiet = true\njson = true\n'
        'export = "tflite,onnx"\nout = "build"\nseed = 3\nruns = 7\nthreads = 2\ncustom-objects = ["pkg.layers"]\n'
        'block-size = "2x2"\npruning-structure = "block"\ncache-dir = "cache"\n'
        'gating-target = 0.5\ngating-epochs = 3\ngating-network = false\n'
    )
    from_file = build_options(Path("m.keras"), {}, tmp_path / "c.toml", allow_config_code=True)  # custom-objects
    from_flags = build_options(Path("m.keras"), {
        "method": "fixed_loss", "max_acc_loss": 0.03, "data": "val.npz", "train_data": "train.npz",
        "techniques": "channels,tucker", "criterion": "fpgm", "finetune_epochs": 2, "quantize": "int8",
        "calibration_samples": 50, "int8_io": True, "overwrite": True, "quiet": True, "json": True,
        "export": "tflite,onnx", "out": Path("build"), "seed": 3, "runs": 7, "threads": 2,
        "custom_objects": ("pkg.layers",), "block_size": "2,2", "pruning_structure": "block", "cache_dir": Path("cache"),
        "gating_target": 0.5, "gating_epochs": 3, "gating_network": False,
    })
    assert from_file == from_flags
    # A flag given on the command line wins over the file.
    flags = {"quantize": "dynamic", "int8_io": False}
    assert build_options(Path("m.keras"), flags, tmp_path / "c.toml", allow_config_code=True).quantize == "dynamic"


def test_example_config_is_valid():
    options = build_options(Path("example/model.keras"), {}, ROOT / "examples" / "compress.toml")
    assert options.method == "fixed_loss" and options.quantize == "int8" and options.techniques == ("channels",)


def test_quantize_modes_match_the_exporter():
    from compressor.config import QUANTIZE_MODES
    from compressor.export.quantize import QUANTIZE_MODES as EXPORTED

    assert QUANTIZE_MODES == EXPORTED


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"quantize": "int4"}, "Invalid quantization mode"),
        ({"quantize": "dynamic", "int8_io": True}, "needs --quantize int8"),
        ({"quantize": "int8"}, "calibrates on real inputs"),
        ({"quantize": "int8", "data": "d.npz", "calibration_samples": 0}, "Invalid calibration samples"),
        ({"quantize": "float16", "export": "keras"}, "has neither"),
        ({"overwrite": "yes"}, "Invalid overwrite"),
    ],
)
def test_invalid_quantization_and_output_options(flags, message):
    with pytest.raises(ConfigError, match=message):
        _opts(method="fixed_params", compression_factor=0.5, **flags)


# --- a config file runs no code unless the command line allows it --------------------------


@pytest.mark.parametrize("key", ["allow-model-code", "allow_config_code"])
def test_code_opt_ins_cannot_come_from_a_config_file(tmp_path, key):
    config = tmp_path / "c.toml"
    config.write_text(f'method = "fixed_params"\ncompression-factor = 0.5\n{key} = true\n')
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError, match=f"c.toml: {flag[2:]} cannot be set in a config file; .*only the command line gives it \\({flag}\\)"):
        build_options(Path("m.keras"), {"out": "o"}, config, allow_config_code=True)


def _config(tmp_path, text):
    config = tmp_path / "ci.toml"
    config.write_text('method = "fixed_params"\ncompression-factor = 0.5\nout = "o"\n' + text)
    return config


def test_custom_objects_from_a_config_file_need_allow_config_code(tmp_path):
    config = _config(tmp_path, 'custom-objects = ["evil.layers"]\n')
    with pytest.raises(ConfigError, match=r"ci.toml: custom-objects imports Python modules \(evil.layers\); .*--allow-config-code"):
        build_options(Path("m.keras"), {}, config)
    assert build_options(Path("m.keras"), {}, config, allow_config_code=True).custom_objects == ("evil.layers",)
    # Given on the command line, the same option needs no opt-in.
    assert build_options(Path("m.keras"), {"custom_objects": ("my.layers",)}, config).custom_objects == ("my.layers",)


@pytest.mark.parametrize("key", ["data", "test-data", "train-data"])
def test_data_hooks_from_a_config_file_need_allow_config_code(tmp_path, key):
    config = _config(tmp_path, f'{key} = "evil.module:load"\n')
    with pytest.raises(ConfigError, match=f"ci.toml: {key} = 'evil.module:load' is a Python hook .*--allow-config-code"):
        build_options(Path("m.keras"), {}, config)
    options = build_options(Path("m.keras"), {}, config, allow_config_code=True)
    assert getattr(options, key.replace("-", "_")) == "evil.module:load"
    # A flag that replaces the file's hook leaves nothing to import from the file.
    assert build_options(Path("m.keras"), {key.replace("-", "_"): "val.npz"}, config).method == "fixed_params"


def test_data_paths_from_a_config_file_need_no_opt_in(tmp_path):
    (tmp_path / "val.npz").write_bytes(b"")
    (tmp_path / "pkg.mod:fn").write_bytes(b"")  # an existing path is read as data, never imported
    config = _config(tmp_path, f'data = "{tmp_path / "val.npz"}"\ntest-data = "{tmp_path / "pkg.mod:fn"}"\ntrain-data = "missing.npz"\n')
    options = build_options(Path("m.keras"), {}, config)
    assert options.train_data == "missing.npz"  # not a hook: reported as missing when checked, not refused here


# --- one declaration reaches every front end ---------------------------------------------------


def test_every_declared_option_reaches_its_front_ends():
    import inspect
    from dataclasses import fields

    from compressor.api.compressing import compress

    flags = _compress_flags()
    keywords = inspect.signature(compress).parameters
    for item in declared(CompressOptions):
        assert (item.name in flags) == ("cli" in item.spec.where), item.name
        assert (item.name in keywords) == ("api" in item.spec.where), item.name
    file_keys = {item.name for item in declared(CompressOptions, "file")}
    assert file_keys == {f.name for f in fields(CompressOptions)} - {"model"} - set(COMMAND_LINE_ONLY)


def test_the_example_config_has_every_key():
    text = (ROOT / "examples" / "compress.toml").read_text()
    keys = {line.lstrip("# ").split("=")[0].strip() for line in text.splitlines() if "=" in line}
    for name in {item.name for item in declared(CompressOptions, "file")}:
        assert name.replace("_", "-") in keys, name


def test_flag_help_words_options_as_flags_and_python_help_as_keywords():
    from compressor.errors import flag_name, python_name
    from compressor.option_fields import help_text

    spec = next(item.spec for item in declared(CompressOptions) if item.name == "finetune_epochs")
    assert help_text(spec, flag_name).endswith("needs --train-data.")
    assert help_text(spec, python_name).endswith("needs train_data=.")


def test_options_from_python_values_parse_like_flags():
    options = CompressOptions.parse(model="m.keras", out="o", method="fixed_params", compression_factor=0.5,
                                    techniques=["Channels", "tucker"], block_size=(2, 2), pruning_structure="block",
                                    quantize=" Dynamic ")
    assert options.model == Path("m.keras") and options.out == Path("o")
    assert (options.techniques, options.block_size, options.quantize) == (("channels", "tucker"), (2, 2), "dynamic")
    assert options == _opts(method="fixed_params", compression_factor=0.5, techniques="channels,tucker",
                            block_size="2x2", pruning_structure="block", quantize="dynamic", out=Path("o"))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "fixed_loss", "max_acc_loss": 0.02}, "method fixed_loss needs labelled data= to measure accuracy on"),
        ({"method": "fixed_params", "compression_factor": 0.5, "runs": "7"}, "Invalid runs. Expected an integer >= 1. Received: runs='7'"),
        ({"method": "fixed_params", "compression_factor": 0.5, "block_size": (0, 2)}, "Invalid block size"),
        ({"method": "fixed_params", "compression_factor": 0.5, "data": 3}, "Invalid data. Expected a path"),
        ({"method": "fixed_params", "compression_factor": 0.5, "speed": "max"}, "unknown option(s) speed"),
    ],
)
def test_python_values_get_python_wording(values, message):
    from compressor.config import ConfigError
    from compressor.errors import OptionError

    with pytest.raises(OptionError) as raised:
        CompressOptions.parse(model="m.keras", out="o", **values)
    assert message in str(raised.value) and not isinstance(raised.value, ConfigError)


def test_in_memory_inputs_stand_in_for_files(tmp_path):
    from compressor.config import InMemory

    (tmp_path / "val.npz").write_bytes(b"")
    options = CompressOptions(model=InMemory("keras.Model 'm'"), out=tmp_path / "o", method="fixed_loss", max_acc_loss=0.02,
                              data=InMemory("data arrays"), test_data=str(tmp_path / "val.npz"))
    assert options.input_files() == [tmp_path / "val.npz"]  # an object is no file to protect
    assert options.to_dict()["data"] == "data arrays" and options.to_dict()["model"] == "keras.Model 'm'"
