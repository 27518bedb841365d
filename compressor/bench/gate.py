"""Latency gate: compare a bench report with an earlier one and name what got slower.

    baseline = load_report("previous.json")        # `compressor bench --output` of a past run
    gate = compare_latency(report, baseline, max_regression=0.10)
    gate.passed                                     # False: some median is >10% above its baseline
    [r.name for r in gate.regressions]

Artifacts are matched by path, else by file name (CI jobs build into different
folders), and compared by median latency. An artifact the baseline lacks is listed,
never failed. The baseline may also be a `compress` report.json: its artifacts (and the
original's baseline artifacts) carry `path` and `latency_ms` too.

Plain JSON dicts in, plain data out: no runtime, no TensorFlow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from compressor.errors import CompressorError

DEFAULT_MAX_REGRESSION = 0.10


@dataclass(frozen=True)
class Regression:
    """One artifact's median latency next to its baseline's.

    `compare_latency` lists every matched artifact this way; the ones whose `change`
    exceeds the allowed fraction are the regressions.

    Attributes:
        name: The artifact as the report names it (its path).
        baseline_ms: Median latency in the baseline report.
        ms: Median latency now.
        change: `ms / baseline_ms - 1`: 0.25 is 25% slower, -0.1 is 10% faster.
    """

    name: str
    baseline_ms: float
    ms: float
    change: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "baseline_ms": self.baseline_ms, "ms": self.ms, "change": self.change}

    def __str__(self) -> str:
        return f"{self.name}: median {self.baseline_ms:.4g} -> {self.ms:.4g} ms ({self.change:+.1%})"


@dataclass(frozen=True)
class GateResult:
    """The outcome of comparing a report with its baseline.

    Attributes:
        compared: Every artifact found in the baseline, in the report's order.
        regressions: Those slower than the baseline by more than `max_regression`.
        missing: Artifacts the baseline does not have (new ones): listed, never failed.
        max_regression: The allowed slow-down, as a fraction of the baseline median.
        warning: A line for the user when the two reports ran on different machines.
    """

    compared: tuple[Regression, ...]
    regressions: tuple[Regression, ...]
    missing: tuple[str, ...]
    max_regression: float
    warning: Optional[str] = None

    @property
    def passed(self) -> bool:
        """True when no artifact got slower than allowed."""
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        slow = {r.name for r in self.regressions}
        return {
            "passed": self.passed,
            "max_regression": self.max_regression,
            "compared": [{**r.to_dict(), "regressed": r.name in slow} for r in self.compared],
            "regressions": [r.name for r in self.regressions],
            "missing": list(self.missing),
            "warning": self.warning,
        }


def latency_regressions(report: dict, baseline: dict, max_regression: float) -> list[Regression]:
    """The artifacts whose median latency grew by more than `max_regression`.

    Args:
        report: A bench report (`BenchReport.to_dict()`, `bench_remote`) or a
            compress report.json.
        baseline: An earlier report of either kind.
        max_regression: Allowed slow-down as a fraction (0.10: 10% slower passes).

    Returns:
        The regressions, in the report's order; empty when the gate passes.

    Raises:
        CompressorError: A report without median latencies, or a bad `max_regression`.
    """
    return list(compare_latency(report, baseline, max_regression).regressions)


def compare_latency(report: dict, baseline: dict, max_regression: float = DEFAULT_MAX_REGRESSION) -> GateResult:
    """Compare every artifact of `report` with the same artifact in `baseline`.

    Args:
        report: A bench report or a compress report.json (see `latency_regressions`).
        baseline: An earlier report of either kind.
        max_regression: Allowed slow-down as a fraction of the baseline median (>= 0).

    Returns:
        All comparisons, the regressions among them, and the artifacts not in the baseline.

    Raises:
        CompressorError: A report without median latencies, or a bad `max_regression`.
    """
    check_max_regression(max_regression)
    now = medians(report, "report")
    before = medians(baseline, "baseline")
    compared, missing = [], []
    for path, ms in now.items():
        key = _match(path, before)
        if key is None:
            missing.append(path)
            continue
        compared.append(Regression(path, before[key], ms, ms / before[key] - 1.0))
    limit = 1.0 + max_regression
    regressions = tuple(r for r in compared if r.ms > r.baseline_ms * limit)
    return GateResult(tuple(compared), regressions, tuple(missing), float(max_regression), _host_warning(report, baseline))


def check_max_regression(value: Any) -> None:
    """Raise CompressorError unless `value` is a finite fraction >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CompressorError(
            "max_regression must be a fraction >= 0 (0.10 lets a median be 10% slower). "
            f"Received: max_regression={value!r}"
        )


