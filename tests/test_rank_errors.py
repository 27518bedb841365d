"""Kernel errors of every rank from one factorization (`compressor.techniques.rank_errors`),
and the per-layer curves cached across runs (`compressor.search.curves`).

Tolerances: SVD errors from the eigenvalues of the Gram matrix equal those of the
built options to 1e-7 (float64; the Gram matrix squares the condition number, and the
tails compared here hold at least 1e-3 of the energy). A truncated HOSVD equals a
HOSVD computed directly at that rank to 1e-9. The built Tucker-2 runs HOOI from the
HOSVD, so its error is at most the truncated one; on random normal kernels (flat
spectra, where the two differ most) the truncated error exceeds it by at most 5% of it
(measured: 3.3-4.2% at the search's rank fractions, 0.03 absolute at most).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.search.candidates import layer_candidates  # noqa: E402
from compressor.search.kernels import KernelCache  # noqa: E402
from compressor.surgery.plan import LayerEdit  # noqa: E402
from compressor.techniques import rank_errors  # noqa: E402
from compressor.techniques.base import reconstruction_error  # noqa: E402
from compressor.techniques.lowrank import SVD, Tucker  # noqa: E402
from compressor.techniques.rank_errors import svd_errors, tucker2_errors  # noqa: E402

L = keras.layers


def _random_layer(layer, input_shape, seed=0):
    layer(keras.Input(input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def _model(seed=0):
    inputs = keras.Input((12, 12, 6))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv_b")(x)
    x = L.Conv2D(20, 1, name="point")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(5, name="head")(x))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.2 for w in model.get_weights()])
    return model


def _hosvd_error(kernel, r1, r2):
    """The HOSVD at (r1, r2) computed directly: SVDs of the channel unfoldings, core, composed kernel."""
    kernel = kernel.astype(np.float64)
    c_in, c_out = kernel.shape[-2:]
    u_in = np.linalg.svd(np.moveaxis(kernel, 2, 0).reshape(c_in, -1), full_matrices=False)[0][:, :r1]
    u_out = np.linalg.svd(np.moveaxis(kernel, 3, 0).reshape(c_out, -1), full_matrices=False)[0][:, :r2]
    core = np.einsum("hwio,ia,ob->hwab", kernel, u_in, u_out)
    approx = np.einsum("hwab,ia,ob->hwio", core, u_in, u_out)
    return np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)


def test_svd_errors_of_every_rank_equal_those_of_the_built_options():
    dense = _random_layer(L.Dense(24, name="d"), (40,))
    ranks = [18, 12, 6, 3, 1]
    built = [reconstruction_error(dense, LayerEdit("d", "svd", rank=r)) for r in ranks]
    assert svd_errors(np.asarray(dense.kernel), ranks) == pytest.approx(built, abs=1e-7)
    edits = [LayerEdit("d", "svd", rank=r) for r in ranks]
    assert SVD().kernel_errors(dense, edits) == pytest.approx(built, abs=1e-7)
    assert svd_errors(np.asarray(dense.kernel), [24]) == pytest.approx([0.0], abs=1e-6)


def test_tucker_truncation_equals_a_direct_hosvd_and_bounds_the_built_tucker():
    conv = _random_layer(L.Conv2D(20, 3, name="c"), (9, 9, 12))
    kernel = np.asarray(conv.kernel)
    ranks = [(9, 15), (6, 10), (3, 5), (1, 1)]
    truncated = tucker2_errors(kernel, ranks)
    assert truncated == pytest.approx([_hosvd_error(kernel, *r) for r in ranks], abs=1e-9)
    built = [reconstruction_error(conv, LayerEdit("c", "tucker", ranks=r)) for r in ranks]
    for hosvd, hooi in zip(truncated, built):
        assert hooi - 1e-9 <= hosvd <= hooi * 1.05
    assert Tucker().kernel_errors(conv, [LayerEdit("c", "tucker", ranks=r) for r in ranks]) == pytest.approx(truncated)


def test_hybrid_edits_are_left_to_be_built():
    conv = _random_layer(L.Conv2D(8, 3, name="c"), (6, 6, 8))
    from compressor.surgery.plan import SparsitySpec

    edits = [LayerEdit("c", "tucker", ranks=(4, 4)), LayerEdit("c", "tucker", ranks=(4, 4), residual=SparsitySpec(0.1))]
    plain, hybrid = Tucker().kernel_errors(conv, edits)
    assert plain is not None and hybrid is None


def test_curves_are_cached_and_a_second_run_factorizes_nothing(tmp_path, monkeypatch):
    model = _model()
    before = rank_errors.FACTORIZATIONS[0]
    first, skipped = layer_candidates(model, ["tucker"], cache_dir=tmp_path)
    assert rank_errors.FACTORIZATIONS[0] - before == len(first) == 4 and not skipped
    assert len(list(tmp_path.glob("curves-*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("factorized again")

    for name in ("svd_errors", "tucker2_errors"):
        monkeypatch.setattr(f"compressor.techniques.lowrank.{name}", refuse)
    monkeypatch.setattr("compressor.search.kernels.effective_kernel", refuse)  # nothing built either
    kernels = KernelCache()
    second, _ = layer_candidates(model, ["tucker"], kernels=kernels, cache_dir=tmp_path)
    assert kernels.builds == 0
    assert [[o.error for o in c.options] for c in second] == [[o.error for o in c.options] for c in first]
    assert [[o.edit for o in c.options] for c in second] == [[o.edit for o in c.options] for c in first]


def test_the_cache_follows_the_weights_and_survives_a_corrupt_file(tmp_path):
    model = _model()
    layer_candidates(model, ["tucker"], cache_dir=tmp_path)
    changed = _model(seed=1)
    before = rank_errors.FACTORIZATIONS[0]
    found, _ = layer_candidates(changed, ["tucker"], cache_dir=tmp_path)
    assert rank_errors.FACTORIZATIONS[0] - before == 4  # other weights: another file, computed
    assert len(list(tmp_path.glob("curves-*.json"))) == 2
    for path in tmp_path.glob("curves-*.json"):
        path.write_text("{not json")
    before = rank_errors.FACTORIZATIONS[0]
    again, _ = layer_candidates(changed, ["tucker"], cache_dir=tmp_path)
    assert rank_errors.FACTORIZATIONS[0] - before == 4
    assert [[o.error for o in c.options] for c in again] == [[o.error for o in c.options] for c in found]
    rewritten = [path for path in tmp_path.glob("curves-*.json") if path.read_text() != "{not json"]
    assert len(rewritten) == 1 and json.loads(rewritten[0].read_text())["version"] == 1


def test_other_techniques_on_the_same_model_add_their_curves_beside(tmp_path):
    model = _model()
    layer_candidates(model, ["tucker"], cache_dir=tmp_path)
    kernels = KernelCache()
    hybrid, _ = layer_candidates(model, ["tucker", "sparsity"], kernels=kernels, cache_dir=tmp_path)
    assert kernels.builds > 0  # hybrid residual options are built every run
    before = rank_errors.FACTORIZATIONS[0]
    layer_candidates(model, ["tucker"], cache_dir=tmp_path)
    layer_candidates(model, ["tucker", "sparsity"], cache_dir=tmp_path)
    assert rank_errors.FACTORIZATIONS[0] == before  # both option lists are in the file
