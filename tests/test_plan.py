"""The plan's channel removals: validation and JSON round trip."""

from __future__ import annotations

import pytest

from compressor.surgery.plan import ChannelRemoval, LayerEdit, Plan, PlanError


def test_channel_removals_round_trip_through_json(tmp_path):
    plan = Plan(
        model={"name": "m"},
        edits=(LayerEdit("conv", "hessian", ranks=(4, 3)),),
        channels=(ChannelRemoval("stem", 8, (5, 1, 2), "fpgm"),),
        finetune={"epochs": 3, "teacher": "original"},
        statistics={"data": "train", "samples": 64},
    )
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert loaded.channels[0].remove == (1, 2, 5)  # sorted
    assert loaded.removals == {"stem": (1, 2, 5)}


def test_plans_without_channels_keep_the_old_shape():
    data = Plan(model={"name": "m"}, edits=(LayerEdit("d", "svd", rank=2),)).to_dict()
    assert set(data) == {"version", "model", "edits", "skipped"}


@pytest.mark.parametrize(
    "remove, message",
    [((0, 0), "distinct indices"), ((8,), r"in \[0, 8\)"), ((-1,), "distinct indices"), (tuple(range(8)), "keep at least one")],
)
def test_invalid_channel_removals(remove, message):
    with pytest.raises(PlanError, match=message):
        ChannelRemoval("stem", 8, remove)


def test_a_group_removed_twice_is_rejected():
    with pytest.raises(PlanError, match="removes channels of groups more than once: g"):
        Plan(model={}, channels=(ChannelRemoval("g", 4, (1,)), ChannelRemoval("g", 4, (2,))))


def test_malformed_removal_in_json():
    with pytest.raises(PlanError, match="malformed channel removal"):
        Plan.from_dict({"version": 1, "model": {}, "channels": [{"group": "g"}]})
