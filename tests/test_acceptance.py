"""Models are accepted on the guard split with a confidence bound, in a fixed sequence; runs report it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.io.data import Dataset
from compressor.pipeline.acceptance import Acceptance, Look
from compressor.search.confidence import samples_needed
from conftest import write_quadrants_workdir

runner = CliRunner()


class Predictor:
    """Stands in for a model: predicts the label except on the samples it is told to get wrong."""

    def __init__(self, labels: np.ndarray, wrong: np.ndarray) -> None:
        self.outputs = np.eye(10, dtype=np.float32)[np.where(wrong, (labels + 1) % 10, labels)]

    def predict(self, x, batch_size=None, verbose=0):
        return self.outputs


def _guard(n: int, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """n guard samples, and which of them the original gets wrong (10%)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    return Dataset(np.zeros((n, 1), np.float32), labels, "guard"), rng.random(n) < 0.1


def test_a_candidate_whose_true_drop_is_above_the_budget_is_rejected_and_ends_the_sequence():
    guard, original_wrong = _guard(3000)
    acceptance = Acceptance(guard, 0.02, 0.95, ~original_wrong)
    rng = np.random.default_rng(1)
    # Wrong on 4% more samples than the original: a 4-point drop against a 2-point budget.
    worse = original_wrong | (rng.random(3000) < 0.045)
    assert not acceptance.look("too far", Predictor(guard.y, worse))
    assert acceptance.closed
    # After the first rejection nothing more is accepted, not even the original itself, and nothing is measured.
    assert not acceptance.look("the original", Predictor(guard.y, original_wrong))
    looks = acceptance.to_dict()["looks"]
    assert [look["accepted"] for look in looks] == [False, False]
    assert looks[0]["drop"] == pytest.approx(np.mean(worse) - np.mean(original_wrong))
    assert looks[0]["ci"][1] > 0.02 and "drop" not in looks[1]


def test_candidates_within_the_budget_are_accepted_in_order():
    guard, original_wrong = _guard(3000)
    acceptance = Acceptance(guard, 0.02, 0.95, ~original_wrong)
    rng = np.random.default_rng(2)
    steps = [original_wrong | (rng.random(3000) < share) for share in (0.002, 0.005, 0.009)]
    assert all(acceptance.look(f"step {i}", Predictor(guard.y, wrong)) for i, wrong in enumerate(steps))
    upper = [look["ci"][1] for look in acceptance.to_dict()["looks"]]
    assert upper == sorted(upper) and upper[-1] <= 0.02


def test_too_few_guard_samples_give_a_warning_with_the_samples_needed():
    guard, original_wrong = _guard(200)
    warning = Acceptance(guard, 0.02, 0.95, ~original_wrong).too_few_warning()
    assert warning is not None and "200 guard samples" in warning
    assert f"about {samples_needed(0.02, 0.95)} are needed" in warning and "\n" not in warning
    large, large_wrong = _guard(4000)
    assert Acceptance(large, 0.02, 0.95, ~large_wrong).too_few_warning() is None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("acceptance")
    write_quadrants_workdir(folder)
    return folder


def _compress(workdir, out, *args):
    command = ["compress", str(workdir / "model.keras"), "--out", str(out), "--runs", "3", "--export", "tflite",
               "--cache-dir", str(workdir / "cache"), "--data", str(workdir / "val.npz"),
               "--test-data", str(workdir / "test.npz"), "--method", "fixed_loss", *map(str, args)]
    return runner.invoke(app, command)


def test_a_fixed_loss_run_warns_before_the_search_and_reports_the_guard_and_the_interval(workdir, tmp_path):
    result = _compress(workdir, tmp_path / "out", "--max-acc-loss", "0.1", "--techniques", "channels")
    assert result.exit_code in (0, 2), result.output
    # val.npz has 96 samples: 48 guard samples cannot confirm a 10-point budget; said before the search runs.
    warning = result.stderr.index("guard samples are too few")
    assert warning < result.stderr.index("removing channels")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    acceptance = report["search"]["acceptance"]
    assert acceptance["samples"] == 48 and report["search"]["search_samples"] == 48
    assert acceptance["samples_needed"] == samples_needed(0.1, 0.95) > 48
    assert any("too few" in note for note in report["notes"])
    for look in acceptance["looks"]:
        assert look["accepted"] == (look["ci"][1] <= 0.1) or "ci" not in look
    budget = report["budget"]
    assert budget["confidence"] == 0.95
    assert budget["ci"][0] <= budget["achieved"] <= budget["ci"][1]
    assert "interval" in (tmp_path / "out" / "report.md").read_text()


def test_per_layer_edits_the_guard_rejects_are_dropped_from_the_model_and_the_plan(workdir, tmp_path, monkeypatch):
    looked = []

    def reject_layers(self, label, model):
        looked.append(label)
        self.looks.append(Look(label, None, False))
        return False

    monkeypatch.setattr(Acceptance, "look", reject_layers)
    result = _compress(workdir, tmp_path / "out", "--max-acc-loss", "0.5", "--techniques", "tucker", "--json")
    assert result.exit_code == 0, result.output
    assert looked == ["per-layer edits"]
    report = json.loads(result.stdout)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["edits"] == []
    assert report["compressed"]["params"] == report["baseline"]["params"]
    assert any("guard rejected" in (row.get("reason") or "") for row in report["layers"])


def test_after_a_rejected_channel_step_the_per_layer_search_does_not_run(workdir, tmp_path, monkeypatch):
    looked = []

    def reject(self, label, model):
        looked.append(label)
        self.looks.append(Look(label, None, False))
        return False

    from compressor.search import channel_search

    monkeypatch.setattr(Acceptance, "look", reject)
    monkeypatch.setattr(channel_search._Run, "_holds", lambda self, correct: True)  # every step reaches the guard
    result = _compress(workdir, tmp_path / "out", "--max-acc-loss", "0.5", "--techniques", "channels,tucker")
    assert result.exit_code == 0, result.output
    assert len(looked) == 1 and looked[0].startswith("channels")  # one channel step shown, then nothing
    assert "per-layer techniques skipped" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["compressed"]["flops"] == report["baseline"]["flops"]
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["edits"] == []
