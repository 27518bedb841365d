"""The test run itself: CI runs the README's test command, and a hung test fails instead of hanging CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_hung_test_times_out(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is part of the dev extra"
    assert 0 < float(pytestconfig.getini("timeout")) <= 1800


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .venv && .*pytest.*)\n```", readme)
    assert len(commands) == 1, "the README shows one install-and-test command"
    test_command = commands[0].split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
