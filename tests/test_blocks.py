"""Block removal: the surgery, the search under an accuracy budget, and `--techniques blocks` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.report.schema import report_problems
from conftest import tflite_ops

runner = CliRunner()


def small_resnet(dead: tuple[int, ...] = ()):
    """A 14-layer CIFAR ResNet on 12×12 inputs, with the branches of the blocks at positions `dead` zeroed.

    A branch whose last BatchNormalization has gamma = beta = 0 adds nothing: removing
    that block changes no output, while every other block does.
    """
    from compressor.models.zoo import resnet_cifar
    from compressor.techniques.blocks import removable_blocks

    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = resnet_cifar(20, 4, (12, 12, 1), 4)
    x = np.random.default_rng(0).random((8, 12, 12, 1), dtype=np.float32)
    model(x, training=True)  # moving statistics away from their start, so branches matter
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([gamma * rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape), mean, var])
    blocks = removable_blocks(model)
    for position in dead:
        bn = model.get_layer(blocks[position].layers[-1])
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([np.zeros_like(gamma), np.zeros_like(beta), mean, var])
    return model


def test_removing_a_block_computes_the_model_whose_branch_returns_zeros():
    from compressor.graph.cost import model_cost
    from compressor.techniques.blocks import removable_blocks, remove_blocks

    model = small_resnet()
    blocks = removable_blocks(model)
    # ResNet-20: 9 blocks, of which the first of stages 2 and 3 project their shortcut (not identity).
    assert len(blocks) == 7 and all("block1" not in b.add or b.add.startswith("stage1") for b in blocks)
    removed = remove_blocks(model, [blocks[0].add, blocks[4].add])
    x = np.random.default_rng(1).random((16, 12, 12, 1), dtype=np.float32)
    before = np.asarray(model(x))
    assert not np.allclose(np.asarray(removed(x)), before, atol=1e-3)  # the branches mattered
    zeroed = small_resnet(dead=(0, 4))
    np.testing.assert_allclose(np.asarray(remove_blocks(zeroed, [blocks[0].add, blocks[4].add])(x)),
                               np.asarray(zeroed(x)), atol=1e-5)
    # The model is left as it was; the copy has its other layers under the same names, and is smaller.
    np.testing.assert_allclose(np.asarray(model(x)), before, atol=1e-6)
    gone = set(blocks[0].layers) | set(blocks[4].layers) | {blocks[0].add, blocks[4].add}
    assert {layer.name for layer in removed.layers} == {layer.name for layer in model.layers} - gone
    cost, after = model_cost(model), model_cost(removed)
    assert after.flops < cost.flops and after.params < cost.params
    # Weights are copies: changing the copy leaves the model alone.
    name = blocks[1].layers[0]
    removed.get_layer(name).kernel.assign(np.zeros(removed.get_layer(name).kernel.shape))
    assert np.abs(np.asarray(model.get_layer(name).kernel)).sum() > 0


def test_a_name_that_is_not_a_removable_block_is_refused():
    from compressor.surgery.plan import PlanError
    from compressor.techniques.blocks import remove_blocks

    with pytest.raises(PlanError, match="stage2_block1_add.*not an identity residual block"):
        remove_blocks(small_resnet(), ["stage2_block1_add"])  # its shortcut is a projection


def _dataset(x, y):
    from compressor.io.data import Dataset

    return Dataset(x, y, "generated")


def _labelled(model, n, seed):
    x = np.random.default_rng(seed).random((n, 12, 12, 1), dtype=np.float32)
    return _dataset(x, np.asarray(model(x)).argmax(-1))


def test_the_search_removes_the_blocks_that_cost_nothing_and_keeps_the_rest():
    from compressor.search.block_search import BlockSettings, search_blocks
    from compressor.search.budgets import Budget
    from compressor.techniques.blocks import removable_blocks

    model = small_resnet(dead=(1, 5))
    blocks = [block.add for block in removable_blocks(model)]
    data = _labelled(model, 400, 3)
    looks = []
    result = search_blocks(model, Budget("accuracy_drop", 0.01), BlockSettings(confidence=0.95), data,
                           accept=lambda label, candidate: looks.append(label) or True)
    # The two dead blocks cost nothing alone and go first; every live one changes labels of the model's own data,
    # and without fine-tuning a 1-point budget on 400 samples confirms no change at all.
    assert {c.block for c in result.candidates[:2]} == {blocks[1], blocks[5]}
    assert all(c.drop == 0 for c in result.candidates[:2]) and all(c.drop > 0 for c in result.candidates[2:])
    assert set(result.removed) == {blocks[1], blocks[5]}
    assert result.accuracy == result.baseline_accuracy == 1.0
    assert result.cost[1] < result.baseline[1]
    assert looks and all(label.startswith("blocks, ") for label in looks)
    # The blocks that cost nothing alone first, together (the two dead ones: held), then twice as many (four live
    # ones: missed), half as many (missed), then each live one alone, two misses in all.
    assert [len(step.blocks) for step in result.steps] == [2, 4, 2, 1, 1]
    assert [step.accepted for step in result.steps] == [True, False, False, False, False]
    assert set(result.steps[0].blocks) == {blocks[1], blocks[5]}
    # Steps that missed were never shown to the guard.
    assert len(looks) == sum(step.accepted for step in result.steps)
    assert result.to_dict()["removed"] == list(result.removed)


def test_when_no_block_costs_nothing_alone_the_first_step_takes_one():
    from compressor.search.block_search import BlockSettings, search_blocks
    from compressor.search.budgets import Budget

    model = small_resnet(dead=(3,))
    # Labels the model's own, each class's mean output taken away first, so that they are not all one class and
    # every live block changes some of them.
    x = np.random.default_rng(3).normal(0, 1, (400, 12, 12, 1)).astype(np.float32)
    out = np.asarray(model(x))
    data = _dataset(x, (out - out.mean(0)).argmax(-1))
    result = search_blocks(model, Budget("accuracy_drop", 0.01), BlockSettings(confidence=0.95), data)
    free = [c.block for c in result.candidates if c.drop <= 0]
    assert all(c.drop >= 0.02 for c in result.candidates if c.drop > 0)
    # One dead block: it goes alone (held); then two (missed), then each live one alone, two misses in all.
    assert len(free) == 1 and result.steps[0].blocks == (free[0],) and result.steps[0].accepted
    assert [len(step.blocks) for step in result.steps] == [1, 2, 1, 1]
    assert result.removed == (free[0],)


def test_the_guard_s_rejection_ends_the_block_search():
    from compressor.search.block_search import BlockSettings, search_blocks
    from compressor.search.budgets import Budget

    model = small_resnet(dead=(1, 5))
    looks = []
    result = search_blocks(model, Budget("accuracy_drop", 0.01), BlockSettings(confidence=0.95),
                           _labelled(model, 400, 3), accept=lambda label, candidate: looks.append(label) or False)
    # The first step (the two dead blocks) holds on the search data, is shown, is rejected, and nothing follows it.
    assert looks == ["blocks, 2 removed"] and result.removed == () and result.stopped == "guard"
    assert len(result.steps) == 1 and result.steps[0].accuracy == 1.0
    assert set(result.steps[0].blocks) == {c.block for c in result.candidates[:2]}
    assert result.model is model


def _workdir(folder, model):
    model.save(folder / "model.keras")
    for name, n, seed in (("val", 600, 1), ("test", 200, 2), ("train", 256, 3)):
        data = _labelled(model, n, seed)
        np.savez(folder / f"{name}.npz", x=data.x, y=data.y)
    return folder


def test_blocks_then_channels_end_to_end_and_the_plan_replays(tmp_path, monkeypatch):
    import keras

    import compressor.distillation as distillation

    work = _workdir(tmp_path, small_resnet(dead=(0, 3, 6)))
    out = tmp_path / "out"
    teacher_passes = []
    real = distillation.teacher_predictions
    monkeypatch.setattr(distillation, "teacher_predictions",
                        lambda model, x, *a, **k: teacher_passes.append(len(x)) or real(model, x, *a, **k))
    result = runner.invoke(app, [
        "compress", str(work / "model.keras"), "--out", str(out), "--json", "--runs", "5", "--warmup", "1",
        "--data", str(work / "val.npz"), "--test-data", str(work / "test.npz"), "--train-data", str(work / "train.npz"),
        "--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques", "blocks,channels", "--export", "tflite,keras",
        "--finetune-epochs", "1", "--finetune-steps", "2",
    ])
    assert result.exit_code in (0, 2), result.output
    report = json.loads(result.stdout)
    assert report_problems(report) == []
    blocks = report["blocks"]
    # Both searches fine-tuned from the original's outputs, predicted once for the run.
    assert teacher_passes == [256] and report["blocks"]["finetune_epochs"] > 0 < report["channels"]["finetune_epochs"]
    # The three dead blocks cost nothing and are removed; blocks spend at most half the budget before channels.
    assert {"stage1_block1_add", "stage2_block2_add", "stage3_block3_add"} <= set(blocks["removed"])
    assert blocks["budget_share"] == 0.5 and blocks["flops"] < blocks["baseline_flops"]
    rows = [row for row in report["layers"] if row["technique"] == "blocks"]
    assert {row["name"] for row in rows} == set(blocks["removed"])
    assert all(row["params_after"] == 0 < row["params_before"] for row in rows)
    # The channel search went on from the model without those blocks, measured against the original.
    assert report["channels"]["baseline_accuracy"] == blocks["baseline_accuracy"]
    assert report["channels"]["flops"] <= blocks["flops"]
    # The guard saw the block step first, against the original.
    looks = report["search"]["acceptance"]["looks"]
    assert looks[0]["model"].startswith("blocks, ")
    # The artifact has none of the removed blocks' layers: fewer ADD ops than the original's 9.
    assert tflite_ops(out / "model.tflite")[0].count("ADD") == 9 - len(blocks["removed"])
    assert f"Block removal took out {len(blocks['removed'])} residual blocks of 7" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["blocks"] == blocks["removed"]
    # Replaying the plan removes the same blocks and the same channels.
    again = tmp_path / "again"
    replayed = runner.invoke(app, ["compress", str(work / "model.keras"), "--out", str(again), "--json", "--runs", "5",
                                   "--warmup", "1", "--plan", str(out / "plan.json"), "--test-data",
                                   str(work / "test.npz"), "--train-data", str(work / "train.npz"), "--export", "keras"])
    assert replayed.exit_code == 0, replayed.output
    first, second = keras.models.load_model(out / "model.keras"), keras.models.load_model(again / "model.keras")
    assert [layer.name for layer in first.layers] == [layer.name for layer in second.layers]
    assert first.count_params() == second.count_params()


def test_blocks_need_an_accuracy_budget(tmp_path):
    work = _workdir(tmp_path, small_resnet())
    result = runner.invoke(app, ["compress", str(work / "model.keras"), "--out", str(tmp_path / "out"),
                                 "--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "blocks"])
    assert result.exit_code == 1
    assert "blocks" in result.output and "fixed_loss" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_plan_keeps_its_blocks_and_refuses_malformed_ones():
    from compressor.surgery.plan import Plan, PlanError

    plan = Plan(model={"name": "m"}, blocks=("stage1_block2_add", "stage3_block3_add"))
    data = plan.to_dict()
    assert data["blocks"] == ["stage1_block2_add", "stage3_block3_add"]
    assert Plan.from_dict(data).blocks == plan.blocks
    assert "blocks" not in Plan(model={"name": "m"}).to_dict()
    with pytest.raises(PlanError, match="'blocks' must be a list of layer names"):
        Plan.from_dict({**data, "blocks": "stage1_block2_add"})
    with pytest.raises(PlanError, match="removes blocks more than once: stage1_block2_add"):
        Plan(model={}, blocks=("stage1_block2_add", "stage1_block2_add"))


def test_a_gate_shut_for_every_input_becomes_a_removed_block_and_replays_so():
    from compressor.layers.gating import OPEN, gate_layers
    from compressor.search.gating import GatingConfig, GatingOutcome, _remove_shut_blocks, gating_record, replay_gates
    from compressor.techniques.gating import find_residual_blocks, gated_blocks, insert_gates, set_offsets

    static = small_resnet()
    blocks = find_residual_blocks(static)
    gated = insert_gates(static, blocks)
    names = gated_blocks(gated)
    shut = names[2]
    set_offsets(gated, [-OPEN if name == shut else 0.0 for name in names])
    x = np.random.default_rng(5).random((64, 12, 12, 1), dtype=np.float32)
    outcome = GatingOutcome(None, blocks, {}, GatingConfig(network=False))
    fewer, kept, removed = _remove_shut_blocks(gated, blocks, x, None, None, outcome)
    assert removed == (shut,) and [block.add for block in kept] == [name for name in names if name != shut]
    assert gated_blocks(fewer) == [block.add for block in kept]
    np.testing.assert_allclose(np.asarray(fewer(x)), np.asarray(gated(x)), atol=1e-5)
    # A floor the model without the block misses keeps the gate.
    labels = _dataset(x, np.asarray(gated(x)).argmax(-1))
    floor_kept = _remove_shut_blocks(gated, blocks, x, labels, 1.01, outcome)
    assert floor_kept[2] == () and floor_kept[0] is gated
    # The plan records it, and a replay of gates trained alone removes it again.
    outcome.model, outcome.blocks, outcome.removed = fewer, kept, removed
    record = gating_record(outcome)
    assert record["removed"] == [shut] and shut not in record["blocks"] and f"{shut}_gate" not in record["gates"]
    replayed = replay_gates(static, record, None)
    assert gated_blocks(replayed) == record["blocks"] and len(gate_layers(replayed)) == len(names) - 1
    set_offsets(replayed, [0.0] * len(record["blocks"]))
    set_offsets(fewer, [0.0] * len(record["blocks"]))
    np.testing.assert_allclose(np.asarray(replayed(x)), np.asarray(fewer(x)), atol=1e-5)


def test_after_the_guard_rejected_a_block_step_the_channel_search_does_not_run():
    from types import SimpleNamespace

    from compressor.pipeline.channels import ChannelStage
    from compressor.pipeline.context import Run

    logged = []
    closed = SimpleNamespace(closed=True)
    ctx = SimpleNamespace(options=SimpleNamespace(techniques=("blocks", "channels")), log=logged.append)
    run = Run(working=None, compressed=None, acceptance=closed)
    assert ChannelStage().search(ctx, run) is None
    assert logged == ["channels: not searched, the guard rejected a block step and accepts nothing more"]
