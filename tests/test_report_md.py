"""report.md and its plots, from a real compress run on a tiny model and from report dicts.

A PNG is checked by its signature and the width and height in its IHDR chunk (the
first chunk, bytes 16..24): a real drawing at 100 dpi and 8 inches is 800 px wide, so
"at least 300 px" separates a drawn plot from an empty or broken file.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import copy  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from compressor.errors import CompressorError  # noqa: E402
from compressor.report import render_markdown, write_markdown_report  # noqa: E402
from compressor.report.__main__ import main as report_main  # noqa: E402
from compressor.report.plots import layer_params, trace_points  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRACE = "plots/accuracy_vs_compression.png"
LAYERS = "plots/layer_params.png"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, read from its header; fails on anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_plot(folder: Path, name: str) -> None:
    width, height = png_size(folder / name)
    assert width >= 300 and height >= 200, (name, width, height)
    assert (folder / name).stat().st_size > 5_000  # axes, text and points; a blank 800x600 PNG is ~3 KB


def linked_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def separable_data(n, seed):
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(123).standard_normal((4, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, n)
    x = templates[y] + 2.0 * rng.standard_normal((n, 8, 8, 3)).astype("float32")
    return x.astype("float32"), y.astype("int64")


@pytest.fixture(scope="module")
def fixed_loss_run(tmp_path_factory):
    """(report, output folder) of `compress --method fixed_loss` on a tiny trained CNN (TFLite only)."""
    import keras

    from compressor.config import CompressOptions
    from compressor.pipeline import compress

    folder = tmp_path_factory.mktemp("report")
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = L.Conv2D(24, 3, padding="same", activation="relu", name="conv_b")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(24, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, L.Dense(4, activation="softmax", name="head")(x), name="report_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(*separable_data(512, seed=1), epochs=4, batch_size=64, verbose=0)
    model.save(folder / "model.keras")
    # 800 search samples: the guard's 400 confirm a 20-point budget with room for the search to spend.
    for name, seed, n in (("val", 2, 800), ("test", 3, 200)):
        np.savez(folder / f"{name}.npz", **dict(zip("xy", separable_data(n, seed))))
    options = CompressOptions(
        model=folder / "model.keras", out=folder / "out", method="fixed_loss", max_acc_loss=0.2,
        data=str(folder / "val.npz"), test_data=str(folder / "test.npz"), export=("tflite",),
        runs=3, warmup=1, cache_dir=folder / "cache",
    )
    return compress(options), folder / "out"


# --- a real run -----------------------------------------------------------------------------


def test_a_compress_run_gets_a_report_with_both_plots(fixed_loss_run):
    report, out = fixed_loss_run
    path = write_markdown_report(report, out)
    assert path == out / "report.md"
    markdown = path.read_text()
    assert linked_images(markdown) == [TRACE, LAYERS]
    for name in (TRACE, LAYERS):
        assert_plot(out, name)
    assert not list((out / "plots").glob(".*")), "a temporary file was left behind"

    # The headline comes first and says status, method, limit, achieved and where it was measured.
    headline = markdown.split("\n## ")[0]
    assert "**Status: ok** · method `fixed_loss`" in headline
    assert "lose at most 20.00 points" in headline and f"lost {100 * report['budget']['achieved']:.2f} points" in headline
    assert "measured on held-out data" in headline
    sections = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert sections == ["Original and compressed", "Artifacts", "Search", "Layers", "Timings"]
    assert f"| parameters | {report['baseline']['params']:,} | {report['compressed']['params']:,} |" in markdown
    assert "| tflite | none | [model.tflite](model.tflite) |" in markdown  # linked relative to report.md
    for row in report["layers"]:
        assert f"| `{row['name']}` | {row['technique']} |" in markdown

    trials = report["search"]["trials"]
    assert len(trials) >= 2 and sum(trial["chosen"] for trial in trials) == 1
    assert f"{len(trials)} candidate models in the trace, 1 chosen" in markdown
    points = trace_points(report)  # the plotted x: FLOPs kept, as the search's objective
    chosen = next(p for p in points if p.chosen)
    assert chosen.kept == pytest.approx(report["compressed"]["flops"] / report["baseline"]["flops"], rel=1e-9)
    assert chosen.accuracy == report["search"]["accuracy"]


def test_the_artifacts_carry_load_first_call_spread_and_peak_memory(fixed_loss_run):
    """report.json holds what `compressor bench` measures per artifact, and report.md shows it."""
    report, out = fixed_loss_run
    (entry,) = [entry for entry in report["artifacts"] if entry["format"] == "tflite"]
    assert entry["init_ms"] > 0 and entry["first_inference_ms"] > 0
    assert entry["peak_memory_bytes"] > 0 and entry["baseline_peak_memory_bytes"] > 0
    assert (entry["threads"], entry["delegate"], entry["provider"]) == (1, "xnnpack", None)
    latency = entry["latency_ms"]
    assert latency["min"] <= latency["p5"] <= latency["median"] <= latency["p95"] <= latency["max"]
    assert latency["std"] >= 0
    markdown = render_markdown(report, out_dir=out)
    row = next(line for line in markdown.splitlines() if line.startswith("| [model.tflite](model.tflite) | xnnpack"))
    assert "xnnpack, 1 thread(s)" in row and row.count(" ms |") == 5 and "iB |" in row
    # A static model's time does not depend on its input: the mean ratio is in report.json only; with exits or
    # gates applied, report.md shows it as a column too.
    assert entry["mean_latency_ratio"] == pytest.approx(latency["mean"] / entry["baseline_latency_ms"]["mean"])
    assert "mean latency ratio" not in markdown
    dynamic = render_markdown({**report, "early_exit": {"applied": True}})
    header = next(line for line in dynamic.splitlines() if line.startswith("| format |"))
    assert header.endswith("| latency ratio | mean latency ratio |")


def test_timings_give_each_stage_and_add_up_to_search_and_export(fixed_loss_run):
    from compressor.report.build import STAGE_TIMINGS

    report, out = fixed_loss_run
    timings = report["timings_s"]
    assert list(timings) == [*STAGE_TIMINGS, "search", "export", "total"]
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["layers"] > 0 and timings["channels"] < timings["layers"]  # channels was not asked for
    # The model stages are the search; writing, verification and timing are the export (rounding, and the
    # little run between them: the stages' checks, the plan written, calibration).
    model_stages = sum(timings[name] for name in ("blocks", "channels", "layers", "finetune", "acceptance", "gating"))
    assert model_stages - 0.01 <= timings["search"] <= model_stages + 0.2 * timings["search"] + 0.5
    output_stages = sum(timings[name] for name in ("writing", "verification", "timing"))
    assert output_stages - 0.01 <= timings["export"] <= output_stages + 0.2 * timings["export"] + 0.5
    assert timings["total"] >= timings["load"] + timings["search"] + timings["export"] - 0.01
    markdown = render_markdown(report)
    for name in timings:
        assert f"| {name} | {timings[name]:.1f} s |" in markdown


def test_a_saved_report_renders_again_from_the_command_line(fixed_loss_run, tmp_path, capsys):
    report, out = fixed_loss_run
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    assert report_main([str(folder / "report.json")]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "report.md")
    assert (folder / "report.md").read_text() == (out / "report.md").read_text()
    assert_plot(folder, TRACE)


# --- reports without some parts ------------------------------------------------------------


def test_an_error_report_renders_short_without_plots(tmp_path):
    error = {"schema": 1, "status": "error", "method": "fixed_loss", "error": "data.npz has no labels"}
    markdown = write_markdown_report(error, tmp_path).read_text()
    assert markdown.splitlines() == [
        "# Compression report", "", "**Status: error** · method `fixed_loss`", "", "The run failed: data.npz has no labels",
    ]
    assert not (tmp_path / "plots").exists()


def test_a_fixed_params_report_plots_what_it_has_and_says_so(fixed_loss_run, tmp_path):
    report = copy.deepcopy(fixed_loss_run[0])
    report.update(method="fixed_params", budget={"kind": "params", "limit": 0.5, "achieved": 0.45, "met": True})
    report["search"] = {"evaluations": 0, "trials": [
        {"stage": "layers", "params": 2000, "flops": 50000, "accuracy": None, "met": True, "chosen": True},
    ]}
    markdown = write_markdown_report(report, tmp_path).read_text()
    assert "keep at most 50.0% of the parameters; kept 45.0% (met)" in markdown
    assert "The search evaluated no accuracy" in markdown
    assert linked_images(markdown) == [TRACE, LAYERS]
    assert_plot(tmp_path, TRACE)
    (point,) = trace_points(report)
    assert point.accuracy is None and point.kept == pytest.approx(2000 / report["baseline"]["params"], rel=1e-12)


def test_missing_and_null_keys_render_as_dashes(tmp_path):
    report = {
        "status": "budget_not_met", "method": "plan", "budget": {"kind": None},
        "baseline": {"params": None, "flops": 100, "accuracy": None}, "compressed": None,
        "artifacts": [{"format": "onnx", "path": None, "latency_ms": None}],
        "layers": [{"name": "a|b", "technique": "skipped", "reason": "no kernel"}],
        "notes": ["first note"],
    }
    markdown = write_markdown_report(report, tmp_path).read_text()
    assert "**Status: budget not met** · method `plan`" in markdown
    assert "| parameters | — | — | — |" in markdown and "| FLOPs | 100 | — | — |" in markdown
    assert "| onnx | none | — | — | — | — | — | — | — |" in markdown
    assert "| `a\\|b` | skipped | — | — | no kernel |" in markdown  # a pipe in a name does not split the row
    assert "- first note" in markdown
    assert "No trial and no held-out accuracy to plot." in markdown and linked_images(markdown) == []
    assert write_markdown_report({}, tmp_path / "empty").read_text().startswith("# Compression report")


def test_any_key_missing_null_or_of_the_wrong_type_still_renders(fixed_loss_run, tmp_path, monkeypatch):
    from compressor.report import plots

    report = fixed_loss_run[0]
    top, nested = [], []
    for key in report:
        top += [{**report, key: value} for value in (None, "?", [1], {})]
        if isinstance(report[key], dict):
            for inner in report[key]:
                nested += [{**report, key: {**report[key], inner: value}} for value in (None, "?")]
    nested.append({**report, "artifacts": [{**report["artifacts"][0], "latency_ms": {"median": "fast"}}]})
    nested.append({**report, "layers": [None, {"name": 3, "technique": None, "params_before": True}]})
    nested.append({**report, "search": {"trials": [None, {"flops": "x"}, {"flops": 1, "accuracy": "y"}]}})
    assert len(top) + len(nested) > 100  # every key of the real report was tried
    for variant in top + nested:
        assert render_markdown(variant).startswith("# Compression report\n")
        assert all(0 < point.kept for point in plots.trace_points(variant))
        assert plots.search_baseline_accuracy(variant) in (None, report["search"]["baseline_accuracy"])
    # Drawing is slower: each key the plots read, replaced whole, drawn without encoding the PNG.
    monkeypatch.setattr(plots, "_save", lambda figure, path: path)
    for key in ("budget", "baseline", "compressed", "search", "channels", "layers"):
        for value in (None, "?", [1]):
            write_markdown_report({**report, key: value}, tmp_path)


def test_a_plot_that_cannot_be_written_leaves_a_note_not_a_failure(fixed_loss_run, tmp_path, monkeypatch):
    from compressor.report import plots

    def full_disk(figure, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "_save", full_disk)
    markdown = write_markdown_report(fixed_loss_run[0], tmp_path).read_text()
    assert markdown.count("*The plot could not be drawn: [Errno 28] No space left on device*") == 2
    assert linked_images(markdown) == [] and "## Layers" in markdown


def test_the_layer_chart_keeps_the_largest_layers_and_puts_channels_apart(tmp_path):
    rows = [{"name": f"layer{i}", "technique": "svd", "params_before": 100 + i, "params_after": 50} for i in range(45)]
    rows.append({"name": "group", "technique": "channels", "channels_before": 32, "channels_after": 20})
    plot = layer_params({"layers": rows}, tmp_path / "layers.png", most=40)
    assert plot.notes == ("The chart shows the 40 largest of 45 rows of parameters; the table lists them all.",)
    width, height = png_size(plot.path)
    # Two panels of 40 and 1 rows at 0.3 inch per row and 100 dpi: taller than the 12-row chart below.
    few = layer_params({"layers": rows[:12]}, tmp_path / "few.png", most=40)
    assert width == 800 and height > png_size(few.path)[1] + 800
    assert layer_params({"layers": []}, tmp_path / "none.png").path is None


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(CompressorError, match=r"^Invalid report\. Expected a dict .*Received: list$"):
        write_markdown_report([], tmp_path)
    (tmp_path / "broken.json").write_text('{"status": ')
    assert report_main([str(tmp_path / "broken.json")]) == 1
    assert report_main([str(tmp_path / "missing.json")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: Invalid report. Expected JSON") and "missing.json" in lines[1]


def test_importing_the_report_package_does_not_import_matplotlib():
    code = "import sys, compressor.report; assert 'matplotlib' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_search_sentences_say_why_a_search_ended():
    from compressor.report.markdown import _blocks_sentence, _channels_sentence

    channels = {"channels_removed": 12, "groups_pruned": 2}
    assert _channels_sentence({**channels, "stopped": "guard"}).endswith(
        "; the guard rejected its last step, so nothing after it could be accepted.")
    assert _channels_sentence({**channels, "stopped": "time limit"}).endswith("; it stopped at its time limit.")
    assert "stopped" not in _channels_sentence(channels) and "guard" not in _channels_sentence(channels)
    blocks = {"removed": ["a_add"], "steps": [], "candidates": [{"block": "a_add"}, {"block": "b_add"}]}
    assert _blocks_sentence({**blocks, "stopped": "guard"}).endswith("nothing after it could be accepted.")
