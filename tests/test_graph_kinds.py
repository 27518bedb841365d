"""Every graph kind through every rewriter of the graph layer, with parity checks.

Kinds (`conftest.GRAPH_KINDS`): Sequential, Functional (residual Add), a nested model,
a layer called twice, parallel branches joined by a Concatenate. Rewriters: layer
replacement (`rewrite_model`), channel removal (`prune_channels`), gate insertion and
removal (`insert_gates`, `remove_gates`), the copies scores run on (`logits_copy`,
`scoring_copy`), and the K-FAC recorder, which runs a model op by op.

Tolerance: every check compares float32 models whose computations differ only in
rounding (a kernel split into two halves that are summed, channels whose every
consumer reads zeros, the same ops run one by one); outputs are O(1) probabilities,
so differences stay near 1e-7. atol 1e-5 leaves room for a different summation order
on another machine and still catches any wiring error (those move outputs by 1e-2).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from compressor.errors import CompressorError  # noqa: E402
from compressor.graph.groups import channel_groups  # noqa: E402
from compressor.graph.outputs import ends_in_softmax  # noqa: E402
from compressor.io.data import Dataset  # noqa: E402
from compressor.layers.gating import OPEN, gate_layers  # noqa: E402
from compressor.surgery.channels import prune_channels  # noqa: E402
from compressor.surgery.editable import editable_layers  # noqa: E402
from compressor.surgery.replacement import Piece, Replacement  # noqa: E402
from compressor.surgery.rewrite import rewrite_model  # noqa: E402
from compressor.techniques.gating import find_residual_blocks, insert_gates, remove_gates, set_offsets  # noqa: E402
from compressor.techniques.kfac import kfac_factors, kfac_layers  # noqa: E402
from compressor.techniques.kfac_recorder import PreactivationRecorder  # noqa: E402
from compressor.techniques.score_copies import logits_copy, scoring_copy  # noqa: E402
from conftest import GRAPH_KINDS  # noqa: E402

ATOL = 1e-5
KINDS = sorted(GRAPH_KINDS)
WITH_BLOCKS = {"functional", "shared", "multi_branch"}  # an identity-shortcut residual block at the top level


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    return GRAPH_KINDS[kind]()


def inputs(model, n=6, seed=0):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


# --- layer replacement -----------------------------------------------------------------


def halves(layer):
    """A Replacement computing the same: the kernel in two halves, summed, then the activation."""
    config = layer.get_config()
    kernel, *bias = layer.get_weights()
    chain = layer.__class__.from_config({**config, "name": f"{layer.name}_a", "activation": "linear"})
    branch = layer.__class__.from_config(
        {**config, "name": f"{layer.name}_b", "activation": "linear", "use_bias": False}
    )
    return Replacement(
        chain=[Piece(chain, [kernel / 2, *bias])], branch=Piece(branch, [kernel / 2]), activation=config["activation"]
    )


def test_replacing_every_kernel_layer_keeps_the_outputs(model):
    names = [
        name for name, layer in editable_layers(model).items()
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]  # fmt: skip
    assert names
    x = inputs(model)
    rewritten = rewrite_model(model, {name: halves for name in names})
    np.testing.assert_allclose(outputs(rewritten, x), outputs(model, x), atol=ATOL)
    assert not set(names) & set(editable_layers(rewritten))


# --- channel removal -------------------------------------------------------------------


def silence_channel(model, group, channel):
    """Zero every consumer's input rows of one group channel: the outputs no longer depend on it."""
    for name in group.consumers:
        layer = model.get_layer(name)
        kernel, *rest = layer.get_weights()
        rows = np.asarray(group.input_indices[name]) == channel
        kernel[..., rows, :] = 0.0
        layer.set_weights([kernel, *rest])


def test_removing_a_channel_no_consumer_reads_keeps_the_outputs(model, kind):
    groups = [group for group in channel_groups(model) if group.prunable and group.size > 1]
    removals = {}
    if groups:
        silence_channel(model, groups[0], 0)
        removals = {groups[0].name: [0]}
    else:
        assert kind == "nested"  # the nested model is opaque and the head feeds the output
    x = inputs(model)
    pruned = prune_channels(model, removals)
    np.testing.assert_allclose(outputs(pruned, x), outputs(model, x), atol=ATOL)
    if removals:
        assert pruned.count_params() < model.count_params()


# --- gate insertion and removal ----------------------------------------------------------


def test_open_gates_and_removed_gates_keep_the_outputs(model, kind):
    if kind not in WITH_BLOCKS:
        assert not find_residual_blocks(model)
        with pytest.raises(CompressorError, match="no residual block"):
            insert_gates(model)
        return
    x = inputs(model)
    gated = insert_gates(model)
    assert len(gate_layers(gated)) == 1
    set_offsets(gated, OPEN)
    np.testing.assert_allclose(outputs(gated, x), outputs(model, x), atol=ATOL)
    np.testing.assert_allclose(outputs(gated, x[:1]), outputs(model, x[:1]), atol=ATOL)  # the conditional path
    ungated = remove_gates(gated, keep=set())
    assert not gate_layers(ungated)
    np.testing.assert_allclose(outputs(ungated, x), outputs(model, x), atol=ATOL)


# --- the copies scores run on ------------------------------------------------------------


def test_scoring_copies_keep_the_outputs(model):
    x = inputs(model)
    expected = outputs(model, x)
    logits, _ = logits_copy(model)
    assert ends_in_softmax(model) is True and ends_in_softmax(logits) is False
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits(x))), expected, atol=ATOL)
    wide, copies = scoring_copy(model, dtype="float64")
    assert wide.inputs[0].dtype == "float64" and copies
    np.testing.assert_allclose(outputs(wide, x.astype(np.float64)), expected, atol=ATOL)


# --- the K-FAC recorder --------------------------------------------------------------------


def test_recorder_runs_the_model_op_by_op(model):
    targets, skipped = kfac_layers(model)
    x = inputs(model)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        recorder = PreactivationRecorder(model, targets, tape)
        output = recorder.run(tf.convert_to_tensor(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(output), outputs(model, x), atol=ATOL)
    assert set(recorder.preacts) == set(targets)
    # The model ends in a softmax: the log-probabilities come from the recorded logits.
    np.testing.assert_allclose(np.exp(recorder.log_probs(output).numpy()), outputs(model, x), atol=ATOL)
    factors = kfac_factors(model, Dataset(x, None, "random"), samples=len(x))
    assert set(factors) == set(targets)
    assert all(name.startswith("shared") for name in skipped)  # only the shared layer, called twice
