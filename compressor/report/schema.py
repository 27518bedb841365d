"""report.json's keys, as documented in the README: the contract pipelines read.

`SCHEMA` is raised only when a key changes meaning or goes away; new keys may appear
within a schema, and then they are added here and in the README (a test holds the
three together: this spec, the README's schema block and a real report).

    problems = report_problems(json.loads(Path("build/report.json").read_text()))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

SCHEMA = 1
"""Version of report.json's layout."""


@dataclass(frozen=True)
class Keys:
    """The keys of one JSON object of the report.

    Attributes:
        required: Present in every report of this kind.
        optional: Present in some (e.g. only with a budget, only with gating).
        nested: Key → the Keys of its value (an object, or each object of a list);
            a null value is allowed wherever a key is.
    """

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    nested: Mapping[str, "Keys"] = field(default_factory=dict)
    more: Optional[Callable[[], frozenset[str]]] = None
    """Further allowed keys known only at run time (a layer row's technique parameters)."""


LATENCY = Keys(("median", "p90", "min", "max", "mean"), optional=("std", "p5", "p95"))
FLOPS_PER_INPUT = Keys(("mean", "min", "p10", "median", "p90", "max", "histogram"), nested={"histogram": Keys(("edges", "counts"))})
TRIAL = Keys(("stage", "params", "flops", "accuracy", "met", "chosen"))
ACCEPTANCE = Keys(("samples", "confidence", "samples_needed", "warning", "looks"), optional=("judged",),
                  nested={"looks": Keys(("model", "accepted"), optional=("drop", "ci"))})

def _technique_parameters() -> frozenset[str]:
    """The parameters of every registered technique: a layer row carries its edit's."""
    from compressor.techniques.registry import parameter_names

    return parameter_names()


METRIC = Keys(("name", "higher_is_better", "relative", "unit"), optional=("baseline_value", "value"))
"""budget.metric: what the budget measures when it is not top-1 (`compressor.metrics`)."""

