"""Every plan.json written so far still reads, round-trips, and replays to the same model.

The golden plans (`tests/golden/*.plan.json`) are what today's runs write; the plans in
`tests/plans/` have the shapes written earlier (the first plans: edits and skipped
layers only; later ones with channel removals and the statistics of data-driven
edits). `tests/plans/replayed.json` holds what replaying each gave before techniques
declared their own parameters (weight norms of the replayed model, its first outputs
on the quadrants test data): replaying must still give that model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from compressor.surgery.plan import READERS, Plan, PlanError, read_plan  # noqa: E402
from conftest import write_quadrants_data  # noqa: E402

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
PLANS = {path.name.split(".")[0]: path for path in [*GOLDEN.glob("*.plan.json"), *(HERE / "plans").glob("*.plan.json")]}
REPLAYED = json.loads((HERE / "plans" / "replayed.json").read_text())
# K-FAC statistics and scores sum floats on several threads; the other edits are deterministic.
TOLERANCE = {"hessian": 1e-4, "statistics_shape": 1e-4}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_plan_reads_and_writes_back_the_same_json(name):
    data = json.loads(PLANS[name].read_text())
    plan = Plan.load(PLANS[name])
    assert plan.to_dict() == data
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plans_are_version_1_and_other_versions_are_refused(tmp_path):
    assert set(READERS) == {1} and all(read_plan(path)["version"] == 1 for path in PLANS.values())
    (tmp_path / "v9.json").write_text('{"version": 9, "model": {}, "edits": []}')
    with pytest.raises(PlanError, match="expected a JSON object with version 1, got version 9"):
        Plan.load(tmp_path / "v9.json")


def test_read_plan_checks_edits_without_loading_techniques(tmp_path):
    (tmp_path / "bad.json").write_text('{"version": 1, "model": {}, "edits": [{"layer": "d", "technique": "pruning"}]}')
    with pytest.raises(PlanError, match="Invalid technique for layer 'd'"):
        read_plan(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"version": 1, "model": {}, "edits": [{"technique": "svd"}]}')
    with pytest.raises(PlanError, match="malformed plan edit"):
        read_plan(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quadrants")
    write_quadrants_data(folder)
    return folder


@pytest.mark.parametrize("name", sorted(REPLAYED))
def test_replaying_a_plan_gives_the_model_it_gave_before(name, quadrants, tmp_path):
    import keras

    from compressor.config import CompressOptions
    from compressor.pipeline import compress

    options = CompressOptions(
        model=GOLDEN / "model.keras", out=tmp_path / "out", plan=PLANS[name], export=("keras",), runs=1,
        train_data=str(quadrants / "train.npz"), data=str(quadrants / "val.npz"), test_data=str(quadrants / "test.npz"),
    )
    report = compress(options)
    expected = REPLAYED[name]
    assert (report["compressed"]["params"], report["compressed"]["flops"]) == (expected["params"], expected["flops"])
    model = keras.saving.load_model(tmp_path / "out" / "model.keras")
    tolerance = TOLERANCE.get(name, 1e-6)
    norms = [float(np.linalg.norm(np.asarray(w, np.float64))) for w in model.get_weights()]
    np.testing.assert_allclose(norms, expected["weight_norms"], rtol=tolerance, atol=tolerance)
    x = np.load(quadrants / "test.npz")["x"][:8]
    np.testing.assert_allclose(model.predict(x, verbose=0), expected["outputs"], atol=tolerance)
