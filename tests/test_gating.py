"""Dynamic gating: which blocks get gates, what forced gates compute, and what the artifacts do.

Tolerances: the gated model with every gate open computes `x + branch(x)` with the
same layers and weights as the original (the decision multiplies by exactly 1.0), so
the difference is float32 round-off of a few ops: 1e-5. A TFLite or ONNX artifact of
a gated model runs other kernels (folded batch norm, NCHW in ONNX): 1e-4, as for
every other artifact in tests/test_export.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.layers.gating import OPEN, GatedResidual, SkipGate, gate_layers, is_gated
from compressor.techniques.gating import find_residual_blocks, insert_gates, set_offsets
from conftest import _keras, build_residual, build_sequential, tflite_ops

ATOL_KERAS = 1e-5
ATOL_ARTIFACT = 1e-4


def tiny_resnet():
    """Stem, two identity blocks (one ending in a ReLU after the Add), a projection block, a head."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((16, 16, 3), name="input")
    x = L.ReLU(name="stem_relu")(L.Conv2D(8, 3, padding="same", name="stem")(inputs))
    for i in (1, 2):
        y = L.Conv2D(8, 3, padding="same", activation="relu", name=f"b{i}_conv1")(x)
        y = L.BatchNormalization(name=f"b{i}_bn")(L.Conv2D(8, 3, padding="same", name=f"b{i}_conv2")(y))
        x = L.ReLU(name=f"b{i}_out")(L.Add(name=f"b{i}_add")([x, y]))
    # A projection block: its shortcut is a strided conv, so skipping it could not return its input.
    y = L.Conv2D(16, 3, strides=2, padding="same", name="p_conv")(x)
    s = L.Conv2D(16, 1, strides=2, name="p_shortcut")(x)
    x = L.Add(name="p_add")([s, y])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, activation="softmax", name="head")(x), name="tiny_resnet")


