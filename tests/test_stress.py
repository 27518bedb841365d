"""Stress: the statistics paths run many times in one process, and `compress` several times.

A native crash (SIGSEGV, SIGABRT) in TensorFlow code that runs only now and then
does not show in a test that runs it once. These tests repeat the K-FAC pass and
every scoring criterion on tiny models in one process (pytest's faulthandler prints
the Python stack of a crash), and run the `compress` command with the hessian
technique in fresh processes, which also exercises interpreter shutdown. Every
repetition asserts its results, not only that it returned.

Tolerances: a repetition on the same data and seed recomputes the same values in
float32 TensorFlow ops, batched differently (another batch size blocks the products
differently), then sums them in float64: results agree to ~1e-7 of their norm,
asserted at 1e-5 (as in test_hessian). Symmetry and positive semi-definiteness of a
factor are checked at 1e-9 of its largest entry (float64 sums of outer products).

Run only these: `pytest -m stress`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.io.data import Dataset  # noqa: E402
from compressor.techniques.base import kernel_of  # noqa: E402
from compressor.techniques.kfac import kfac_factors  # noqa: E402
from compressor.techniques.scores import CRITERIA, filter_scores, weight_scores  # noqa: E402
from conftest import build_residual, write_npz  # noqa: E402

pytestmark = pytest.mark.stress

L = keras.layers
REPEATS = 20
RTOL = 1e-5
SYMMETRY = 1e-9


def conv2d_model():
    """Conv2D paddings and strides the tap counts distinguish, then Dense."""
    inputs = keras.Input((9, 7, 2))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="same_s2")(inputs)
    x = L.Conv2D(4, (2, 3), padding="valid", activation="relu", name="valid")(x)
    x = L.Conv2D(5, 1, strides=2, name="pointwise_s2")(x)
    x = L.Conv2D(3, 3, dilation_rate=2, padding="same", activation="relu", name="dilated")(x)
    x = L.Dense(4, activation="relu", name="dense")(L.Flatten()(x))
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x), name="conv2d")


def conv1d_model():
    inputs = keras.Input((17, 3))
    x = L.Conv1D(4, 3, dilation_rate=2, padding="causal", activation="relu", name="causal")(inputs)
    x = L.Conv1D(4, 4, strides=3, padding="same", activation="relu", name="same_s3")(x)
    x = L.Conv1D(5, 2, padding="valid", name="valid")(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(L.GlobalAveragePooling1D()(x)), name="conv1d")


def dense_model():
    inputs = keras.Input((6,))
    x = L.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(3, activation="softmax", name="out")(x), name="dense")


BUILDERS = {"conv2d": conv2d_model, "conv1d": conv1d_model, "dense": dense_model}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_and_data(request):
    keras.utils.set_random_seed(0)
    model = BUILDERS[request.param]()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, *model.inputs[0].shape[1:])).astype(np.float32)
    y = rng.integers(0, model.outputs[0].shape[-1], len(x))
    return model, Dataset(x, y, "stress")


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _channels(layer):
    kernel = kernel_of(layer)
    return kernel.shape[-2], kernel.shape[-1]


def _assert_factor(matrix, size, what):
    assert matrix.shape == (size, size), what
    assert np.all(np.isfinite(matrix)), what
    scale = np.abs(matrix).max()
    assert scale > 0, what
    np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=SYMMETRY * scale, err_msg=what)
    assert np.linalg.eigvalsh(matrix).min() >= -SYMMETRY * scale, what


def test_kfac_factors_many_times_in_one_process(model_and_data):
    model, data = model_and_data
    layers = {layer.name: layer for layer in model.layers if isinstance(layer, (L.Dense, L.Conv1D, L.Conv2D))}
    first = {}
    for repeat in range(REPEATS):
        labels = "true" if repeat % 2 else "sampled"
        factors = kfac_factors(model, data, labels=labels, batch_size=3 + repeat % 4, seed=repeat % 2)
        assert set(factors) == set(layers)
        for name, factor in factors.items():
            c_in, c_out = _channels(layers[name])
            _assert_factor(factor.a, c_in, f"{name} A, repeat {repeat}")
            _assert_factor(factor.g, c_out, f"{name} G, repeat {repeat}")
            assert factor.samples == len(data.x)
        # The same labels and seed give the same factors, whatever the batch size.
        earlier = first.setdefault((labels, repeat % 2), factors)
        for name, factor in factors.items():
            assert relative(factor.a, earlier[name].a) < RTOL and relative(factor.g, earlier[name].g) < RTOL, name


@pytest.mark.parametrize("criterion", CRITERIA)
def test_scores_many_times_in_one_process(model_and_data, criterion):
    model, data = model_and_data
    layers = {layer.name: layer for layer in model.layers if isinstance(layer, (L.Dense, L.Conv1D, L.Conv2D))}
    first = None
    for _ in range(REPEATS // 2):
        per_filter = filter_scores(model, criterion, data, samples=12, batch_size=5)
        assert set(per_filter) == set(layers)
        for name, scores in per_filter.items():
            assert scores.shape == (_channels(layers[name])[1],), name
            assert np.all(np.isfinite(scores)) and np.all(scores >= 0) and scores.max() > 0, name
        if criterion != "fpgm":  # fpgm scores whole filters only
            per_weight = weight_scores(model, criterion, data, samples=12, batch_size=5)
            for name, scores in per_weight.items():
                assert scores.shape == kernel_of(layers[name]).shape, name
                assert np.all(np.isfinite(scores)) and np.all(scores >= 0), name
        first = first or per_filter
        for name, scores in per_filter.items():
            assert relative(scores, first[name]) < RTOL, name


# --- the command, in fresh processes ----------------------------------------------------


COMPRESS_RUNS = 3


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stress_compress")
    model = build_residual()
    model.save(folder / "model.keras")
    write_npz(folder / "val.npz", model, n=48, seed=1)
    write_npz(folder / "test.npz", model, n=32, seed=2)
    write_npz(folder / "train.npz", model, n=64, seed=3)
    return folder


def test_compress_with_hessian_exits_0_every_time(tiny_workdir, tmp_path):
    folder = tiny_workdir
    paths = [str(Path(__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this checkout's package, not an installed one
    for run in range(COMPRESS_RUNS):
        out = tmp_path / f"out{run}"
        command = [
            sys.executable, "-X", "faulthandler", "-m", "compressor", "compress", str(folder / "model.keras"),
            "--data", str(folder / "val.npz"), "--test-data", str(folder / "test.npz"),
            "--train-data", str(folder / "train.npz"), "--techniques", "hessian,tucker", "--finetune-epochs", "1",
            "--method", "fixed_loss", "--max-acc-loss", "0.3", "--export", "tflite", "--runs", "2",
            "--out", str(out), "--cache-dir", str(tmp_path / f"cache{run}"), "--quiet",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        # A budget this loose is met: 0. A native crash shows as a negative code (the signal).
        assert done.returncode == 0, f"run {run}: exit {done.returncode}\n{done.stderr[-3000:]}"
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "ok" and (out / "model.tflite").is_file(), run
        # The K-FAC statistics were gathered and used: the loose budget takes hessian edits.
        assert json.loads((out / "plan.json").read_text())["statistics"]["data"] == "train", run
        assert any(row["technique"] == "hessian" for row in report["layers"]), run
