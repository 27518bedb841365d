"""The Fashion-MNIST examples' data: idx files read offline, official splits, one-line errors when missing."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest

from compressor.models.fashion import (
    DEBIAN_DIR,
    FILES,
    FashionDataError,
    find_source,
    load_fashion,
    make_fashion_splits,
    read_idx,
)


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_source(folder, train: int = 300, test: int = 50, compress: bool = True):
    """A folder of the four idx files with tiny random images (labels cycling through the 10 classes)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (train, 28, 28)), "train_labels": np.arange(train) % 10,
        "test_images": rng.integers(0, 256, (test, 28, 28)), "test_labels": np.arange(test) % 10,
    }
    for key, stem in FILES.items():
        _write_idx(folder / stem, arrays[key], compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_read_back_as_written(tmp_path, compress):
    arrays = _fake_source(tmp_path, compress=compress)
    (x_train, y_train), (x_test, y_test) = load_fashion(tmp_path)
    assert x_train.shape == (300, 28, 28) and x_test.shape == (50, 28, 28)
    np.testing.assert_array_equal(x_train, arrays["train_images"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])


def test_splits_are_official_stratified_and_disjoint(tmp_path):
    _fake_source(tmp_path)
    data = make_fashion_splits(seed=1, source=tmp_path, val_size=100)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data.train, data.val, data.test
    assert (len(y_train), len(y_val), len(y_test)) == (200, 100, 50)  # the official test set stays whole
    assert np.bincount(y_val, minlength=10).tolist() == [10] * 10
    index = data.source_index
    assert not set(index["train"]) & set(index["val"]) and set(index["test"]) == set(range(300, 350))
    assert x_train.dtype == np.float32 and x_train.shape[1:] == (28, 28, 1) and 0 <= x_train.min() <= x_train.max() <= 1
    again = make_fashion_splits(seed=1, source=tmp_path, val_size=100)
    np.testing.assert_array_equal(again.val[1], y_val)
    assert len(make_fashion_splits(seed=1, source=tmp_path, val_size=100, limit=50).train[1]) == 50


def test_missing_or_broken_files_say_what_to_do(tmp_path):
    with pytest.raises(FashionDataError, match="has no train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        find_source(tmp_path)
    _fake_source(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(FashionDataError, match="truncated"):
        load_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(FashionDataError, match="cannot read"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")


def test_the_example_command_refuses_missing_data_in_one_line_without_tensorflow(tmp_path):
    code = ("import sys\nfrom compressor.cli.app import main\nsys.argv = ['compressor', 'example', 'fashion-resnet20', "
            f"'--out', {str(tmp_path / 'out')!r}, '--source', {str(tmp_path)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
            "print('tensorflow' in sys.modules, code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "1"], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_debian_package_holds_the_real_dataset():
    if not all((DEBIAN_DIR / f"{stem}.gz").is_file() for stem in FILES.values()):
        pytest.skip(f"Fashion-MNIST is not installed in {DEBIAN_DIR}: apt-get install dataset-fashion-mnist")
    (x_train, y_train), (x_test, y_test) = load_fashion()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    data = make_fashion_splits(seed=0)
    assert data.sizes() == {"train": 48000, "val": 12000, "test": 10000}