REPORT = Keys(
    required=("schema", "status", "method", "budget", "baseline", "compressed", "quantize", "layers", "artifacts",
              "search", "channels", "gating", "finetune", "calibration", "timings_s", "options", "notes"),
    optional=("blocks", "early_exit"),
    nested={
        "budget": Keys(("kind", "limit", "achieved", "met"),
                       optional=("measured_on", "artifact", "search_achieved", "ci", "confidence", "metric"),
                       nested={"metric": METRIC}),
        "baseline": Keys(("params", "flops", "accuracy")),
        "compressed": Keys(("params", "flops", "accuracy", "dense_params"), optional=("expected_flops",)),
        "layers": Keys(("name", "technique"), optional=(
            "params_before", "params_after", "flops_before", "flops_after", "reason", "ranks", "rank",
            "residual", "sparsity", "criterion", "channels_before", "channels_after"), more=_technique_parameters),
        "artifacts": Keys(
            ("format", "quantize", "path", "bytes", "accuracy", "max_abs_diff", "top1_agreement", "latency_ms",
             "baseline_latency_ms"),
            optional=("baseline_accuracy", "latency_ratio", "mean_latency_ratio", "baseline_path", "baseline_bytes", "drop_ci", "init_ms",
                      "first_inference_ms", "peak_memory_bytes", "baseline_peak_memory_bytes", "threads", "delegate",
                      "provider", "metric_value", "baseline_metric_value"),
            nested={"latency_ms": LATENCY, "baseline_latency_ms": LATENCY},
        ),
        "search": Keys(("evaluations", "cached_evaluations", "search_samples", "held_out_samples", "trials"),
                       optional=("baseline_accuracy", "accuracy", "acceptance"),
                       nested={"trials": TRIAL, "acceptance": ACCEPTANCE}),
        "channels": Keys(
            ("groups_pruned", "channels_removed", "groups_blocked", "params", "flops", "baseline_accuracy", "accuracy",
             "finetune_epochs", "evaluations", "steps", "trials", "seconds"),
            optional=("layers_blocked", "stopped"),
            nested={"groups_blocked": Keys(("group", "reason")), "layers_blocked": Keys(("layer", "reason")),
                    "trials": TRIAL},
        ),
        "blocks": Keys(
            ("removed", "candidates", "steps", "params", "flops", "baseline_params", "baseline_flops",
             "baseline_accuracy", "accuracy", "budget_share", "finetune_epochs", "seconds", "stopped"),
            nested={"candidates": Keys(("block", "drop_alone", "flops", "params")),
                    "steps": Keys(("blocks", "accuracy", "epochs", "accepted", "seconds"))},
        ),
        "gating": Keys(
            ("applied", "target", "attempts"),
            optional=("reason", "latency_check", "blocks", "removed_blocks", "trained_target", "network", "epochs", "offset", "history",
                      "measured_on", "samples", "static_flops", "expected_flops_fraction", "flops_per_input", "tflite"),
            nested={
                "blocks": Keys(("name", "flops", "skip_rate")),
                "flops_per_input": FLOPS_PER_INPUT,
                "tflite": Keys(("path", "latency_ms", "static_path", "static_latency_ms", "static_bytes",
                                "mean_latency_ratio"), nested={"latency_ms": LATENCY, "static_latency_ms": LATENCY}),
            },
        ),
        "early_exit": Keys(
            ("applied",),
            optional=("reason", "search", "points", "thresholds", "measured_on", "samples", "exits", "final",
                      "static_flops", "flops_per_input", "expected_flops_fraction", "parity", "tflite"),
            nested={
                "exits": Keys(("point", "threshold", "rate", "accuracy", "flops")),
                "final": Keys(("rate", "accuracy", "flops")),
                "parity": Keys(("format", "quantize", "per_exit"),
                               nested={"per_exit": Keys(("exit", "inputs", "max_abs_diff", "top1_agreement"))}),
                "search": Keys(("points", "head_accuracy", "thresholds", "rates", "flops_fraction", "accuracy",
                                "baseline_accuracy", "latency_check", "candidates", "seconds"),
                               nested={"candidates": Keys(("exits", "thresholds", "rates", "flops", "accuracy"),
                                                          optional=("ms",))}),
                "tflite": Keys(("path", "latency_ms", "static_path", "static_latency_ms", "static_bytes",
                                "mean_latency_ratio"), nested={"latency_ms": LATENCY, "static_latency_ms": LATENCY}),
            },
        ),
        "finetune": Keys(("epochs", "channel_steps_epochs", "final_epochs", "stopped_early", "history"),
                         optional=("block_steps_epochs", "steps", "final_steps", "steps_per_run", "learning_rate", "replicas")),
        "calibration": Keys(("samples", "data")),
        "timings_s": Keys(("search", "export", "total"),
                          optional=("load", "blocks", "channels", "layers", "finetune", "acceptance", "gating", "early_exit", "writing",
                                    "verification", "timing")),
    },
)
"""The keys of a complete report (status "ok" or "budget_not_met")."""

ERROR_REPORT = Keys(("schema", "status", "method", "error"))
"""The keys of an error report (status "error")."""


def report_problems(report: Mapping[str, Any]) -> list[str]:
    """What in `report` departs from the documented keys (empty when nothing does).

    Returns:
        One line per problem, naming the path of the object, e.g.
        "artifacts[1]: missing key 'bytes'" or "budget: undocumented key 'x'".
    """
    spec = ERROR_REPORT if report.get("status") == "error" else REPORT
    return _problems(report, spec, "report")


def documented_keys(spec: Keys = REPORT) -> set[str]:
    """Every key name the spec documents, at any depth."""
    names = set(spec.required) | set(spec.optional)
    for child in spec.nested.values():
        names |= documented_keys(child)
    return names


def _problems(value: Any, spec: Keys, path: str) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"{path}: expected an object, found {type(value).__name__}"]
    problems = [f"{path}: missing key {key!r}" for key in spec.required if key not in value]
    allowed = set(spec.required) | set(spec.optional)
    unknown = [key for key in value if key not in allowed]
    if unknown and spec.more is not None:
        allowed |= spec.more()
    problems += [f"{path}: undocumented key {key!r}" for key in unknown if key not in allowed]
    for key, child in spec.nested.items():
        item = value.get(key)
        if isinstance(item, list):
            for index, element in enumerate(item):
                problems += _problems(element, child, f"{path}.{key}[{index}]")
        elif item is not None:
            problems += _problems(item, child, f"{path}.{key}")
    return problems
