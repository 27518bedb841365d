"""Each data source and the errors for data that does not fit."""

from __future__ import annotations

import textwrap
import uuid

import numpy as np
import pytest

from compressor.errors import DataError
from compressor.io.data import load_data


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
