"""Fine-tuning at scale: streamed batches, a cap on optimizer steps, progress in steps, MirroredStrategy.

The unit tests train test_finetune's tiny classifiers; the end-to-end ones compress the
golden tiny residual model on `quadrants`; the mirrored run is a subprocess that splits
the CPU into two logical devices before TensorFlow starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import CompressorError, OptionError
from compressor.finetune import FinetuneConfig, accuracy, finetune
from compressor.finetune_step import batch_sizes, batches
from conftest import write_quadrants_data
from test_finetune import copy_of, damaged, data, kernel, teacher  # noqa: F401 - fixtures

HERE = Path(__file__).parent


def test_batches_stream_the_rows_in_order():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    y = np.arange(50, dtype=np.int64)
    order = np.random.default_rng(0).permutation(50)[:45]
    got = list(batches((x, y), order, batch_sizes(45, 16), None))
    assert [len(b[1]) for b in got] == [16, 16, 13]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x[order])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y[order])


def test_batch_sizes_give_every_replica_a_sample():
    assert batch_sizes(449, 64) == [64] * 7 + [1]
    assert batch_sizes(449, 64, replicas=2) == [64] * 6 + [65]
    assert batch_sizes(450, 64, replicas=2) == [64] * 7 + [2]
    assert batch_sizes(1, 64, replicas=2) == [1] and batch_sizes(128, 64, replicas=8) == [64, 64]


def test_max_steps_caps_the_run_and_progress_counts_steps(data, teacher):
    train, val = data  # 512 samples: 8 steps of 64 per epoch
    seen, epochs = [], []
    result = finetune(
        damaged(teacher), teacher, train, FinetuneConfig(epochs=3, max_steps=10), val=val,
        on_step=lambda done, total: seen.append((done, total)),
        on_epoch=lambda epoch, total, entry: epochs.append((epoch, entry["step"])),
    )
    assert result.steps == 10 and result.epochs_run == 2 and not result.stopped_early
    # Checks at each epoch's end: the second epoch ends after its 2 steps.
    assert [(h["epoch"], h["step"]) for h in result.history] == [(1, 8), (2, 10)]
    assert epochs == [(1, 8), (2, 10)]
    assert seen == [(step, 10) for step in range(1, 11)]
    uncapped = finetune(damaged(teacher), teacher, train.take(128), FinetuneConfig(epochs=2, max_steps=100))
    assert uncapped.steps == 4 and uncapped.epochs_run == 2


def test_check_every_stops_early_within_an_epoch(data, teacher):
    train, val = data
    student = copy_of(teacher)
    start = accuracy(student, val)
    result = finetune(student, teacher, train, FinetuneConfig(epochs=2, check_every=3), val=val,
                      target_accuracy=start - 0.2)
    assert result.stopped_early and result.steps == 3 and result.epochs_run == 1
    assert [(h["epoch"], h["step"]) for h in result.history] == [(1, 3)]
    # Unreached: checks every 3 steps and at each epoch's end, the loss averaged since the last check.
    result = finetune(damaged(teacher), teacher, train, FinetuneConfig(epochs=2, check_every=3), val=val,
                      target_accuracy=1.0)
    assert [h["step"] for h in result.history] == [3, 6, 8, 9, 12, 15, 16]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)


def test_teacher_per_batch_trains_like_teacher_once(data, teacher):
    train = data[0].take(256)
    students = []
    for teacher_pass in ("once", "per_batch"):
        student = damaged(teacher)
        finetune(student, teacher, train, FinetuneConfig(epochs=1, teacher_pass=teacher_pass))
        students.append(student)
    # The same logits, computed in another graph: 4 Adam steps of ~1e-3 agree far within 1e-5.
    for a, b in zip(students[0].get_weights(), students[1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(kernel(students[0], "hidden"), kernel(damaged(teacher), "hidden"))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_steps": 0}, "max_steps"), ({"check_every": 0}, "check_every"),
     ({"teacher_pass": "never"}, "teacher_pass"), ({"distribute": "tpu"}, "distribute")],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(CompressorError, match=f"Invalid {field}"):
        FinetuneConfig(epochs=1, **kwargs)


def test_options_check_the_steps_cap_and_the_strategy():
    from compressor.config import CompressOptions

    base = {"model": Path("m.keras"), "out": Path("o"), "method": "fixed_params", "compression_factor": 0.5,
            "train_data": "t.npz"}
    with pytest.raises(OptionError, match="needs finetune_epochs= as well"):
        CompressOptions.parse(**base, finetune_steps=10)
    with pytest.raises(OptionError, match="Invalid finetune steps"):
        CompressOptions.parse(**base, finetune_epochs=1, finetune_steps=0)
    with pytest.raises(OptionError, match="Invalid distribute"):
        CompressOptions.parse(**base, finetune_epochs=1, distribute="tpu")
    for bad in (0, -0.001, float("nan"), True):
        with pytest.raises(OptionError, match="Invalid finetune lr"):
            CompressOptions.parse(**base, finetune_epochs=1, finetune_lr=bad)
    options = CompressOptions.parse(**base, finetune_epochs=2, finetune_steps=10, distribute="Mirrored", finetune_lr=0.003)
    from compressor.pipeline.finetuning import finetune_config

    config = finetune_config(options)
    assert (config.max_steps, config.check_every, config.distribute, config.learning_rate) == (10, 3, "mirrored", 0.003)
    assert finetune_config(CompressOptions.parse(**base, finetune_epochs=1)).learning_rate == 1e-3


def test_steps_are_planned_recorded_and_replayed(tmp_path, monkeypatch):
    """A capped run records its steps and learning rate in plan.json; the replay trains exactly as many, at that rate."""
    import compressor
    import compressor.finetune

    rates = []
    original_finetune = compressor.finetune.finetune

    def spy(model, teacher, train, config, **kwargs):
        rates.append(config.learning_rate)
        return original_finetune(model, teacher, train, config, **kwargs)

    monkeypatch.setattr(compressor.finetune, "finetune", spy)
    write_quadrants_data(tmp_path)
    common = {"test_data": str(tmp_path / "test.npz"), "train_data": str(tmp_path / "train.npz"),
              "export": "keras", "runs": 1, "warmup": 0, "cache_dir": tmp_path / "cache"}
    seen = []
    compressor.compress(
        HERE / "golden" / "model.keras", str(tmp_path / "val.npz"), out=tmp_path / "search", method="fixed_params",
        compression_factor=0.6, techniques="tucker", finetune_epochs=3, finetune_steps=3, finetune_lr=0.002,
        progress=lambda stage, done, total: seen.append((stage, done, total)), **common,
    )
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    # 128 training samples: 2 steps per epoch; 3 epochs cut at 3 steps = 2 epochs begun.
    assert {k: plan["finetune"][k] for k in ("epochs", "steps", "steps_per_run", "epochs_per_run", "learning_rate")} == {
        "epochs": 2, "steps": 3, "steps_per_run": 3, "epochs_per_run": 3, "learning_rate": 0.002}
    assert rates == [0.002]
    assert [entry for entry in seen if entry[0] == "fine-tuning"] == [("fine-tuning", s, 3) for s in (1, 2, 3)]
    report = json.loads((tmp_path / "search" / "report.json").read_text())
    assert {k: report["finetune"][k] for k in ("steps", "final_steps", "steps_per_run", "learning_rate", "replicas")} == {
        "steps": 3, "final_steps": 3, "steps_per_run": 3, "learning_rate": 0.002, "replicas": 1}
    assert "3 optimizer steps in 2 epochs in all, at most 3 per run" in (tmp_path / "search" / "report.md").read_text()
    compressor.compress(HERE / "golden" / "model.keras", str(tmp_path / "val.npz"), out=tmp_path / "replay",
                        plan=tmp_path / "search" / "plan.json", **common)
    replayed = json.loads((tmp_path / "replay" / "report.json").read_text())["finetune"]
    assert (replayed["final_steps"], replayed["final_epochs"]) == (3, 2)
    assert rates == [0.002, 0.002]  # the replay trains at the recorded rate, not the default


MIRRORED = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import keras
    from test_finetune import build, copy_of, damaged, make_data
    from compressor.finetune import FinetuneConfig, accuracy, finetune

    train, val = make_data(512, 0), make_data(512, 1)
    model = build()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(train.x, train.y, batch_size=64, epochs=6, verbose=0)
    teacher = copy_of(model)
    keep = np.random.default_rng(0).random(teacher.get_layer("hidden").kernel.shape) < 0.5
    out = {"devices": len(tf.config.list_logical_devices("CPU"))}
    # 448 samples: 7 batches of 64 either way. 449: the last batch of 1 sample joins the one before
    # on two replicas (else one replica would get none).
    for distribute, samples in (("none", 448), ("mirrored", 448), ("mirrored_449", 449)):
        student = damaged(teacher)
        result = finetune(student, teacher, train.take(samples), FinetuneConfig(epochs=3, learning_rate=3e-3,
                          distribute=distribute.split("_")[0]), val=val, masks={"hidden": keep})
        hidden = np.asarray(student.get_layer("hidden").kernel)
        out[distribute] = {"replicas": result.replicas, "steps": result.steps, "accuracy": accuracy(student, val),
                           "losses": [h["loss"] for h in result.history],
                           "masked_zero": bool(np.all(hidden[~keep] == 0)), "kept_nonzero": bool(np.all(hidden[keep] != 0))}
    print(json.dumps(out))
""")


def test_mirrored_strategy_uses_two_replicas_and_trains_alike(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(script), str(HERE)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    one, two, odd = out["none"], out["mirrored"], out["mirrored_449"]
    assert out["devices"] == 2 and one["replicas"] == 1 and two["replicas"] == odd["replicas"] == 2
    assert one["steps"] == two["steps"] == odd["steps"] == 3 * 7
    for run in (two, odd):
        assert all(np.isfinite(run["losses"])) and run["masked_zero"] and run["kept_nonzero"], run
    # The same global batches and summed gradients; only batch norm's statistics are per replica
    # (half batches). Observed: accuracy 0.840 both, losses within 0.4%.
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.03, (one, two)
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=0.05)


def test_too_few_samples_for_the_devices_is_a_data_error(monkeypatch, data, teacher):
    from compressor.errors import DataError

    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr("compressor.finetune.distribute_strategy", lambda name: TwoReplicas())
    with pytest.raises(DataError, match="1 sample.*fewer than the 2 devices"):
        finetune(damaged(teacher), teacher, data[0].take(1), FinetuneConfig(epochs=1, distribute="mirrored"))
