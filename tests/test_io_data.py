"""Each data source and the errors for data that does not fit."""

from __future__ import annotations

import re
import textwrap
import uuid

import numpy as np
import pytest

from compressor.errors import DataError
from compressor.io.data import Dataset, check_data_spec, check_labels, load_data
from conftest import raises_as_cli


def test_npz_integer_labels(tmp_path):
    x = np.random.default_rng(0).random((10, 4, 4, 1), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    data = load_data(tmp_path / "d.npz", input_shape=(4, 4, 1))
    assert data.x.shape == (10, 4, 4, 1) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, np.arange(10) % 3)
    assert data.y.dtype == np.int64


def test_npz_one_hot_and_column_labels(tmp_path):
    y = np.array([2, 0, 1, 1])
    np.savez(tmp_path / "oh.npz", x=np.zeros((4, 3), np.float32), y=np.eye(3)[y])
    np.savez(tmp_path / "col.npz", x=np.zeros((4, 3), np.float32), y=y[:, None])
    np.testing.assert_array_equal(load_data(tmp_path / "oh.npz").y, y)
    np.testing.assert_array_equal(load_data(tmp_path / "col.npz").y, y)


def test_npz_without_labels_and_uint8_inputs(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((5, 2, 2, 3), 255, np.uint8))
    data = load_data(tmp_path / "d.npz")
    assert data.y is None
    assert data.x.dtype == np.float32 and data.x.max() == 255.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"inputs": np.zeros((2, 3))}, "expected an array named 'x'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "x has 3 samples but y has 4"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.5, 1.0])}, "non-integer"),
        ({"x": np.zeros((2, 2)), "y": np.array([-1, 1])}, "negative labels"),
        ({"x": np.array([["a"], ["b"]])}, "must be numeric"),
        ({"x": np.zeros(3)}, "at least 2 dimensions"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(tmp_path / "d.npz")


def test_shape_mismatch_names_both_shapes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 28, 28), np.float32), y=[0, 1])
    with pytest.raises(DataError, match=r"shape \(28, 28\), but the model expects \(32, 32, 1\)"):
        load_data(tmp_path / "d.npz", input_shape=(32, 32, 1))


