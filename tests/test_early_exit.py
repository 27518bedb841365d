"""Early exits: exit points, the exit model, its artifacts per input, calibration, and the stage end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli.app import app
from compressor.report.schema import report_problems
from conftest import onnx_ops, quadrants, tflite_ops, write_quadrants_workdir

runner = CliRunner()
ATOL = 1e-4


def small_resnet():
    from compressor.models.zoo import resnet_cifar

    return resnet_cifar(depth=20, width=4, input_shape=(16, 16, 3), num_classes=4)


def _built(model, thresholds=None):
    """The model with exits at the default points, untrained heads (seeded), and the given thresholds."""
    import keras

    from compressor.techniques.early_exit import choose_points, exit_head, exit_points, insert_exits, set_thresholds

    keras.utils.set_random_seed(0)
    points = choose_points(exit_points(model))
    heads = [exit_head(p, 4, 8, f"{p.name}_exit_head") for p in points]
    built = insert_exits(model, points, heads, probabilities=True)
    if thresholds is not None:
        set_thresholds(built, thresholds)
    return built, points, heads


def _spread_thresholds(model, x):
    """The exit model with thresholds at the median of each exit's confidence on `x`: some inputs leave at each exit."""
    from compressor.search.early_exit import exit_answers, exit_choices
    from compressor.techniques.early_exit import set_thresholds

    built, points, heads = _built(model)
    probabilities, _ = exit_answers(model, points, heads, x)
    set_thresholds(built, [float(np.median(p.max(-1))) for p in probabilities])
    choice, _ = exit_choices(model, built, x)
    return built, choice, len(points)


def test_exit_points_are_the_cuts_of_the_graph_and_the_defaults_are_near_quarters_of_the_flops():
    from compressor.techniques.early_exit import MAX_FRACTION, choose_points, exit_points

    model = small_resnet()
    points = exit_points(model)
    names = [p.name for p in points]
    # Every block's output (after its ReLU) is a cut; the Add before it is the same point and is not offered,
    # and nothing inside a block (its shortcut is live) nor after MAX_FRACTION of the FLOPs is.
    assert "stage1_block1_out" in names and "stage2_block1_out" in names
    assert not any(name.endswith("_add") or "conv" in name for name in names)
    fractions = [p.fraction for p in points]
    assert fractions == sorted(fractions) and fractions[-1] <= MAX_FRACTION
    chosen = choose_points(points, (0.25, 0.5, 0.75))
    assert len(chosen) == 3
    for point, target in zip(chosen, (0.25, 0.5, 0.75)):
        assert abs(point.fraction - target) == pytest.approx(min(abs(p.fraction - target) for p in points))


def test_models_with_shared_layers_or_several_outputs_offer_no_exit_point():
    import keras

    from compressor.techniques.early_exit import exit_points
    from conftest import build_shared

    assert exit_points(build_shared()) == []
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    two = keras.Model(inputs, [keras.layers.Flatten()(x), keras.layers.GlobalAveragePooling2D()(x)])
    assert exit_points(two) == []