def inverted_residual():
    """MobileNetV2-style: expand 1x1 → depthwise 3x3 → project 1x1, added to the input (branch first)."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((12, 12, 8), name="input")
    y = L.ReLU(6.0)(L.Conv2D(24, 1, name="expand")(inputs))
    y = L.ReLU(6.0)(L.DepthwiseConv2D(3, padding="same", name="depthwise")(y))
    y = L.Conv2D(8, 1, name="project")(y)
    x = L.Add(name="ir_add")([y, inputs])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, activation="softmax")(x), name="inverted_residual")


def not_blocks():
    """Adds that are not residual blocks: two branches of x, and a branch whose inside is used elsewhere."""
    keras = _keras()
    L = keras.layers
    inputs = keras.Input((8, 8, 4))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="b")(inputs)
    two_branches = L.Add(name="two_branches")([a, b])
    inner = L.Conv2D(4, 3, padding="same", name="inner")(two_branches)
    y = L.Conv2D(4, 3, padding="same", name="after_inner")(inner)
    leaky = L.Add(name="leaky")([two_branches, y])
    out = L.Concatenate()([leaky, inner])  # `inner` is used outside the would-be branch
    return keras.Model(inputs, L.GlobalAveragePooling2D()(out), name="not_blocks")


def _x(model, n=6, seed=0):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype("float32")


def test_finds_exactly_the_identity_blocks_of_hand_built_models():
    blocks = find_residual_blocks(tiny_resnet())
    assert [b.add for b in blocks] == ["b1_add", "b2_add"]
    assert blocks[0].input == "stem_relu" and blocks[1].input == "b1_out"
    assert blocks[0].layers == ("b1_conv1", "b1_conv2", "b1_bn")
    inverted = find_residual_blocks(inverted_residual())
    assert len(inverted) == 1 and inverted[0].add == "ir_add" and inverted[0].shortcut == 1
    assert inverted[0].layers[0] == "expand" and inverted[0].layers[-1] == "project" and len(inverted[0].layers) == 5
    assert find_residual_blocks(not_blocks()) == []
    assert find_residual_blocks(build_sequential()) == []


def test_finds_the_blocks_of_keras_mobilenet_v2():
    keras = _keras()
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    adds = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)]
    blocks = find_residual_blocks(model)
    assert len(adds) == 10 and [b.add for b in blocks] == adds  # every MobileNetV2 Add is an identity block


def test_a_model_without_blocks_is_refused_with_a_clear_error():
    with pytest.raises(CompressorError, match="has no residual block"):
        insert_gates(build_sequential())


@pytest.mark.parametrize("build", [tiny_resnet, inverted_residual, build_residual])
def test_gates_forced_open_reproduce_the_original(build):
    model = build()
    gated = insert_gates(model)
    assert is_gated(gated) and not is_gated(model)
    set_offsets(gated, OPEN)
    x = _x(model)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(gated.predict(x, verbose=0), expected, atol=ATOL_KERAS)
    # Batch 1 takes the conditional path (keras.ops.cond): the same outputs.
    single = np.concatenate([np.asarray(gated(x[i : i + 1])) for i in range(len(x))])
    np.testing.assert_allclose(single, expected, atol=ATOL_KERAS)


def test_a_gate_forced_shut_returns_the_block_input():
    keras = _keras()
    gated = insert_gates(tiny_resnet())
    set_offsets(gated, -OPEN)
    x = _x(gated)
    for _, block in gate_layers(gated):
        probe = keras.Model(gated.inputs, [block.input[0], block.output])
        for batch in (x, x[:1]):  # the masked path and the conditional one
            block_input, block_output = probe.predict(batch, verbose=0)
            np.testing.assert_array_equal(block_output, block_input)


def test_new_gates_are_open_and_the_gated_model_saves_and_loads(tmp_path):
    keras = _keras()
    model = tiny_resnet()
    gated = insert_gates(model)
    x = _x(model)
    np.testing.assert_allclose(gated.predict(x, verbose=0), model.predict(x, verbose=0), atol=ATOL_KERAS)
    gated.save(tmp_path / "gated.keras")
    loaded = keras.models.load_model(tmp_path / "gated.keras")
    assert sum(isinstance(layer, GatedResidual) for layer in loaded.layers) == 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), gated.predict(x, verbose=0), atol=1e-7)


def test_a_gated_file_written_before_the_layers_moved_still_loads():
    """tests/data/gated_v1.keras was saved when the gate layers lived in compressor.techniques.gating.

    Its config names that module; Keras finds the layers by their registered names
    ("compressor>SkipGate", "compressor>GatedResidual"), which must never change. Its
    one gate is open for the first two inputs of gated_v1.npz and shut for the others.
    """
    import json
    import zipfile
    from pathlib import Path

    from compressor.io.models import load_model

    path = Path(__file__).parent / "data" / "gated_v1.keras"
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert '"module": "compressor.techniques.gating"' in json.dumps(config)
    model = load_model(path)
    assert [type(layer).__name__ for layer in model.layers if isinstance(layer, (SkipGate, GatedResidual))] == [
        "SkipGate",
        "GatedResidual",
    ]
    expected = np.load(path.with_suffix(".npz"))
    # The same float32 ops on the same weights: equal up to rounding of the summation order.
    np.testing.assert_allclose(model.predict(expected["x"], verbose=0), expected["y"], atol=1e-6)


def test_cost_counts_the_branches_once_and_the_gates():
    from compressor.graph.cost import model_cost

    model = tiny_resnet()
    gated = insert_gates(model)
    base, cost = model_cost(model), model_cost(gated)
    assert cost.params == gated.count_params() == base.params + sum(
        layer.count_params() for layer in gated.layers if isinstance(layer, SkipGate)
    )
    # Each gate: pooling (16*16*8 inputs) + standardize and Dense (4 per channel) + bias and offset.
    assert cost.flops - base.flops == 2 * (16 * 16 * 8 + 4 * 8 + 2)
    assert {row.name for row in cost.layers} >= {"b1_add_gated/b1_conv1", "b1_add_gate", "b1_add_gated"}


def _mixed_gates(gated, x):
    """Gates that open for some inputs and not others: standardized features, random kernels, no bias."""
    from compressor.search.gating import gate_logits, standardize_gates

    standardize_gates(gated, x)
    rng = np.random.default_rng(1)
    for gate, _ in gate_layers(gated):
        gate.kernel.assign(rng.normal(size=tuple(gate.kernel.shape)).astype("float32"))
        gate.bias.assign(np.zeros(1, "float32"))
    runs = gate_logits(gated, x) > 0
    assert runs.any(axis=0).all() and (~runs).any(axis=0).all(), "every gate should open for some inputs and shut for others"
    return runs


def test_tflite_artifact_skips_for_real_and_agrees_per_input(tmp_path):
    from compressor.bench.runtime import open_artifact
    from compressor.export.writers import export_tflite

    gated = insert_gates(tiny_resnet())
    x = _x(gated, n=24, seed=3)
    _mixed_gates(gated, x)
    path = export_tflite(gated, tmp_path / "gated.tflite")
    runner = open_artifact(path)
    assert runner.fixed_batch == 1
    np.testing.assert_allclose(runner.predict(x), gated.predict(x, verbose=0), atol=ATOL_ARTIFACT)
    main, *branches = tflite_ops(path)
    assert main.count("IF") == 2
    # The blocks' convolutions live in the IF branches (then: 2 each; else: none), not in the main graph
    # (stem, projection and shortcut: 3), and hold their weights as constants (XNNPACK can run them).
    assert main.count("CONV_2D") == 3
    assert sorted(ops.count("CONV_2D") for ops, _ in branches) == [0, 0, 2, 2]
    assert all(inputs == 1 for _, inputs in branches)


def test_quantized_tflite_of_a_gated_model_keeps_its_if_ops(tmp_path):
    from compressor.bench.runtime import open_artifact
    from compressor.export.quantize import export_onnx_quantized, export_tflite_quantized
    from compressor.export.writers import export_onnx

    gated = insert_gates(tiny_resnet())
    x = _x(gated, n=24, seed=5)
    _mixed_gates(gated, x)
    path = export_tflite_quantized(gated, tmp_path / "gated.int8.tflite", "int8", calibration=x)
    main, *_ = tflite_ops(path)
    assert main.count("IF") == 2
    # int8 rounding may flip a gate whose logit is near 0; most inputs keep the float model's answer.
    agreement = np.mean(np.argmax(open_artifact(path).predict(x), -1) == np.argmax(gated.predict(x, verbose=0), -1))
    assert agreement >= 0.75
    # ONNX quantization would leave the branches' weights as they are: refused.
    onnx_path = export_onnx(gated, tmp_path / "gated.onnx")
    with pytest.raises(CompressorError, match="not supported"):
        export_onnx_quantized(onnx_path, tmp_path / "gated.dynamic.onnx", "dynamic")


def test_onnx_artifact_of_a_trained_gate_agrees_per_input(tmp_path):
    from compressor.bench.runtime import open_artifact
    from compressor.export.writers import export_onnx

    gated = insert_gates(inverted_residual())
    x = _x(gated, n=24, seed=4)
    _mixed_gates(gated, x)
    runner = open_artifact(export_onnx(gated, tmp_path / "gated.onnx"))
    assert runner.fixed_batch == 1
    np.testing.assert_allclose(runner.predict(x), gated.predict(x, verbose=0), atol=ATOL_ARTIFACT)


def _train_data(model, n=96, seed=0):
    from compressor.io.data import Dataset

    x = _x(model, n=n, seed=seed)
    return Dataset(x, np.argmax(model.predict(x, verbose=0), axis=-1), "generated")


def test_the_flops_penalty_lowers_the_flops_per_input():
    from compressor.graph.cost import model_cost
    from compressor.search.gating import GatingConfig, block_flops, gating_statistics, train_gates

    model = tiny_resnet()
    train = _train_data(model)
    flops = block_flops(model, find_residual_blocks(model))
    mean = {}
    for penalty in (0.0, 20.0):
        gated = insert_gates(model)
        config = GatingConfig(target=0.3, epochs=4, penalty=penalty, batch_size=16, seed=0)
        result = train_gates(gated, model, train, flops, model_cost(model).flops, config)
        assert len(result.history) == 4
        stats = gating_statistics(gated, train.x, flops, model_cost(gated).flops)
        mean[penalty] = stats["flops_per_input"]["mean"]
        assert len(stats["blocks"]) == 2 and stats["samples"] == len(train.x)
    total = model_cost(insert_gates(model)).flops
    # Without the penalty nothing pushes a gate shut; with it, blocks are skipped for real.
    assert mean[0.0] > 0.95 * total
    assert mean[20.0] < mean[0.0] - 0.5 * min(flops.values())


def test_block_flops_are_the_branch_and_the_add():
    from compressor.graph.cost import model_cost
    from compressor.search.gating import block_flops

    model = tiny_resnet()
    rows = {row.name: row.flops for row in model_cost(model).layers}
    flops = block_flops(model, find_residual_blocks(model))
    assert flops["b1_add"] == rows["b1_conv1"] + rows["b1_conv2"] + rows["b1_bn"] + rows["b1_add"]


def _spread(model):
    """Make a random model's predictions differ from input to input (sharper head, balanced classes)."""
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 20, bias])
    logits = np.log(model.predict(_x(model, n=48), verbose=0) + 1e-30)
    head.set_weights([kernel * 20, bias - logits.mean(axis=0)])
    return model


