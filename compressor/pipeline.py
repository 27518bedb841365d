"""`compress` end to end: load → search (or replay a plan) → rewrite → export → verify → measure.

    report = compress(CompressOptions(model=Path("model.keras"), out=Path("build"),
                                      method="fixed_loss", max_acc_loss=0.02, data="val.npz"))
    report["status"]      # "ok" | "budget_not_met"

Accuracy in the report is measured on held-out data the search did not use
(`test_data`, or a stratified split of `data`), on the exported artifacts themselves
(TFLite first), and compared with the original model's artifact of the same format,
timed in the same interleaved run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compressor.config import CompressOptions
from compressor.errors import CompressorError
from compressor.io.data import Dataset

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

RUNTIME_FORMATS = ("tflite", "onnx")


def split_data(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split into (search, held-out) parts, stratified by label when there are labels.

    Raises:
        CompressorError: Too few samples to split.
    """
    n = len(data)
    if n < 4:
        raise CompressorError(f"{data.source} has {n} samples; need at least 4 to split off held-out data (or pass --test-data)")
    rng = np.random.default_rng(seed)
    held = []
    groups = [np.arange(n)] if data.y is None else [np.flatnonzero(data.y == c) for c in np.unique(data.y)]
    for idx in groups:
        idx = rng.permutation(idx)
        held.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(n, bool)
    mask[np.asarray(held, int)] = True
    if mask.all() or not mask.any():
        raise CompressorError(f"could not split {data.source} into search and held-out parts; pass --test-data")

    def part(m: np.ndarray, name: str) -> Dataset:
        return Dataset(data.x[m], None if data.y is None else data.y[m], f"{data.source} ({name})")

    return part(~mask, "search split"), part(mask, "held-out split")


