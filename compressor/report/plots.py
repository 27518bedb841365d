"""The report's two plots, drawn from the report dict alone.

- `accuracy_vs_compression`: the search trace, search-data accuracy against the
  fraction of the budget's cost kept, one point per trial, with the baseline, the
  budget and the artifact's held-out accuracy.
- `layer_params`: per-layer parameters before and after, as horizontal bars (and
  the channels of pruned groups in a panel of their own).

matplotlib is imported inside the drawing functions and drives its Agg canvas
directly (no pyplot, no global backend switch), so importing this module is cheap
and drawing needs no display. Each PNG is written under a temporary name, then
renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from compressor.io.atomic import atomic_path

MAX_LAYERS = 40  # bars beyond this make the chart unreadable; the table lists every layer
DPI = 100
STAGE_COLOURS = {"channels": "tab:orange", "layers": "tab:blue"}
TECHNIQUE_COLOURS = {
    "tucker": "tab:blue",
    "svd": "tab:cyan",
    "hessian": "tab:purple",
    "sparsity": "tab:green",
    "channels": "tab:orange",
    "skipped": "tab:gray",
}
COST_LABELS = {"params": "parameters", "flops": "FLOPs"}


@dataclass(frozen=True)
class Plot:
    """A plot the report links, or why there is none.

    Attributes:
        path: The PNG written; None when there was nothing to draw.
        notes: What a reader should know about it (what is missing, what was cut).
    """

    path: Optional[Path]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TracePoint:
    """One trial as plotted: the fraction of the cost kept and the search-data accuracy."""

    stage: str
    kept: float
    accuracy: Optional[float]
    met: bool
    chosen: bool


def mapping_of(value: Any) -> Mapping[str, Any]:
    """`value` if it is a dict, else an empty one: a report edited by hand never breaks a page or a plot."""
    return value if isinstance(value, Mapping) else {}


def list_of(value: Any) -> list[Any]:
    """`value` as a list if it is one (or a tuple), else an empty list."""
    return list(value) if isinstance(value, (list, tuple)) else []


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON's true is no count)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cost_kind(report: Mapping[str, Any]) -> str:
    """What the x axis measures: the budget's cost, else FLOPs (what fixed_loss lowers by default)."""
    kind = mapping_of(report.get("budget")).get("kind")
    return kind if kind in COST_LABELS else "flops"


def trace_points(report: Mapping[str, Any]) -> list[TracePoint]:
    """The trials of `report["search"]["trials"]` as fractions of the original's cost.

    Trials whose cost or the baseline's is unknown are left out; an accuracy that
    is not a number counts as none.
    """
    kind = cost_kind(report)
    base = mapping_of(report.get("baseline")).get(kind)
    if not is_number(base) or not base:
        return []
    points = []
    for trial in map(mapping_of, list_of(mapping_of(report.get("search")).get("trials"))):
        cost, accuracy = trial.get(kind), trial.get("accuracy")
        if is_number(cost):
            accuracy = accuracy if is_number(accuracy) else None
            points.append(
                TracePoint(str(trial.get("stage")), cost / base, accuracy, bool(trial.get("met")), bool(trial.get("chosen")))
            )
    return points


def search_baseline_accuracy(report: Mapping[str, Any]) -> Optional[float]:
    """The original's accuracy on the search data.

    The channel search starts from the original; a layer search after it starts from
    the pruned model, so its baseline is the original's only when no channels went.
    """
    for section in ("channels", "search"):
        accuracy = mapping_of(report.get(section)).get("baseline_accuracy")
        if is_number(accuracy):
            return accuracy
    return None


def accuracy_vs_compression(report: Mapping[str, Any], path: Path) -> Plot:
    """Draw the search trace: accuracy against the fraction of the cost kept.

    Args:
        report: The report dict (report.json's content).
        path: Where the PNG goes.

    Returns:
        The plot, or Plot(None, reason) when the report has neither trials nor a
        held-out accuracy to show.
    """
    kind = cost_kind(report)
    points = trace_points(report)
    artifact = _artifact_point(report, kind)
    if not points and artifact is None:
        return Plot(None, ("No trial and no held-out accuracy to plot.",))
    notes = []
    measured = [p for p in points if p.accuracy is not None]
    if points and not measured:
        notes.append(
            "The search evaluated no accuracy (it allocates by kernel error, without data): the plot shows "
            "the chosen cost and the held-out accuracy only."
        )
    figure, axes = _figure((8, 6))
    _draw_trials(axes, points)
    _draw_reference(axes, report, kind)
    if artifact is not None:
        axes.scatter(*artifact, marker="D", s=70, color="black", zorder=5, label="compressed artifact (held-out data)")
    axes.set_xlabel(f"fraction of the original's {COST_LABELS[kind]} kept")
    axes.set_ylabel("top-1 accuracy")
    axes.set_xlim(0.0, 1.05)
    axes.set_title("Accuracy against compression (search trace)")
    axes.grid(True, alpha=0.3)
    # Below the axes, so it never hides a point.
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    return Plot(_save(figure, path), tuple(notes))