def test_fit_offset_opens_gates_until_the_accuracy_floor_is_met():
    from compressor.finetune import accuracy
    from compressor.search.gating import fit_offset

    model = _spread(tiny_resnet())
    data = _train_data(model, n=48)
    gated = insert_gates(model)
    set_offsets(gated, -OPEN)
    assert accuracy(gated, data) < 0.8  # skipping the blocks costs accuracy: the floor needs some open
    set_offsets(gated, 0.0)
    for gate, _ in gate_layers(gated):
        gate.bias.assign(np.full(1, -5.0, "float32"))  # every gate shut at offset 0
    offset, reached = fit_offset(gated, data, min_accuracy=1.0)
    assert offset > 5.0 and reached == accuracy(gated, data) == 1.0


def test_removing_a_gate_makes_its_block_always_run():
    from compressor.techniques.gating import remove_gates

    model = tiny_resnet()
    gated = insert_gates(model)
    x = _x(model)
    set_offsets(gated, [-OPEN, -OPEN])
    fewer = remove_gates(gated, {"b2_add"})
    assert [block.name for _, block in gate_layers(fewer)] == ["b2_add_gated"]
    from compressor.search.gating import gate_logits

    # Its kept gate has been called in two graphs: its logits come from this one.
    assert gate_logits(fewer, x).shape == (len(x), 1) and (gate_logits(fewer, x) < 0).all()
    assert "b1_conv1" in {layer.name for layer in fewer.layers}  # back in the outer graph, same weights
    set_offsets(gated, [OPEN, -OPEN])  # what `fewer` computes: b1 always runs, b2's gate still shut
    np.testing.assert_array_equal(fewer.predict(x, verbose=0), gated.predict(x, verbose=0))
    none = remove_gates(gated, set())
    assert not is_gated(none) and none.count_params() == model.count_params()
    np.testing.assert_allclose(none.predict(x, verbose=0), model.predict(x, verbose=0), atol=ATOL_KERAS)
