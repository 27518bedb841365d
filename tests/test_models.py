"""Reference architectures, the built-in examples' data, and `compressor example`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.errors import CompressorError
from compressor.models import digits, har
from compressor.models.examples import EXAMPLES, build_example
from compressor.models.zoo import ARCHITECTURES, mobilenet_style, resnet_cifar, temporal_cnn

runner = CliRunner()

# Small inputs keep the forward passes fast; every builder takes them.
SMALL_INPUTS = {"temporal_cnn": (64, 3)}


def _count(model, class_name):
    return sum(type(layer).__name__ == class_name for layer in model.layers)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_builder_builds_and_runs(name):
    input_shape = SMALL_INPUTS.get(name, (32, 32, 1))
    model = ARCHITECTURES[name](input_shape=input_shape, num_classes=7)
    assert model.output_shape == (None, 7)
    x = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # softmax head


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_resnet_layer_counts(depth):
    n = (depth - 2) // 6
    model = resnet_cifar(depth=depth)
    # 6n+1 convs on the main path (stem + 2 per block) plus 2 projection shortcuts.
    assert _count(model, "Conv2D") == 6 * n + 1 + 2
    assert _count(model, "Add") == 3 * n
    assert _count(model, "Dense") == 1
    assert model.name == f"resnet{depth}"


def test_resnet_names_and_projections():
    model = resnet_cifar(depth=20, width=8)
    names = {layer.name for layer in model.layers}
    assert {"stem_conv", "stage2_block1_conv1", "stage3_block3_add", "predictions"} <= names
    shortcuts = sorted(n for n in names if n.endswith("_shortcut_conv"))
    assert shortcuts == ["stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv"]
    assert model.get_layer("stage3_block3_conv2").filters == 32  # 4 * width
    assert model.get_layer("stage2_block1_shortcut_conv").strides == (2, 2)


@pytest.mark.parametrize("depth", [21, 8, 110])
def test_resnet_rejects_other_depths(depth):
    with pytest.raises(ValueError, match=r"Expected one of \[20, 32, 56\].*depth=" + str(depth)):
        resnet_cifar(depth=depth)


def test_mobilenet_blocks_and_width_multiplier():
    blocks = ((16, 1), (32, 2), (64, 2))
    model = mobilenet_style(blocks=blocks, alpha=0.5)
    assert _count(model, "DepthwiseConv2D") == len(blocks)
    assert model.get_layer("block3_pw").filters == 32
    assert model.get_layer("block2_dw").strides == (2, 2)
    assert all(
        layer.max_value == 6.0 for layer in model.layers if type(layer).__name__ == "ReLU"
    )
    with pytest.raises(ValueError, match="alpha"):
        mobilenet_style(alpha=0)


def test_temporal_cnn_rejects_mismatched_kernels():
    with pytest.raises(ValueError, match="same non-zero length"):
        temporal_cnn(filters=(8, 16), kernel_sizes=(3,))


def test_vgg_and_split_guards_fire():
    with pytest.raises(ValueError, match="at least one stage width"):
        ARCHITECTURES["vgg"](widths=())
    with pytest.raises(ValueError, match="summing to 1"):
        digits.split_digits(np.zeros(10, dtype=int), seed=0, fractions=(0.5, 0.2, 0.2))


def test_digit_split_is_disjoint_stratified_and_complete():
    labels = np.repeat(np.arange(10), 50)
    index = digits.split_digits(labels, seed=3)
    train, val, test = (set(index[name].tolist()) for name in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(len(labels)))
    assert (len(train), len(val), len(test)) == (300, 100, 100)
    assert np.all(np.bincount(labels[index["test"]]) == 10)


def test_digit_splits_keep_originals_apart_and_have_the_documented_format():
    data = digits.make_digit_splits(seed=0, limit=100)
    sources = {name: set(idx.tolist()) for name, idx in data.source_index.items()}
    assert not (sources["train"] & sources["val"] or sources["train"] & sources["test"])
    assert not sources["val"] & sources["test"]
    sizes = data.sizes()
    assert sizes["train"] == 100 and sizes["val"] + sizes["test"] == 719  # 40% of 1797
    for _, (x, y) in data.items():
        assert x.shape[1:] == (32, 32, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9
    assert len(np.unique(data.test[1])) == 10


def test_har_splits_are_balanced_and_seeded():
    data = har.make_har_splits(seed=0, per_class=(20, 5, 5))
    x, y = data.train
    assert x.shape == (120, 128, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.all(np.bincount(y) == 20)
    again = har.make_har_splits(seed=0, per_class=(20, 5, 5))
    other = har.make_har_splits(seed=1, per_class=(20, 5, 5))
    np.testing.assert_array_equal(again.test[0], data.test[0])
    assert not np.array_equal(other.test[0], data.test[0])


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two seed-1 builds (library and CLI) and one seed-2 build, each 1 epoch on 64 samples."""
    root = tmp_path_factory.mktemp("examples")
    quick = {"epochs": 1, "limit": 64}
    determinism_before = _op_determinism()
    lib = build_example("digits-resnet20", root / "lib", seed=1, **quick)
    assert _op_determinism() == determinism_before  # process-wide switch restored
    cli = runner.invoke(
        app,
        ["example", "digits-resnet20", "--out", str(root / "cli"), "--seed", "1",
         "--epochs", "1", "--limit", "64", "--json"],
    )
    other = build_example("digits-resnet20", root / "other", seed=2, **quick)
    return root, lib, cli, other


