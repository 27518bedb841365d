"""The technique registry: names without TensorFlow, the choice per layer, and a technique added by a test.

`tests/toy_halve.py` is a whole technique in one module; `halve` below registers it
with one line, and `compress` then uses it end to end (search, plan.json,
report.json, replay), as the README's "Adding a technique" shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from compressor.cli.app import app  # noqa: E402
from compressor.config import CompressOptions  # noqa: E402
from compressor.errors import OptionError  # noqa: E402
from compressor.surgery.plan import LayerEdit, Plan, PlanError  # noqa: E402
from compressor.techniques import registry  # noqa: E402
from compressor.techniques.registry import (  # noqa: E402
    DEFAULT_REGISTRY,
    Registry,
    register,
    technique_for,
    unregister,
)
from compressor.report.schema import report_problems  # noqa: E402
from conftest import build_residual, build_sequential, write_npz  # noqa: E402

L = keras.layers


@pytest.fixture
def halve():
    """The toy technique, registered for one test: the one line adding a technique takes."""
    register("halve", "toy_halve:Halve", summary="keep the larger half of a Dense kernel's weights")
    yield DEFAULT_REGISTRY["halve"]
    unregister("halve")


def called(layer, shape):
    layer(keras.ops.zeros((1, *shape)))
    return layer


# --- names, without TensorFlow ------------------------------------------------------------------


def test_names_help_and_plans_need_no_tensorflow():
    code = (
        "import json, sys\n"
        "from compressor.techniques import registry\n"
        "from compressor.config import CompressOptions\n"
        "from compressor.surgery.plan import read_plan\n"
        "CompressOptions(model='m.keras', out='o', method='fixed_params', compression_factor=0.5,"
        " techniques=('channels', 'hessian', 'gating'), train_data='t.npz')\n"
        "read_plan('tests/golden/hessian.plan.json')\n"
        "print(json.dumps({'layer': registry.layer_technique_names(), 'stage': registry.stage_technique_names(),"
        " 'help': registry.techniques_help(),"
        " 'heavy': [m for m in ('tensorflow', 'keras') if m in sys.modules]}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    found = json.loads(done.stdout)
    assert found["heavy"] == []
    assert found["layer"] == ["tucker", "svd", "hessian", "sparsity"]
    assert found["stage"] == ["blocks", "channels", "gating", "early-exit"]
    assert all(name in found["help"] for name in found["layer"] + found["stage"])


def test_options_refuse_unknown_techniques():
    with pytest.raises(OptionError, match=r"Invalid techniques. Expected auto or some of \('blocks', 'channels', 'tucker'"):
        CompressOptions(model="m.keras", out="o", method="fixed_params", compression_factor=0.5, techniques=("pruning",))


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register("tucker", "compressor.techniques.lowrank:Tucker", summary="again")
    with pytest.raises(ValueError, match="needs class"):
        register("nothing", summary="a layer technique without a class")
    assert "nothing" not in registry.technique_names()


# --- instances and choices ------------------------------------------------------------------------


def test_a_registry_holds_prepared_instances_without_changing_the_default():
    from compressor.techniques.sparsity import Sparsity

    scored = Sparsity({"conv": np.ones((3, 3, 2, 4))})
    prepared = Registry([scored])
    assert prepared["sparsity"] is scored and prepared["tucker"].name == "tucker"
    assert DEFAULT_REGISTRY["sparsity"] is not scored and DEFAULT_REGISTRY["sparsity"].scores == {}
    both = prepared.with_techniques(DEFAULT_REGISTRY["tucker"])
    assert both["sparsity"] is scored and both["tucker"] is DEFAULT_REGISTRY["tucker"]


def test_technique_for_tries_techniques_in_priority_order(halve):
    dense = called(L.Dense(16), (32,))
    conv = called(L.Conv2D(16, 3), (8, 8, 8))
    assert technique_for(dense, {"halve", "tucker"}).technique.name == "svd"  # tucker brings svd, priority 30 < 50
    assert technique_for(dense, {"halve"}).technique is halve
    assert technique_for(dense, {"halve", "sparsity"}).residual is False  # halve takes no residual
    assert technique_for(conv, {"halve"}).reason == "halve applies to Dense layers, not Conv2D"


def test_inspect_lists_the_registered_techniques_of_each_layer(tmp_path):
    model = build_residual()
    path = tmp_path / "m.keras"
    model.save(path)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {}
    for row in json.loads(result.stdout)["layers"]:  # the first layer of each type
        rows.setdefault(row["type"], row["techniques"])
    assert rows["Conv2D"] == ["channels", "tucker", "hessian", "sparsity"]
    assert rows["Dense"] == ["channels", "svd", "hessian", "sparsity"]
    assert rows["BatchNormalization"] == [] and rows["Add"] == []


# --- plans: generic parameters ------------------------------------------------------------------


def test_edits_carry_the_parameters_their_technique_declares(halve):
    edit = LayerEdit("dense", "halve", keep=0.5)
    assert edit.params == {"keep": 0.5} and edit.keep == 0.5 and edit.ranks is None
    assert edit.to_dict() == {"layer": "dense", "technique": "halve", "keep": 0.5}
    assert LayerEdit.from_dict(edit.to_dict()) == edit == LayerEdit("dense", "halve", {"keep": 0.5})
    with pytest.raises(PlanError, match=r"needs keep=a fraction in \(0, 1\]. Received: 2"):
        LayerEdit("dense", "halve", keep=2)
    with pytest.raises(PlanError, match=r"Expected some of \('keep',\). Received: rank"):
        LayerEdit("dense", "halve", keep=0.5, rank=3)
    with pytest.raises(AttributeError):
        edit.no_such_parameter


def test_edits_of_unknown_techniques_are_refused():
    with pytest.raises(PlanError, match="Invalid technique for layer 'd'.*Received: technique='channels'"):
        LayerEdit("d", "channels")
    with pytest.raises(PlanError, match="Invalid technique for layer 'd'.*Received: technique='halve'"):
        Plan.from_dict({"version": 1, "model": {}, "edits": [{"layer": "d", "technique": "halve", "keep": 0.5}]})


# --- a toy technique, end to end ----------------------------------------------------------------


def test_a_registered_technique_compresses_end_to_end_and_replays(halve, tmp_path):
    model = build_sequential()
    model.save(tmp_path / "model.keras")
    write_npz(tmp_path / "test.npz", model, n=32, seed=2)
    common = ["--export", "keras", "--data", str(tmp_path / "test.npz"), "--json"]
    search = CliRunner().invoke(app, ["compress", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"),
                                      "--method", "fixed_params", "--compression-factor", "0.8",
                                      "--techniques", "halve", *common])
    assert search.exit_code == 0, search.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report_problems(report) == []  # its parameter ("keep") is a documented key of its rows
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    halved = [row for row in report["layers"] if row["technique"] == "halve"]
    dense = [layer.name for layer in model.layers if isinstance(layer, L.Dense)]
    assert halved and all(row["name"] in dense and row["keep"] == 0.5 for row in halved)
    assert all(row["params_after"] < row["params_before"] for row in halved)
    assert plan["edits"] == [{"layer": row["name"], "technique": "halve", "keep": 0.5} for row in halved]
    conv = next(layer.name for layer in model.layers if isinstance(layer, L.Conv2D))
    skipped = {row["name"]: row["reason"] for row in report["layers"] if row["technique"] == "skipped"}
    assert skipped[conv] == "halve applies to Dense layers, not Conv2D"
    assert report["budget"]["met"] is True

    replay = CliRunner().invoke(app, ["compress", str(tmp_path / "model.keras"), "--out", str(tmp_path / "replay"),
                                      "--plan", str(tmp_path / "out" / "plan.json"), *common])
    assert replay.exit_code == 0, replay.output
    first, second = (keras.saving.load_model(tmp_path / name / "model.keras") for name in ("out", "replay"))
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    kernel = first.get_layer(halved[0]["name"]).get_weights()[0]
    assert np.count_nonzero(kernel) == kernel.size // 2
