"""The default techniques (`--techniques auto`, compressor.pipeline.techniques): low rank, with channel
removal first when the floor low rank can reach is above the goal.

The floor (`lowest_cost`) is checked against what the fixed_params search actually reaches at
its most compressing plan; the choice on families whose weights sit where low rank cannot go
(a grouped convolution, attention) and on one where it can (a plain CNN)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

from families import FAMILIES, without_zeros

from compressor.config import CompressOptions
from compressor.pipeline.context import RunContext, Splits


def _context(tmp_path, model, log=None, **values):
    options = CompressOptions(model=tmp_path / "model.keras", out=tmp_path / "out", **values)
    return RunContext(options, model, Splits(), options.budget(), tmp_path, log or (lambda message: None))


def test_the_floor_is_what_the_search_reaches_at_its_most_compressing_plan(tmp_path):
    import compressor
    from compressor.search.candidates import lowest_cost

    model = without_zeros(FAMILIES["resnext"]())
    lowest, baseline = lowest_cost(model, ("tucker",), "params")
    assert baseline == model.count_params() and 0 < lowest < baseline
    result = compressor.compress(model, out=tmp_path / "out", method="fixed_params", compression_factor=0.05,
                                 techniques="tucker", export=("keras",), runs=1, warmup=0)
    report = result.report
    assert report["budget"]["met"] is False  # 0.05 is out of low rank's reach here
    assert report["compressed"]["params"] == lowest  # the most compressing plan, exactly as priced


@pytest.mark.parametrize("family, budget, chosen", [
    ("resnext", {"method": "fixed_params", "compression_factor": 0.5}, ("channels", "tucker")),  # floor 0.72 params
    ("resnext", {"method": "fixed_params", "compression_factor": 0.8}, ("tucker",)),
    ("encoder", {"method": "fixed_params", "compression_factor": 0.5}, ("channels", "tucker")),  # floor 0.58
    ("cnn", {"method": "fixed_params", "compression_factor": 0.5}, ("tucker",)),  # floor 0.08
    ("resnext", {"method": "fixed_loss", "max_acc_loss": 0.02, "data": "val.npz"}, ("channels", "tucker")),  # floor 0.73 FLOPs
    ("cnn", {"method": "fixed_loss", "max_acc_loss": 0.02, "data": "val.npz"}, ("tucker",)),
])
def test_auto_adds_channels_only_where_low_rank_cannot_reach_the_goal(tmp_path, family, budget, chosen):
    from compressor.pipeline.techniques import resolve_techniques

    lines = []
    ctx = resolve_techniques(_context(tmp_path, without_zeros(FAMILIES[family]()), lines.append, **budget))
    assert ctx.options.techniques == chosen
    assert len(lines) == (1 if "channels" in chosen else 0)
    if lines:
        assert re.fullmatch(r"techniques: channels,tucker \(low rank alone keeps at least 0\.[5-7]\d\d of the "
                            r"(params|flops), above 0\.5: channel removal goes first\)", lines[0]), lines[0]


def test_named_techniques_and_replays_are_left_as_they_are(tmp_path):
    from compressor.pipeline.techniques import resolve_techniques

    model = without_zeros(FAMILIES["resnext"]())
    ctx = _context(tmp_path, model, method="fixed_params", compression_factor=0.5, techniques=("tucker",))
    assert resolve_techniques(ctx).options.techniques == ("tucker",)
    (tmp_path / "plan.json").write_text("{}")
    ctx = _context(tmp_path, model, plan=tmp_path / "plan.json")
    assert ctx.options.techniques == ("auto",) and resolve_techniques(ctx).options.techniques == ("tucker",)


def test_channels_are_not_added_under_a_metric_they_cannot_measure(tmp_path):
    from compressor.metrics import resolve_metric
    from compressor.pipeline.techniques import resolve_techniques

    lines = []
    ctx = _context(tmp_path, without_zeros(FAMILIES["resnext"]()), lines.append, method="fixed_loss",
                   max_metric_loss=0.1, metric="mse", data="val.npz")
    ctx = resolve_techniques(RunContext(ctx.options, ctx.model, ctx.data, ctx.budget, tmp_path, lines.append,
                                        metric=resolve_metric("mse", None)))
    assert ctx.options.techniques == ("tucker",)
    assert lines == ["techniques: tucker (low rank alone keeps at least 0.728 of the flops, above 0.5; "
                     "channel removal does not measure mse)"]


def test_auto_is_the_default_and_is_not_combined():
    from compressor.errors import OptionError

    with pytest.raises(OptionError, match="auto chooses them itself: pass it alone"):
        CompressOptions(model="m.keras", out="o", method="fixed_params", compression_factor=0.5, techniques=("auto", "channels"))
    assert CompressOptions(model="m.keras", out="o", method="fixed_params", compression_factor=0.5).techniques == ("auto",)