def _op_determinism():
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


def _load_weights(path):
    import keras

    return keras.saving.load_model(path).get_weights()


def test_same_seed_gives_identical_weights_and_data(builds):
    root, lib, cli, other = builds
    assert cli.exit_code == 0, cli.output
    same = [_load_weights(root / d / "model.keras") for d in ("lib", "cli")]
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    for split in ("train", "val", "test"):
        a, b = np.load(root / "lib" / f"{split}.npz"), np.load(root / "cli" / f"{split}.npz")
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    differs = _load_weights(root / "other" / "model.keras")
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], differs))
    other_x, lib_x = (np.load(root / d / "test.npz")["x"] for d in ("other", "lib"))
    assert not np.array_equal(other_x, lib_x)
    assert lib.samples == {"train": 64, "val": 359, "test": 360}


def test_cli_json_lists_the_four_files(builds):
    root, lib, cli, _ = builds
    report = json.loads(cli.stdout)
    assert set(report["files"]) == {"model", "train", "val", "test"}
    for key, path in report["files"].items():
        assert (root / "cli" / path.rsplit("/", 1)[-1]).stat().st_size == report["bytes"][key]
    assert report["test_accuracy"] == lib.test_accuracy and report["epochs"] == 1
    assert not list((root / "cli").glob(".*"))  # no temporary files left behind


def test_model_reloads_without_this_package(builds, tmp_path):
    root = builds[0]
    code = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".")]
        import keras, numpy as np
        model = keras.saving.load_model({str(root / "cli" / "model.keras")!r})
        data = np.load({str(root / "cli" / "test.npz")!r})
        assert model.predict(data["x"][:4], verbose=0).shape == (4, 10)
        assert not [m for m in sys.modules if m.startswith("compressor")]
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]


def _one_line_error(result):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_rejects_unknown_example(tmp_path):
    line = _one_line_error(runner.invoke(app, ["example", "nope", "--out", str(tmp_path)]))
    assert all(name in line for name in EXAMPLES)


def test_cli_rejects_output_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["example", "har-tcn", "--out", str(blocker / "sub")])
    assert "cannot create output folder" in _one_line_error(result)


def test_build_example_rejects_bad_arguments(tmp_path):
    with pytest.raises(CompressorError, match="epochs must be at least 1"):
        build_example("har-tcn", tmp_path, epochs=0)
    with pytest.raises(CompressorError, match="digits-resnet20"):
        build_example("mnist", tmp_path)


def test_importing_the_command_does_not_import_tensorflow():
    code = (
        "import sys, compressor.cli.example, compressor.models.examples;"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'scipy') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