def layer_params(report: Mapping[str, Any], path: Path, most: int = MAX_LAYERS) -> Plot:
    """Draw each changed layer's params before (light) and after (coloured by technique), largest first.

    Rows of pruned channel groups (those with `channels_before`) also get a panel of
    channels below.

    Args:
        report: The report dict.
        path: Where the PNG goes.
        most: The most rows drawn per panel; the largest (by their count before) are kept.

    Returns:
        The plot, or Plot(None, reason) when no row has a count to draw.
    """
    rows = [mapping_of(row) for row in list_of(report.get("layers"))]
    panels, notes = [], []
    for unit, key in (("parameters", "params"), ("channels", "channels")):
        # Layers left as they were are in the table; the chart shows what changed.
        picked = [r for r in rows if is_number(r.get(f"{key}_before")) and r.get(f"{key}_after") != r[f"{key}_before"]]
        if not picked:
            continue
        picked = sorted(picked, key=lambda row: -row[f"{key}_before"])
        if len(picked) > most:
            notes.append(f"The chart shows the {most} largest of {len(picked)} rows of {unit}; the table lists them all.")
            picked = picked[:most]
        panels.append((unit, key, picked))
    if not panels:
        return Plot(None, ("No per-layer parameter or channel counts to plot.",))
    heights = [1.0 + 0.3 * len(picked) for _, _, picked in panels]
    figure, _ = _figure((8, max(3.0, 0.4 + sum(heights))), subplot=False)
    grid = figure.subplots(len(panels), 1, height_ratios=heights, squeeze=False)
    for axes, (unit, key, picked) in zip(grid[:, 0], panels):
        _draw_bars(axes, picked, key, unit)
    return Plot(_save(figure, path), tuple(notes))


# --- drawing ---------------------------------------------------------------------------------


def _figure(size: tuple[float, float], subplot: bool = True) -> tuple[Any, Any]:
    """A figure on the Agg canvas (no pyplot, no display), with one axes unless told otherwise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot() if subplot else None


def _draw_trials(axes: Any, points: Sequence[TracePoint]) -> None:
    for stage in sorted({p.stage for p in points}):
        colour = STAGE_COLOURS.get(stage, "tab:green")
        for met in (True, False):
            group = [p for p in points if p.stage == stage and p.met == met and p.accuracy is not None]
            if group:
                axes.scatter(
                    [p.kept for p in group], [p.accuracy for p in group], s=36, zorder=3,
                    color=colour if met else "none", edgecolors=colour,
                    label=f"{stage} trial, {'met the budget' if met else 'missed the budget'}",
                )
    for p in points:
        if not p.chosen:
            continue
        if p.accuracy is None:
            axes.axvline(p.kept, color=STAGE_COLOURS.get(p.stage, "tab:green"), linestyle=":",
                         label=f"chosen {p.stage} plan (no search-data accuracy)")
        else:
            axes.scatter([p.kept], [p.accuracy], marker="*", s=260, color=STAGE_COLOURS.get(p.stage, "tab:green"),
                         edgecolors="black", zorder=4, label=f"chosen ({p.stage})")


def _draw_reference(axes: Any, report: Mapping[str, Any], kind: str) -> None:
    """The original's accuracies at 1.0 and the budget: a horizontal line (accuracy) or a vertical one (cost)."""
    budget = mapping_of(report.get("budget"))
    limit = budget.get("limit") if is_number(budget.get("limit")) else None
    searched = search_baseline_accuracy(report)
    if searched is not None:
        axes.scatter([1.0], [searched], marker="o", s=60, color="gray", zorder=3, label="original (search data)")
        if budget.get("kind") == "accuracy_drop" and limit is not None:
            axes.axhline(searched - limit, color="tab:red", linestyle="--",
                         label=f"budget: original − {100 * limit:.2f} points (search data)")
    held_out = mapping_of(report.get("baseline")).get("accuracy")
    if is_number(held_out):
        axes.scatter([1.0], [held_out], marker="D", s=60, color="white", edgecolors="black", zorder=3,
                     label="original artifact (held-out data)")
    if budget.get("kind") == kind and limit is not None:
        axes.axvline(limit, color="tab:red", linestyle="--", label=f"budget: {limit:.0%} of the {COST_LABELS[kind]}")


def _artifact_point(report: Mapping[str, Any], kind: str) -> Optional[tuple[float, float]]:
    compressed, baseline = mapping_of(report.get("compressed")), mapping_of(report.get("baseline"))
    accuracy, cost, base = compressed.get("accuracy"), compressed.get(kind), baseline.get(kind)
    if not (is_number(accuracy) and is_number(cost) and is_number(base) and base):
        return None
    return cost / base, accuracy


def _draw_bars(axes: Any, rows: Sequence[Mapping[str, Any]], key: str, unit: str) -> None:
    from matplotlib.patches import Patch

    positions = list(range(len(rows)))
    before = [row[f"{key}_before"] for row in rows]
    after = [row[f"{key}_after"] if is_number(row.get(f"{key}_after")) else row[f"{key}_before"] for row in rows]
    techniques = [row.get("technique") or "skipped" for row in rows]
    axes.barh(positions, before, height=0.8, color="lightgray")
    axes.barh(positions, after, height=0.45, color=[_colour(t) for t in techniques])
    handles = [Patch(color="lightgray", label="before")]
    handles += [Patch(color=_colour(t), label=f"after: {t}") for t in dict.fromkeys(techniques)]
    axes.set_yticks(positions, [_short(str(row.get("name", "?"))) for row in rows], fontsize="small")
    axes.invert_yaxis()  # largest on top
    axes.set_xlabel(unit)
    axes.xaxis.set_major_formatter("{x:,.0f}")
    axes.set_title(f"{unit.capitalize()} per {'layer' if key == 'params' else 'pruned group'}, before and after")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # beside: hides no bar


def _colour(technique: str) -> str:
    return TECHNIQUE_COLOURS.get(technique, "tab:olive")


def _short(name: str, most: int = 40) -> str:
    return name if len(name) <= most else "…" + name[-(most - 1):]


def _save(figure: Any, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path
