"""fixed_params: meet a params or FLOPs budget without data, allocating compression globally.

Each layer l offers options j with a cost c_lj (params or FLOPs) and a relative
kernel error e_lj = ||W − Ŵ||/||W||; keeping the layer costs c_l0 with e = 0. The
search minimizes the total penalty Σ_l e_l² subject to Σ_l c_l ≤ target.

Why Σ e² with equal weights: a layer's relative kernel error is, to first order, the
relative (noise-to-signal) error it adds to its output, and independent
noise-to-signal ratios of the layers of a network add up at its output (the
additive-SQNR model used to allocate bit widths in quantization). Relative errors
are also blind to a layer's scale, which batch normalization makes arbitrary, so no
layer needs a weight of its own.

The allocation is the Lagrangian one, found greedily: for every λ the best choice
per layer minimizes e² + λ·c, and sweeping λ upward moves each layer along the lower
convex hull of its (cost saved, e²) points. The greedy takes hull steps in order of
least added error per cost saved until the budget is met, then spends what the last
step saved beyond the target on the moves (off the hull too) that lower the error
most. Layers end up at different ranks: cheap-to-compress layers go far, sensitive
ones little or not at all.
"""

from __future__ import annotations

import heapq
import time
from typing import Mapping, Optional, Sequence

import keras

from compressor.search.budgets import Budget, BudgetError, achieved_fraction
from compressor.search.candidates import LayerCandidates, Option, baseline_cost
from compressor.search.result import Progress, SearchResult, Trial, layer_choices, plan_for, predicted_cost
from compressor.surgery.plan import SkippedLayer

KEPT_REASON = "left as it is: the budget was met at less error without compressing it"


def search_fixed_params(
    model: keras.Model,
    candidates: Sequence[LayerCandidates],
    budget: Budget,
    progress: Optional[Progress] = None,
    skipped: Sequence[SkippedLayer] = (),
) -> SearchResult:
    """The plan of least total kernel error whose params (or FLOPs) meet the budget.

    Args:
        model: The original model.
        candidates: From `layer_candidates(model, ...)`.
        budget: A "params" or "flops" budget (fraction of the baseline kept).
        progress: Called as progress("allocation", done, total).
        skipped: Layers `layer_candidates` skipped, carried into the plan.

    Returns:
        The result, with one trial (the chosen allocation, no accuracy). When even
        the most compressing option of every layer cannot reach the budget, the
        most compressed plan with `met=False`.

    Raises:
        BudgetError: An accuracy budget (it needs data: use fixed_loss).
    """
    if not budget.is_cost:
        raise BudgetError(
            f"fixed_params meets a params or flops budget; an {budget.kind} budget needs data: use fixed_loss"
        )
    started = time.perf_counter()
    baseline = baseline_cost(model, candidates)
    total = baseline[0] if budget.kind == "params" else baseline[1]
    chosen = allocate(candidates, budget.kind, budget.target(total), base=total)
    if progress is not None:
        progress("allocation", 1, 1)
    params, flops = predicted_cost(baseline, candidates, chosen)
    achieved = achieved_fraction(params if budget.kind == "params" else flops, total)
    met = budget.met(achieved)
    return SearchResult(
        method="fixed_params",
        plan=plan_for(model, chosen, candidates, skipped, KEPT_REASON),
        budget=budget,
        achieved=achieved,
        met=met,
        baseline_params=baseline[0],
        baseline_flops=baseline[1],
        params=params,
        flops=flops,
        seconds=time.perf_counter() - started,
        layers=layer_choices(candidates, chosen),
        # The greedy builds one allocation and evaluates no model: its trace is that allocation.
        trials=(Trial("layers", params, flops, None, met, chosen=True),),
    )


def allocate(
    candidates: Sequence[LayerCandidates], kind: str, target: int, base: Optional[int] = None
) -> dict[str, Option]:
    """Choose at most one option per layer: least Σ error² with the total cost ≤ target.

    Args:
        candidates: The layers and their options.
        kind: "params" or "flops".
        target: The largest total cost allowed.
        base: The total cost with every layer kept (default: the candidates' own
            costs only, i.e. a model of nothing but these layers).

    Returns:
        Layer name → chosen option; layers not in it are kept. When the target is
        out of reach, every layer's cheapest option (the most compressed plan).
    """
    base = sum(c.cost(kind) for c in candidates) if base is None else base
    hulls = {c.name: _hull(c, kind) for c in candidates}
    at = {name: 0 for name in hulls}  # position on each hull; 0 = kept
    cost = base
    heap = [(_slope(hull, 0), name) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(heap)
    while cost > target and heap:
        _, name = heapq.heappop(heap)
        hull, position = hulls[name], at[name]
        cost -= hull[position + 1][0] - hull[position][0]
        at[name] = position + 1
        if position + 2 < len(hull):
            heapq.heappush(heap, (_slope(hull, position + 1), name))
    chosen = {name: hulls[name][position][2] for name, position in at.items() if position > 0}
    if cost <= target:
        chosen = _spend_slack(candidates, kind, chosen, target - cost)
    return chosen


def penalty(options: Mapping[str, Option]) -> float:
    """The allocation's objective: Σ error² over the chosen options."""
    return sum(option.error**2 for option in options.values())


def _hull(candidate: LayerCandidates, kind: str) -> list[tuple[int, float, Optional[Option]]]:
    """The lower convex hull of (cost saved, error²) from "kept" (0, 0) to the cheapest option."""
    own = candidate.cost(kind)
    points = sorted(
        ((own - option.cost(kind), option.error**2, option) for option in candidate.options if option.cost(kind) < own),
        key=lambda point: (point[0], point[1]),
    )
    hull: list[tuple[int, float, Optional[Option]]] = [(0, 0.0, None)]
    for point in points:
        if point[0] == hull[-1][0]:
            continue  # same saving, no less error (sorted by error within a saving)
        # Drop earlier points that lie on or above the segment to this one.
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(a: tuple, b: tuple, c: tuple) -> float:
    """> 0 when b lies strictly below the segment a→c (the turn a→b→c is convex)."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _slope(hull: list[tuple], position: int) -> float:
    (s0, p0, _), (s1, p1, _) = hull[position], hull[position + 1]
    return (p1 - p0) / (s1 - s0)


def _spend_slack(
    candidates: Sequence[LayerCandidates], kind: str, chosen: dict[str, Option], slack: int
) -> dict[str, Option]:
    """Move layers to lighter options (any, kept included) that fit in `slack`, best error gain first."""
    chosen = dict(chosen)
    while True:
        best: Optional[tuple[float, LayerCandidates, Optional[Option], int]] = None
        for candidate in candidates:
            current = chosen.get(candidate.name)
            current_cost = current.cost(kind) if current else candidate.cost(kind)
            current_error = current.error**2 if current else 0.0
            for option in (None, *candidate.options):
                cost = option.cost(kind) if option else candidate.cost(kind)
                gain = current_error - (option.error**2 if option else 0.0)
                extra = cost - current_cost
                if gain > 1e-12 and extra <= slack and (best is None or gain > best[0]):
                    best = (gain, candidate, option, extra)
        if best is None:
            return chosen
        _, candidate, option, extra = best
        slack -= extra
        if option is None:
            chosen.pop(candidate.name, None)
        else:
            chosen[candidate.name] = option