def test_free_dimensions_accept_any_size(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 50, 3), np.float32))
    assert load_data(tmp_path / "d.npz", input_shape=(None, 3)).x.shape == (2, 50, 3)


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_data(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could not read"):
        load_data(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="data not found"):
        load_data("no/such/place")


def _write_images(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, count in sizes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def test_image_folder_resized_and_labelled(tmp_path):
    _write_images(tmp_path / "imgs", {"cat": 2, "dog": 3})
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    rgb = load_data(tmp_path / "imgs", input_shape=(8, 12, 3))
    assert rgb.x.shape == (5, 8, 12, 3)
    np.testing.assert_array_equal(rgb.y, [0, 0, 1, 1, 1])  # classes in sorted folder order
    gray = load_data(tmp_path / "imgs", input_shape=(16, 16, 1))
    assert gray.x.shape == (5, 16, 16, 1)
    assert 0.0 <= gray.x.min() and gray.x.max() <= 255.0


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(tmp_path / "empty", input_shape=(8, 8, 3))
    _write_images(tmp_path / "imgs", {"a": 1})
    with pytest.raises(DataError, match="fixed \\(height, width, channels\\)"):
        load_data(tmp_path / "imgs", input_shape=(None, 3))
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="could not read image"):
        load_data(tmp_path / "imgs", input_shape=(8, 8, 3))


HOOKS = textwrap.dedent(
    """
    import numpy as np

    def arrays():
        return np.ones((6, 4), np.float32), np.array([0, 1, 0, 1, 0, 1])

    def batched():
        import tensorflow as tf
        x, y = arrays()
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)

    def unbatched():
        import tensorflow as tf
        x, y = arrays()
        return tf.data.Dataset.from_tensor_slices((x, y))

    def endless():
        import tensorflow as tf
        return unbatched().repeat()

    def wrong():
        return [1, 2, 3]

    def broken():
        raise RuntimeError("disk on fire")
    """
)


@pytest.fixture
def hook_module(tmp_path, monkeypatch):
    name = f"hooks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("func", ["arrays", "batched", "unbatched"])
def test_hook_sources(hook_module, func):
    data = load_data(f"{hook_module}:{func}", input_shape=(4,))
    assert data.x.shape == (6, 4)
    np.testing.assert_array_equal(data.y, [0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize(
    "func, message",
    [
        ("endless", "infinite dataset"),
        ("wrong", "returned list"),
        ("broken", "failed: RuntimeError: disk on fire"),
        ("absent", "not a function"),
    ],
)
def test_hook_errors(hook_module, func, message):
    with pytest.raises(DataError, match=message):
        load_data(f"{hook_module}:{func}", input_shape=(4,))


def test_hook_module_missing():
    with pytest.raises(DataError, match="could not import data hook module"):
        load_data("no_such_hooks_mod:load")


# --- refused at load: non-finite inputs, labels the model cannot predict --------------------


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_inputs_are_refused_naming_the_first(tmp_path, value, shown):
    x = np.zeros((20, 5, 5, 1), np.float32)
    x[17, 3, 4, 0] = value
    x[19, 0, 0, 0] = np.nan  # a later one is not the one named
    np.savez(tmp_path / "val.npz", x=x, y=np.zeros(20, int))
    expected = f"val.npz: x holds {shown} at sample 17 (index (17, 3, 4, 0)); data must be finite"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_data(tmp_path / "val.npz")


def test_non_finite_inputs_from_a_hook_are_refused(hook_module, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(hook_module)
    monkeypatch.setattr(module, "arrays", lambda: (np.full((3, 4), np.inf, np.float32), np.zeros(3, int)))
    with pytest.raises(DataError, match=r"x holds inf at sample 0 \(index \(0, 0\)\)"):
        load_data(f"{hook_module}:arrays", input_shape=(4,))


def test_finite_float64_and_integer_inputs_pass(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.ones((3, 2), np.float64))
    np.savez(tmp_path / "i.npz", x=np.arange(6, dtype=np.int64).reshape(3, 2))
    assert load_data(tmp_path / "f.npz").x.dtype == np.float32
    assert load_data(tmp_path / "i.npz").x.dtype == np.int64


def test_labels_beyond_the_models_classes_name_the_first(tmp_path):
    y = np.arange(8) % 10
    y[5], y[7] = 12, 15
    np.savez(tmp_path / "test.npz", x=np.zeros((8, 3), np.float32), y=y)
    data = load_data(tmp_path / "test.npz")
    with pytest.raises(DataError, match=re.escape("test.npz: y[5] = 12, but the model has 10 classes (labels must be 0..9)")):
        check_labels(data, 10)
    check_labels(data, 16)  # all within


def test_one_output_column_takes_labels_0_and_1():
    check_labels(Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 1]), "b"), 1)
    with pytest.raises(DataError, match=r"y\[2\] = 2, but the model has one output .*labels must be 0..1"):
        check_labels(Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 2]), "b"), 1)
    check_labels(Dataset(np.zeros((3, 2), np.float32), None, "unlabelled"), 1)


def test_data_spec_is_checked_before_loading(tmp_path, hook_module):
    (tmp_path / "val.npz").write_bytes(b"")
    check_data_spec(tmp_path / "val.npz")  # exists: read later, not here
    check_data_spec(tmp_path)  # an image folder
    check_data_spec(f"{hook_module}:arrays")
    check_data_spec("some_pkg.some_module:load")  # a hook is only imported when loaded
    with raises_as_cli(DataError, r"data file not found: .*absent.npz \(given as --test-data\)"):
        check_data_spec(tmp_path / "absent.npz", "test_data")
    for spec in ("no/such/place", "almost:a hook"):
        with raises_as_cli(DataError, r"data not found: .* \(given as --test-data; expected an .npz file"):
            check_data_spec(spec, "test_data")


def test_a_stray_module_in_the_working_folder_does_not_shadow_an_installed_one(tmp_path, monkeypatch):
    """The working folder is importable for hooks, but after everything installed."""
    import importlib
    import sys

    name = f"shadowed_{uuid.uuid4().hex[:8]}"
    site, work = tmp_path / "site", tmp_path / "work"
    site.mkdir()
    work.mkdir()
    (site / f"{name}.py").write_text("import numpy as np\ndef load():\n    return np.ones((2, 3), np.float32), np.array([0, 1])\n")
    (work / f"{name}.py").write_text("def load():\n    raise RuntimeError('the stray file ran')\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(site), *(p for p in sys.path if p not in ("", str(work)))])
    importlib.invalidate_caches()
    data = load_data(f"{name}:load", input_shape=(3,))
    assert data.x.shape == (2, 3) and sys.path[-1] == str(work)
    sys.modules.pop(name, None)
