"""The stages of `compress` (`compressor.pipeline.stages`): records make the plan, and a replay of the plan
rebuilds the model the search made."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from compressor.config import CompressOptions
from compressor.errors import OptionError, flag_name
from compressor.pipeline.context import Run, RunContext, Splits
from compressor.pipeline.records import BlockRecord, ChannelRecord, FinetuneRecord, GatingRecord, LayerRecord
from compressor.surgery.plan import ChannelRemoval, LayerEdit, SkippedLayer


def _options(tmp_path, **values):
    values.setdefault("method", "fixed_params")
    values.setdefault("compression_factor", 0.5)
    return CompressOptions(model=tmp_path / "model.keras", out=tmp_path / "out", **values)


def _context(tmp_path, model=None, data=Splits(), **values):
    options = _options(tmp_path, **values)
    return RunContext(options, model, data, options.budget(), tmp_path)


# --- records and the plan (no TensorFlow) ----------------------------------------------------


def test_the_plan_is_made_of_the_records_fields():
    removal = ChannelRemoval("conv", 8, (1, 2))
    edit = LayerEdit("dense", "svd", rank=2)
    run = Run(working=None, compressed=None, identity={"name": "m"})
    run.records += [
        ChannelRecord((removal,)),
        LayerRecord((edit,), (SkippedLayer("head", "too small"),), {"data": "train", "seed": 0}),
        FinetuneRecord({"epochs": 2, "teacher": "original", "seed": 0}),
        GatingRecord(None),
    ]
    plan = run.plan()
    assert plan.model == {"name": "m"} and plan.channels == (removal,) and plan.edits == (edit,)
    assert plan.skipped == (SkippedLayer("head", "too small"),) and plan.statistics == {"data": "train", "seed": 0}
    assert plan.finetune["epochs"] == 2 and plan.gating is None
    assert run.record(LayerRecord).edits == (edit,) and run.record(GatingRecord).entry is None


def test_a_stage_that_did_not_run_has_no_record_and_leaves_its_plan_fields_empty():
    run = Run(working=None, compressed=None, identity={"name": "m"})
    assert run.record(ChannelRecord) is None
    plan = run.plan()
    assert (plan.blocks, plan.channels, plan.edits, plan.finetune, plan.statistics, plan.gating) == ((), (), (), None, None, None)


def test_each_stage_reads_back_the_record_it_wrote():
    from compressor.pipeline.stages import STAGES

    run = Run(working=None, compressed=None, identity={"name": "m"})
    run.records += [
        BlockRecord(("stage1_block2_add", "stage3_block3_add")),
        ChannelRecord((ChannelRemoval("conv", 8, (3,)),)),
        LayerRecord((LayerEdit("dense", "svd", rank=2),), (), None),
        FinetuneRecord({"epochs": 1, "teacher": "original", "seed": 4}),
        GatingRecord({"blocks": ["add"], "target": 0.5}),
    ]
    plan = run.plan()
    # The acceptance stage records nothing: it only drops what the guard rejects, and a replay applies the plan as is.
    recording = [stage for stage in STAGES if stage.name != "acceptance"]
    assert next(stage for stage in STAGES if stage.name == "acceptance").recorded(plan) is None
    for stage, written in zip(recording, run.records):
        assert stage.recorded(plan).plan_fields() == written.plan_fields(), stage.name


def test_a_replay_prepares_statistics_as_the_plan_records_them_not_as_the_options_say():
    from compressor.techniques.registry import DEFAULT_REGISTRY, registry_for_plan

    # The record's criterion decides: snip scores need data, masks by magnitude need none.
    with pytest.raises(OptionError, match="the plan's edits need snip scores gathered on data"):
        registry_for_plan(["sparsity"], {"data": "train", "seed": 3, "criterion": "snip"}, None, None, source="train")
    assert registry_for_plan(["sparsity"], None, None, None, source="train") is DEFAULT_REGISTRY
    assert registry_for_plan(["tucker"], {"data": "train", "criterion": "snip"}, None, None, source="train") is DEFAULT_REGISTRY


def test_statistics_without_data_name_the_options_to_pass():
    from compressor.techniques.registry import prepare_registry, registry_for_plan

    with pytest.raises(OptionError) as caught:
        prepare_registry(("hessian", "sparsity"), None, None, source="train", criterion="snip")
    assert caught.value.render(flag_name) == "--techniques hessian,sparsity gathers K-FAC statistics on data: pass --train-data or --data"
    with pytest.raises(OptionError, match="the plan's edits need K-FAC statistics gathered on data: pass train_data= or data="):
        registry_for_plan(["hessian"], None, None, None, source="train")


def test_a_fine_tuned_plan_is_refused_without_training_data(tmp_path):
    from compressor.pipeline.finetuning import FinetuneStage

    ctx = _context(tmp_path, method=None, compression_factor=None, plan=tmp_path / "plan.json")
    with pytest.raises(OptionError) as caught:
        FinetuneStage().check(ctx, FinetuneRecord({"epochs": 3}))
    assert caught.value.render(flag_name).endswith("plan.json was fine-tuned (3 epochs): pass --train-data to replay it")
    FinetuneStage().check(ctx, FinetuneRecord(None))  # not fine-tuned: nothing to refuse


# --- search, then replay (tiny models) ---------------------------------------------------------


def test_gating_is_refused_before_any_search_on_a_model_without_residual_blocks(tmp_path):
    from conftest import build_sequential

    from compressor.pipeline import stages

    ctx = _context(tmp_path, build_sequential(), techniques=("gating",), train_data="train.npz")
    with pytest.raises(OptionError, match="has no residual block"):
        stages.search(ctx)


@pytest.mark.parametrize("techniques", [("channels", "tucker"), ("tucker", "sparsity"), ("channels",)])
def test_replaying_the_plan_of_a_search_rebuilds_the_same_model(tmp_path, techniques, residual_model):
    from compressor.pipeline import stages

    ctx = _context(tmp_path, residual_model, techniques=techniques)
    searched = stages.search(ctx)
    plan = searched.plan()
    assert plan.edits or plan.channels
    replayed = stages.replay(ctx, plan)
    assert replayed.plan().to_dict() == plan.to_dict()
    x = np.random.default_rng(0).random((4, *residual_model.input_shape[1:]), dtype=np.float32)
    # No training in these runs: the rebuilt layers are the searched ones, up to float summation order.
    ours, again = searched.compressed.predict(x, verbose=0), replayed.compressed.predict(x, verbose=0)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    # The report's per-layer costs: from the search's choices, or costed from the replayed edits.
    assert set(replayed.record(LayerRecord).costs) == {edit.layer for edit in plan.edits}


def test_a_cost_budget_shared_by_channels_and_layers_is_met_by_the_two_together(tmp_path, residual_model):
    from compressor.graph.cost import model_cost
    from compressor.pipeline import stages

    ctx = _context(tmp_path, residual_model, techniques=("channels", "tucker"), compression_factor=0.4)
    run = stages.search(ctx)
    channels, layers = run.record(ChannelRecord), run.record(LayerRecord)
    base = model_cost(residual_model).params
    # Channels aimed at the square root of the budget; the layers searched for what was left.
    assert channels.result.params <= np.sqrt(0.4) * base * 1.001
    if layers is not None:
        assert layers.search.budget.limit == pytest.approx(0.4 * base / channels.result.params)
    assert model_cost(run.compressed).params <= 0.4 * base * 1.001