def load_report(path: str | Path, what: str = "baseline") -> dict:
    """Read a bench or compress report to compare with.

    Args:
        path: A JSON file written by `compressor bench --output`/`--json`,
            `python -m compressor.bench`, or `compress` (report.json).
        what: How messages call the file.

    Returns:
        The report as a dict.

    Raises:
        CompressorError: The file is missing, not JSON, or holds no median latencies.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"{what} not found: {path} (expected a JSON report of compressor bench)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CompressorError(f"{what} {path} is not a JSON text file: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise CompressorError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except OSError as exc:
        raise CompressorError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    medians(report, f"{what} {path}")
    return report


def medians(report: Any, source: str = "report") -> dict[str, float]:
    """Median latency (ms) per artifact path, from a bench or a compress report.

    Raises:
        CompressorError: `report` is neither, or holds no usable median.
    """
    if isinstance(report, dict) and isinstance(report.get("results"), list):
        pairs = [(e, "path", "latency_ms") for e in report["results"]]
    elif isinstance(report, dict) and isinstance(report.get("artifacts"), list):
        # compress report.json: each artifact, and the original model's artifact beside it.
        pairs = [(e, key, lat) for e in report["artifacts"] for key, lat in _COMPRESS_KEYS]
    else:
        raise CompressorError(
            f"{source} is not a bench report: expected a JSON object with 'results' "
            "(compressor bench --json/--output) or 'artifacts' (compress report.json)"
        )
    found: dict[str, float] = {}
    for entry, path_key, latency_key in pairs:
        if not isinstance(entry, dict) or entry.get(latency_key) is None:
            continue  # a .keras artifact has no latency: nothing to compare
        found[_path(entry, path_key, source)] = _median(entry, latency_key, source)
    if not found:
        raise CompressorError(f"{source} holds no median latencies to compare with")
    return found


_COMPRESS_KEYS = (("path", "latency_ms"), ("baseline_path", "baseline_latency_ms"))


def _path(entry: dict, key: str, source: str) -> str:
    path = entry.get(key)
    if not isinstance(path, str) or not path:
        raise CompressorError(f"{source}: an artifact has no '{key}'. Received: {entry.get(key)!r}")
    return path


def _median(entry: dict, key: str, source: str) -> float:
    latency = entry[key]
    median = latency.get("median") if isinstance(latency, dict) else None
    if isinstance(median, bool) or not isinstance(median, (int, float)) or not math.isfinite(median) or median <= 0:
        raise CompressorError(
            f"{source}: {entry.get('path', '?')} needs {key}.median as a number of ms > 0. "
            f"Received: {median!r}"
        )
    return float(median)


def _match(path: str, before: dict[str, float]) -> Optional[str]:
    """The baseline's key for `path`: the same path, else the only one with its file name."""
    if path in before:
        return path
    name = Path(path).name
    same_name = [key for key in before if Path(key).name == name]
    return same_name[0] if len(same_name) == 1 else None


def _host_warning(report: Any, baseline: Any) -> Optional[str]:
    now, before = _host(report), _host(baseline)
    if now is None or before is None or now == before:
        return None
    return f"the baseline ran on {before} but this run on {now}: their latencies are not comparable"


def _host(report: Any) -> Optional[str]:
    host = report.get("host") if isinstance(report, dict) else None
    if not isinstance(host, dict) or not host.get("name"):
        return None
    return f"{host['name']} ({host.get('machine', '?')})"