def test_closed_exits_compute_the_original_and_an_open_first_exit_answers_everything(tmp_path):
    import keras

    from compressor.graph.cost import model_cost
    from compressor.search.early_exit import exit_answers
    from compressor.techniques.early_exit import set_thresholds

    model = small_resnet()
    x = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    built, points, heads = _built(model)
    np.testing.assert_allclose(built.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    set_thresholds(built, [0.0] * len(points))
    probabilities, _ = exit_answers(model, points, heads, x)
    np.testing.assert_allclose(built.predict(x, verbose=0), probabilities[0], atol=1e-5)
    # The heads are counted once each, on top of the network; layers keep their names; the original is unchanged.
    assert model_cost(built).flops == model_cost(model).flops + sum(model_cost(h).flops for h in heads)
    assert len(model.layers) == len(small_resnet().layers)
    built.save(tmp_path / "exits.keras")
    again = keras.models.load_model(tmp_path / "exits.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), probabilities[0], atol=1e-5)


def test_tflite_and_onnx_artifacts_branch_for_real_and_agree_with_keras_on_inputs_leaving_at_each_exit(tmp_path):
    from compressor.bench.runtime import open_artifact
    from compressor.export.writers import export_onnx, export_tflite

    model = small_resnet()
    x = np.random.default_rng(1).random((48, 16, 16, 3), dtype=np.float32)
    built, choice, exits = _spread_thresholds(model, x)
    assert set(np.unique(choice)) == set(range(exits + 1)), "every exit and the end answer some inputs"
    expected = built.predict(x, verbose=0)
    tflite = export_tflite(built, tmp_path / "exits.tflite")
    main, *branches = tflite_ops(tflite)
    assert main.count("IF") == 1 and sum(ops.count("IF") for ops, _ in branches) == exits - 1
    onnx = export_onnx(built, tmp_path / "exits.onnx")
    assert onnx_ops(onnx).count("If") == 1
    for path in (tflite, onnx):
        got = open_artifact(path).predict(x, batch_size=1)
        for k in range(exits + 1):
            np.testing.assert_allclose(got[choice == k], expected[choice == k], atol=ATOL, err_msg=f"{path.name}, exit {k}")


def _calibration_case(seed, wrong_when_confident):
    """One exit whose confidence is high on 60% of 4,000 samples; there it is right (or wrong, as asked)."""
    rng = np.random.default_rng(seed)
    n, classes = 4000, 4
    y = rng.integers(0, classes, n)
    confident = rng.random(n) < 0.6
    answer = np.where(confident & wrong_when_confident, (y + 1) % classes, y)
    probabilities = np.full((n, classes), 0.1 / 3, np.float32)
    probabilities[np.arange(n), answer] = np.where(confident, 0.9, 0.4)
    probabilities[~confident] = 0.25
    return [probabilities], np.ones(n, bool), y


@pytest.mark.parametrize("wrong", [False, True])
def test_calibration_opens_an_exit_only_where_the_drop_holds(wrong):
    from compressor.search.early_exit import ExitSettings, calibrate
    from compressor.techniques.early_exit import ExitPoint

    probabilities, final_correct, y = _calibration_case(0, wrong)
    point = ExitPoint("p", 1, (4, 4, 8), 300, 0.3)
    settings = ExitSettings(confidence=0.95)
    thresholds = calibrate(probabilities, final_correct, y, np.ones(len(y), bool), 0.02, [point], [10], 1000, settings)
    if wrong:
        # Confident and wrong: any input it answered would cost a point, far above 0.02 for 60% of inputs.
        assert thresholds == [2.0]
    else:
        # Right wherever it is confident: it answers exactly those 60% (threshold at or below 0.9, above 0.4).
        assert 0.4 < thresholds[0] <= 0.9


@pytest.mark.parametrize("shape,cells", [((28, 28, 16), 16), ((14, 14, 8), 9), ((7, 7, 4), 9), ((3, 3, 2), 9), ((10, 3), 3)])
def test_a_head_pools_its_map_to_a_grid_of_at_most_four_cells_a_side_beside_a_global_max(shape, cells):
    import keras

    from compressor.techniques.early_exit import GRID, pooled_features

    inputs = keras.Input(shape)
    pooled = keras.Model(inputs, pooled_features(inputs))
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    got = pooled.predict(x, verbose=0)
    channels = shape[-1]
    assert got.shape == (2, cells * channels + channels)
    # Windows of ceil(size / GRID) with valid padding, averaged, flattened cell by cell (channels last), then the max.
    window = [-(-d // GRID) for d in shape[:-1]]
    counts = [d // w for d, w in zip(shape[:-1], window)]
    kept = x[(slice(None), *[slice(0, c * w) for c, w in zip(counts, window)])]
    split = kept.reshape(2, *[v for c, w in zip(counts, window) for v in (c, w)], channels)
    grid = split.mean(axis=tuple(range(2, 2 * len(counts) + 1, 2))).reshape(2, -1)
    np.testing.assert_allclose(got, np.concatenate([grid, x.max(axis=tuple(range(1, len(shape))))], -1), atol=1e-6)


def test_a_head_tells_where_in_the_image_a_feature_fires():
    # Class = the brighter quadrant. After a 1x1 convolution every class's feature map holds the same values in
    # another place, so a global average or max cannot tell the classes apart; the grid head can.
    import keras

    from compressor.io.data import Dataset
    from compressor.search.early_exit import ExitSettings, exit_answers, train_heads
    from compressor.techniques.early_exit import exit_points

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 1, activation="relu", name="pointwise")(inputs)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(h)
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    point = next(p for p in exit_points(model) if p.name == "pointwise")
    (xt, yt), (xs, ys) = quadrants(800, 20), quadrants(400, 21)
    heads = train_heads(model, [point], Dataset(xt, yt, "train"), 4, ExitSettings(epochs=10))
    probabilities, _ = exit_answers(model, [point], heads, xs)
    assert np.mean(probabilities[0].argmax(-1) == ys) >= 0.9  # chance is 0.25


def test_a_plan_from_before_the_grid_replays_heads_that_pool_globally():
    from compressor.io.data import Dataset
    from compressor.layers.early_exit import exit_layers
    from compressor.pipeline.early_exit import replay_exits
    from compressor.techniques.early_exit import GRID, choose_points, exit_points

    model = small_resnet()
    point = choose_points(exit_points(model))[0]
    channels = point.shape[-1]
    train = Dataset(*quadrants(64, 30), "train")
    entry = {"points": [point.name], "thresholds": [0.5], "hidden": 8, "epochs": 1, "seed": 0}
    for recorded, width in ((None, 2 * channels), (GRID, (min(GRID, point.shape[0]) ** 2 + 1) * channels)):
        replayed = replay_exits(model, entry if recorded is None else {**entry, "grid": recorded}, train)
        head = exit_layers(replayed)[0].head
        assert head.get_layer(f"{point.name}_exit_head_pool").output.shape[-1] == width


def test_add_exits_trains_heads_that_answer_most_easy_inputs_within_the_budget():
    from compressor.io.data import Dataset
    from compressor.search.early_exit import ExitSettings, add_exits, exit_choices

    model = write_quadrants_workdir(__import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    (xt, yt), (xs, ys) = quadrants(1500, 10), quadrants(1500, 11)
    correct = model.predict(xs, verbose=0).argmax(-1) == ys
    outcome = add_exits(model, Dataset(xt, yt, "train"), Dataset(xs, ys, "search"), correct, 0.05,
                        ExitSettings(confidence=0.95))
    assert outcome.model is not None, outcome.reason
    # The exits answer some inputs early, fewer FLOPs are run on average, and the accuracy holds on the search data.
    assert outcome.rates[-1] < 0.9 and outcome.mean_flops < outcome.static_flops
    assert outcome.baseline_accuracy - outcome.accuracy <= 0.05
    choice, _ = exit_choices(model, outcome.model, xs)
    predicted = outcome.model.predict(xs, verbose=0).argmax(-1)
    assert np.mean(predicted == ys) == pytest.approx(outcome.accuracy, abs=1e-9)
    assert np.bincount(choice, minlength=len(outcome.kept) + 1) / len(xs) == pytest.approx(outcome.rates, abs=1e-9)
    # Every subset of the exits was calibrated; without a timer the fewest FLOPs per input won.
    assert outcome.mean_flops == min(c["flops"] for c in outcome.candidates)

    # With a timer, the fastest set is kept, whatever its FLOPs: here (a made-up timer) the one with the fewest exits.
    def timer(models):
        from compressor.layers.early_exit import exit_layers

        return [1.0] + [0.1 * len(exit_layers(m)) for m in models[1:]]  # static first

    timed = add_exits(model, Dataset(xt, yt, "train"), Dataset(xs, ys, "search"), correct, 0.05,
                      ExitSettings(confidence=0.95), timer=timer)
    fewest = min(len(c["exits"]) for c in timed.candidates)
    assert len(timed.candidates) >= 2 and len(timed.kept) == fewest
    assert timed.latency_check["gated_ms"] == pytest.approx(0.1 * fewest) and all("ms" in c for c in timed.candidates)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exits")
    write_quadrants_workdir(folder)
    for name, n, seed in (("train", 1500, 10), ("val", 2400, 11), ("test", 600, 12)):
        x, y = quadrants(n, seed)
        np.savez(folder / f"{name}.npz", x=x, y=y)
    return folder


def _compress(workdir, out, *args):
    command = ["compress", str(workdir / "model.keras"), "--out", str(out), "--runs", "20", "--json",
               "--data", str(workdir / "val.npz"), "--test-data", str(workdir / "test.npz"), *map(str, args)]
    return runner.invoke(app, command)


def test_early_exit_end_to_end_report_parity_and_replay(workdir, tmp_path, monkeypatch):
    import keras

    from compressor.bench import keras_latency

    # The tiny model's exits save too little to be timed faster; the timing rule is tested below.
    monkeypatch.setattr(keras_latency, "tflite_latencies", lambda models, x, **kwargs: [1.0] + [0.5] * (len(models) - 1))
    out = tmp_path / "exits"
    result = _compress(workdir, out, "--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques", "early-exit",
                       "--train-data", workdir / "train.npz", "--export", "tflite,onnx,keras")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report_problems(report) == []
    entry = report["early_exit"]
    assert entry["applied"] is True and entry["measured_on"] == "held-out" and entry["samples"] == 600
    rates = [e["rate"] for e in entry["exits"]] + [entry["final"]["rate"]]
    assert sum(rates) == pytest.approx(1.0) and entry["final"]["rate"] < 1.0
    assert all(0 < t <= 1 for t in entry["thresholds"])
    flops = entry["flops_per_input"]
    assert flops["p10"] <= flops["median"] <= flops["p90"] <= flops["max"] and flops["mean"] < entry["static_flops"]
    assert report["compressed"]["expected_flops"] == pytest.approx(flops["mean"])
    assert entry["tflite"]["static_latency_ms"]["mean"] > 0 and entry["tflite"]["latency_ms"]["mean"] > 0
    # Parity: each artifact, run one input at a time, answers as the Keras model on the inputs of every exit.
    for artifact in entry["parity"]:
        assert {e["exit"] for e in artifact["per_exit"]} >= {0}
        for per_exit in artifact["per_exit"]:
            assert per_exit["max_abs_diff"] <= ATOL and per_exit["top1_agreement"] == 1.0, (artifact["format"], per_exit)
    assert tflite_ops(out / "model.tflite")[0].count("IF") == 1 and tflite_ops(out / "static" / "model.tflite")[0].count("IF") == 0
    assert "## Early exits" in (out / "report.md").read_text()
    # A file whose time per input depends on the input is also compared by its mean, and report.md shows that column.
    for artifact in (a for a in report["artifacts"] if a["format"] != "keras"):
        ratio = artifact["latency_ms"]["mean"] / artifact["baseline_latency_ms"]["mean"]
        assert artifact["mean_latency_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert "mean latency ratio" in (out / "report.md").read_text()
    assert report["budget"]["met"] is True

    # The plan replays: heads trained again with the recorded seed and head form, thresholds as recorded.
    from compressor.techniques.early_exit import GRID

    assert json.loads((out / "plan.json").read_text())["early_exit"]["grid"] == GRID
    replay = _compress(workdir, tmp_path / "replay", "--plan", out / "plan.json", "--train-data", workdir / "train.npz")
    assert replay.exit_code == 0, replay.output
    x = np.load(workdir / "test.npz")["x"]
    first, again = (keras.models.load_model(folder / "model.keras") for folder in (out, tmp_path / "replay"))
    np.testing.assert_allclose(again.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-4)


def test_exits_that_are_not_faster_are_not_kept(workdir, tmp_path, monkeypatch):
    from compressor.bench import keras_latency

    monkeypatch.setattr(keras_latency, "tflite_latencies", lambda models, x, **kwargs: [0.5] + [0.6] * (len(models) - 1))
    result = _compress(workdir, tmp_path / "slow", "--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques",
                       "early-exit", "--train-data", workdir / "train.npz")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report_problems(report) == []
    assert report["early_exit"]["applied"] is False and "the exits cost more than they skip" in report["early_exit"]["reason"]
    assert report["early_exit"]["search"]["latency_check"] == {"static_ms": 0.5, "gated_ms": 0.6, "data": "search", "samples": 200}
    assert json.loads((tmp_path / "slow" / "plan.json").read_text()).get("early_exit") is None
    assert tflite_ops(tmp_path / "slow" / "model.tflite")[0].count("IF") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques", "early-exit"],
         "--techniques early-exit trains its exits: pass --train-data"),
        (["--method", "fixed_params", "--compression-factor", "0.5", "--techniques", "early-exit", "--train-data", "train.npz"],
         "needs --method fixed_loss"),
        (["--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques", "early-exit,gating", "--train-data", "train.npz"],
         "choose one"),
        (["--method", "fixed_loss", "--max-acc-loss", "0.05", "--techniques", "early-exit", "--train-data", "train.npz",
          "--quantize", "dynamic"], "pass --export tflite,keras"),
    ],
)
def test_bad_early_exit_options_give_one_clear_line(workdir, tmp_path, args, message):
    args = [str(workdir / arg) if arg.endswith(".npz") else arg for arg in args]
    result = _compress(workdir, tmp_path / "bad", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()


def test_plans_round_trip_their_exits_and_refuse_malformed_ones():
    from compressor.surgery.plan import Plan, PlanError

    entry = {"points": ["a_out", "b_out"], "thresholds": [0.9, 0.5], "hidden": 128, "epochs": 15, "seed": 0}
    plan = Plan(model={"name": "m"}, early_exit=entry)
    assert Plan.from_dict(plan.to_dict()).early_exit == entry
    assert Plan.from_dict({**plan.to_dict(), "early_exit": {**entry, "grid": 4}}).early_exit["grid"] == 4
    assert "early_exit" not in Plan(model={"name": "m"}).to_dict()
    for bad in ({"points": ["a_out"], "thresholds": [1.5]}, {"points": ["a_out", "b_out"], "thresholds": [0.9]},
                {"points": [], "thresholds": []}, {"points": [3], "thresholds": [0.5]}, ["a_out"],
                {"points": ["a_out"], "thresholds": [0.5], "grid": 0}, {"points": ["a_out"], "thresholds": [0.5], "grid": 2.5}):
        with pytest.raises(PlanError, match="early_exit"):
            Plan.from_dict({**plan.to_dict(), "early_exit": bad})