def compress(options: CompressOptions, progress: Optional[Progress] = None, log: Optional[Log] = None) -> dict[str, Any]:
    """Run one compression and write its outputs into `options.out`.

    Returns:
        The report (also written to `out/report.json`), schema in DESIGN.md.

    Raises:
        CompressorError: Bad input, or a failure the user can act on.
    """
    from compressor.export.writers import single_input_shape
    from compressor.graph.cost import model_cost, stored_params
    from compressor.io.atomic import ensure_dir
    from compressor.io.data import load_data
    from compressor.io.models import load_model
    from compressor.search.apply import apply_plan
    from compressor.surgery.plan import Plan

    log = log or (lambda message: None)
    started = time.perf_counter()
    out = ensure_dir(options.out)
    model = load_model(options.model, options.custom_objects)
    sample_shape = single_input_shape(model)[1:]
    search_data, held_out = _datasets(options, sample_shape, load_data)
    budget = options.budget()
    base_cost = model_cost(model)

    log("searching" if options.plan is None else f"replaying {options.plan}")
    search_started = time.perf_counter()
    search = _search(options, model, budget, search_data, progress) if options.plan is None else None
    plan = search.plan if search else Plan.load(options.plan)
    compressed = apply_plan(model, plan)
    search_s = time.perf_counter() - search_started

    log("exporting and verifying artifacts")
    export_started = time.perf_counter()
    plan.save(out / "plan.json")
    artifacts = _export(options, model, compressed, plan, held_out, out)
    export_s = time.perf_counter() - export_started

    comp_cost = model_cost(compressed)
    baseline = {"params": stored_params(model), "flops": base_cost.flops, "accuracy": _accuracy(artifacts, "baseline_accuracy")}
    result = {
        "params": stored_params(compressed),
        "flops": comp_cost.flops,
        "accuracy": _accuracy(artifacts, "accuracy"),
        "dense_params": comp_cost.params,
    }
    budget_entry = _budget_entry(budget, baseline, result, search)
    report = {
        "status": "ok" if budget_entry["met"] in (True, None) else "budget_not_met",
        "method": options.method or "plan",
        "budget": budget_entry,
        "baseline": baseline,
        "compressed": result,
        "layers": _layer_rows(model, plan, base_cost, search),
        "artifacts": artifacts,
        "search": _search_entry(search, search_data, held_out),
        "timings_s": {"search": round(search_s, 3), "export": round(export_s, 3), "total": round(time.perf_counter() - started, 3)},
        "options": options.to_dict(),
        "notes": _notes(plan),
    }
    write_report(out / "report.json", report)
    return report


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write report.json atomically."""
    import json

    from compressor.io.atomic import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def _datasets(options: CompressOptions, shape: tuple, load_data: Callable) -> tuple[Optional[Dataset], Optional[Dataset]]:
    data = load_data(options.data, input_shape=shape) if options.data else None
    if options.method == "fixed_loss" and data is not None and data.y is None:
        raise CompressorError(f"--method fixed_loss needs labels: {data.source} has no 'y'")
    if options.test_data:
        return data, load_data(options.test_data, input_shape=shape)
    if data is None:
        return None, None
    if options.method == "fixed_loss":
        return split_data(data, options.test_fraction, options.seed)
    return None, data  # data-free search: all of --data measures the result


def _search(options: CompressOptions, model: Any, budget: Any, data: Optional[Dataset], progress: Optional[Progress]):
    from compressor.search.candidates import layer_candidates
    from compressor.search.kernels import KernelCache

    pattern = options.pattern() if "sparsity" in options.techniques else None
    kernels = KernelCache()  # effective kernels built for the candidates, reused by the search
    candidates, skipped = layer_candidates(model, options.techniques, pattern, kernels=kernels)
    if not candidates:
        reasons = "; ".join(f"{skip.layer}: {skip.reason}" for skip in skipped[:3]) or "it has no layers with weights"
        raise CompressorError(f"no layer can be compressed with --techniques {','.join(options.techniques)} ({reasons})")
    if options.method == "fixed_params":
        from compressor.search.fixed_params import search_fixed_params

        return search_fixed_params(model, candidates, budget, progress=progress, skipped=skipped)
    from compressor.search.fixed_loss import search_fixed_loss

    cache = options.cache_dir or default_cache_dir()
    return search_fixed_loss(
        model, candidates, data, budget, cache_dir=cache, progress=progress, skipped=skipped, kernels=kernels
    )


def default_cache_dir() -> Path:
    """Where sensitivity tables are cached: $XDG_CACHE_HOME/compressor or ~/.cache/compressor."""
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "compressor"


def _export(options: CompressOptions, model: Any, compressed: Any, plan: Any, held_out: Optional[Dataset], out: Path) -> list[dict]:
    from compressor.bench.benchmark import benchmark
    from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs

    x = verification_inputs(compressed, held_out, samples=64, seed=options.seed)
    sparse = any(edit.residual is not None or edit.technique == "sparsity" for edit in plan.edits)
    checks = export_and_verify(compressed, out, options.export, x, atol=options.atol, sparse_tflite=sparse)
    ensure_passed(checks)
    runtime = [fmt for fmt in options.export if fmt in RUNTIME_FORMATS]
    baselines = {}
    if runtime:
        base_checks = export_and_verify(model, out / "baseline", runtime, x, atol=options.atol)
        ensure_passed(base_checks)
        baselines = {check.format: check for check in base_checks}
    entries = []
    for check in checks:
        entry = {
            "format": check.format,
            "path": check.path,
            "bytes": check.bytes,
            "accuracy": None,
            "max_abs_diff": check.max_abs_diff,
            "top1_agreement": check.top1_agreement,
            "latency_ms": None,
            "baseline_latency_ms": None,
        }
        base = baselines.get(check.format)
        if base is not None:
            bench = benchmark(
                [base.path, check.path], data=held_out if held_out is not None and held_out.y is not None else None,
                runs=options.runs, warmup=options.warmup, threads=options.threads, seed=options.seed,
            )
            original, ours = bench.results
            entry.update(
                accuracy=ours.accuracy,
                baseline_accuracy=original.accuracy,
                latency_ms=ours.latency_ms.to_dict(),
                baseline_latency_ms=original.latency_ms.to_dict(),
                latency_ratio=ours.ratio_to_first,
                baseline_path=base.path,
                baseline_bytes=base.bytes,
            )
        elif held_out is not None and held_out.y is not None:
            entry.update(accuracy=_keras_accuracy(compressed, held_out), baseline_accuracy=_keras_accuracy(model, held_out))
        entries.append(entry)
    return entries


def _keras_accuracy(model: Any, data: Dataset) -> float:
    from compressor.export.verify import keras_outputs

    return float(np.mean(keras_outputs(model, data.x).argmax(-1) == data.y))


def _accuracy(artifacts: list[dict], key: str) -> Optional[float]:
    """The accuracy of the artifact that counts: TFLite first, then ONNX, then Keras."""
    order = {"tflite": 0, "onnx": 1, "keras": 2}
    for entry in sorted(artifacts, key=lambda e: order[e["format"]]):
        if entry.get(key) is not None:
            return entry[key]
    return None


def _budget_entry(budget: Any, baseline: dict, result: dict, search: Any) -> dict[str, Any]:
    from compressor.search.budgets import achieved_drop, achieved_fraction

    if budget is None:
        return {"kind": None, "limit": None, "achieved": None, "met": None}
    if budget.kind == "accuracy_drop":
        if baseline["accuracy"] is None or result["accuracy"] is None:
            raise CompressorError("the accuracy budget needs labelled held-out data")
        achieved = achieved_drop(baseline["accuracy"], result["accuracy"])
        measured_on = "held-out data, on the artifact (TFLite first)"
    else:
        achieved = achieved_fraction(result[budget.kind], baseline[budget.kind])
        measured_on = f"{budget.kind} of the compressed model"
    entry = {"kind": budget.kind, "limit": budget.limit, "achieved": achieved, "met": budget.met(achieved), "measured_on": measured_on}
    if search is not None:
        entry["search_achieved"] = search.achieved
    return entry


def _search_entry(search: Any, search_data: Optional[Dataset], held_out: Optional[Dataset]) -> dict[str, Any]:
    entry = {
        "search_samples": 0 if search_data is None else len(search_data),
        "held_out_samples": 0 if held_out is None else len(held_out),
        "evaluations": 0,
        "cached_evaluations": 0,
    }
    if search is not None:
        entry.update(
            evaluations=search.evaluations,
            cached_evaluations=search.cached_evaluations,
            baseline_accuracy=search.baseline_accuracy,
            accuracy=search.accuracy,
        )
    return entry


def _layer_rows(model: Any, plan: Any, cost: Any, search: Any) -> list[dict[str, Any]]:
    """One row per edited layer (its cost before and after) and per layer left alone (why)."""
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.base import edit_cost

    layers = editable_layers(model)
    before = {row.name: row for row in cost.layers}
    # The search summed FLOPs over every call of shared layers; a replayed plan costs each layer by its first call.
    chosen = {choice.name: choice for choice in search.layers} if search is not None else {}
    rows = []
    for edit in plan.edits:
        choice = chosen.get(edit.layer)
        params_after, flops_after = (
            (choice.params_after, choice.flops_after) if choice else edit_cost(layers[edit.layer], edit)
        )
        row = before.get(edit.layer)
        rows.append(
            {
                "name": edit.layer,
                "technique": edit.technique,
                "params_before": row.params if row else None,
                "params_after": params_after,
                "flops_before": row.flops if row else None,
                "flops_after": flops_after,
                **{k: v for k, v in edit.to_dict().items() if k not in ("layer", "technique")},
            }
        )
    for skip in plan.skipped:
        row = before.get(skip.layer)
        rows.append(
            {
                "name": skip.layer,
                "technique": "skipped",
                "reason": skip.reason,
                "params_before": row.params if row else None,
                "params_after": row.params if row else None,
                "flops_before": row.flops if row else None,
                "flops_after": row.flops if row else None,
            }
        )
    return rows


def _notes(plan: Any) -> list[str]:
    notes = []
    if any(edit.residual is not None or edit.technique == "sparsity" for edit in plan.edits):
        notes.append(
            "Sparse weights make the TFLite file smaller (stored sparsely), but TFLite runs "
            "convolutions dense: compare latency_ms, not the parameter count, for speed."
        )
    return notes
