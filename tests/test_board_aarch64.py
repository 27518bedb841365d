"""The checks of benchmarks/board_aarch64.py: each claim its Markdown makes can fail.

The script itself (debootstrap, qemu, three emulated bench runs) takes 15-45 minutes and
root; these tests feed its checks reports shaped like `compressor bench --json` output.
No TensorFlow, no runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import shlex
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "board_aarch64.py"


@pytest.fixture(scope="module")
def board():
    spec = importlib.util.spec_from_file_location("board_aarch64", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(accuracies, medians, machine, gate=None):
    names = ("original.tflite", "compressed.tflite", "compressed.onnx")
    report = {
        "results": [
            {"path": f"artifacts/{name}", "accuracy": acc, "latency_ms": {"median": ms}}
            for name, acc, ms in zip(names, accuracies, medians)
        ],
        "samples": 360,
        "host": {"machine": machine, "name": "vm"},
    }
    if gate is not None:
        report["gate"] = gate
    return report


def _runs():
    """Runs as the script gets them when everything holds."""
    accuracies = (346 / 360, 295 / 360, 295 / 360)
    here = {"exit": 0, "report": _report(accuracies, (0.9, 0.3, 0.6), "x86_64"), "stderr": ""}
    first = {"exit": 0, "report": _report(accuracies, (320, 100, 75), "aarch64"), "stderr": ""}
    second = {"exit": 0, "report": _report(accuracies, (322, 101, 74), "aarch64", {"passed": True, "regressions": []}),
              "stderr": ""}
    third = {"exit": 3, "report": _report(accuracies, (322, 320, 74), "aarch64", {
        "passed": False, "regressions": ["regressed/compressed.tflite"]}), "stderr": "latency regression: ..."}
    return here, first, second, third


def _failed(board, runs):
    return [name for name, ok, _ in board.run_checks(*runs) if not ok]


def test_all_checks_hold_on_consistent_runs(board):
    checks = board.run_checks(*_runs())
    assert [ok for _, ok, _ in checks] == [True] * 9
    assert any("346/360 vs 346/360" in detail for _, _, detail in checks)


def test_one_sample_of_difference_breaks_parity(board):
    runs = list(copy.deepcopy(_runs()))
    runs[1]["report"]["results"][2]["accuracy"] = 294 / 360
    assert _failed(board, runs) == ["compressed.onnx: same top-1 on aarch64 as on x86_64"]


def test_a_host_that_is_not_aarch64_fails(board):
    runs = list(copy.deepcopy(_runs()))
    runs[1]["report"]["host"]["machine"] = "x86_64"
    assert _failed(board, runs) == ["the report names the host as aarch64"]


def test_gate_outcomes_are_checked(board):
    runs = list(copy.deepcopy(_runs()))
    runs[2].update(exit=3)
    runs[2]["report"]["gate"]["passed"] = False
    runs[3].update(exit=0)  # the slower artifact slipped through
    assert _failed(board, runs) == [
        "board run 2 exits 0",
        "run 2 against run 1: gate passes (exit 0)",
        "compressed.tflite swapped for the original: gate fails (exit 3)",
    ]


def test_a_run_without_report_fails_without_comparing(board):
    runs = list(copy.deepcopy(_runs()))
    runs[1].update(exit=1, report=None, stderr="error: bench through ... failed")
    assert _failed(board, runs) == ["board run 1 exits 0"]


def test_prefix_survives_a_root_with_spaces(board):
    words = shlex.split(board.board_prefix(Path("/srv/my boards/arm64-root")))
    assert "--mount-proc=/srv/my boards/arm64-root/proc" in words
    assert words[words.index("chroot") + 1] == "/srv/my boards/arm64-root"


def test_manylinux_platforms_name_every_glibc_up_to_the_roots(board):
    tags = board.manylinux_platforms("2.36")
    assert tags[0] == "manylinux2014_aarch64"
    assert "manylinux_2_27_aarch64" in tags and "manylinux_2_28_aarch64" in tags
    assert tags[-1] == "manylinux_2_36_aarch64" and "manylinux_2_37_aarch64" not in tags
    with pytest.raises(ValueError):
        board.manylinux_platforms("2.12")


def test_artifacts_and_data_go_together(board):
    with pytest.raises(SystemExit):
        board.parse_args(["--artifacts", "example/compressed"])
