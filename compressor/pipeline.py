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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from compressor.config import CompressOptions
from compressor.errors import CompressorError, OptionError
from compressor.io.data import Dataset
from compressor.report.schema import SCHEMA

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



@dataclass(frozen=True)
class Inputs:
    """In-memory inputs that stand in for the files the options name (the Python API's model and arrays).

    Attributes:
        model: A Keras graph model, used instead of loading `options.model`.
        data, test_data, train_data: Datasets (`compressor.io.data.from_arrays`) used
            instead of loading the option of the same name.
    """

    model: Any = None
    data: Optional[Dataset] = None
    test_data: Optional[Dataset] = None
    train_data: Optional[Dataset] = None


def compress(options: CompressOptions, progress: Optional[Progress] = None, log: Optional[Log] = None,
             inputs: Optional[Inputs] = None) -> dict[str, Any]:
    """Run one compression and write its outputs into `options.out`.

    Everything is written into a staging folder first and moved into `options.out`
    only when the run finishes, so an interrupted or failed run leaves the folder as
    it was. A folder that holds earlier results is refused unless `options.overwrite`.

    Returns:
        The report (also written to `out/report.json`, with `out/report.md`), schema
        in the README.

    Raises:
        CompressorError: Bad input, or a failure the user can act on.
    """
    return compress_model(options, progress, log, inputs)[0]


def compress_model(options: CompressOptions, progress: Optional[Progress] = None, log: Optional[Log] = None,
                   inputs: Optional[Inputs] = None) -> tuple[dict[str, Any], Any]:
    """`compress`, also returning the compressed Keras model: (report, model)."""
    from compressor.io.outdir import staged_output

    with staged_output(options.out, options.overwrite, options.input_files()) as staging:
        report, compressed = _compress(options, staging, progress or (lambda stage, done, total: None),
                                       log or (lambda message: None), inputs or Inputs())
    return report, compressed


def check_inputs(options: CompressOptions) -> None:
    """Refuse missing or damaged input files before any model work (and before TensorFlow loads).

    Checks the model path (present, of a kind we read, intact), each data option
    (an existing path or a `pkg.module:function` hook), and the plan to replay.

    Raises:
        CompressorError: One line naming the input and what is wrong with it.
    """
    from compressor.io.model_files import check_model_path

    check_model_path(options.model)
    _check_data_and_plan(options)


def _check_data_and_plan(options: CompressOptions, inputs: Optional[Inputs] = None) -> None:
    from compressor.io.data import check_data_spec
    from compressor.surgery.plan import Plan

    for key in ("data", "test_data", "train_data"):
        spec = getattr(options, key)
        if spec is not None and (inputs is None or getattr(inputs, key) is None):
            check_data_spec(spec, "--" + key.replace("_", "-"))
    if options.plan is not None:
        Plan.load(options.plan)


def _compress(options: CompressOptions, staging: Path, progress: Progress, log: Log, inputs: Inputs) -> tuple[dict[str, Any], Any]:
    from compressor.graph.cost import model_cost, stored_params
    from compressor.io.models import load_model
    from compressor.surgery.plan import Plan

    started = time.perf_counter()
    _check_data_and_plan(options, inputs)  # before the model loads; load_model checks the model file
    if inputs.model is not None:
        from compressor.io.models import require_graph_model

        model = require_graph_model(inputs.model)
    else:
        log(f"loading {options.model}")
        model = load_model(options.model, options.custom_objects, allow_model_code=options.allow_model_code)
    load = _data_loader(model, options, inputs)
    search_data, held_out = _datasets(options, load)
    train_data = load("train_data")
    budget = options.budget()
    base_cost = model_cost(model)

    log("searching" if options.plan is None else f"replaying {options.plan}")
    search_started = time.perf_counter()
    if options.plan is None:
        outcome = _search_all(options, model, budget, search_data, train_data, progress, log)
    else:
        outcome = _replay(options, model, Plan.load(options.plan), search_data, train_data, log)
    plan, compressed, search = outcome.plan, outcome.compressed, outcome.search
    search_s = time.perf_counter() - search_started

    log("exporting, verifying and timing artifacts")
    export_started = time.perf_counter()
    plan.save(staging / "plan.json")
    calibration, calibration_source = _calibration(options, train_data, search_data, held_out)
    artifacts, static_tflite = _export(options, model, compressed, plan, held_out, staging, calibration, progress, outcome.static)
    export_s = time.perf_counter() - export_started

    comp_cost = model_cost(compressed)
    counted = _counted_artifact(artifacts)
    baseline = {"params": stored_params(model), "flops": base_cost.flops, "accuracy": _accuracy(artifacts, "baseline_accuracy")}
    result = {
        "params": stored_params(compressed),
        "flops": comp_cost.flops,
        "accuracy": None if counted is None else counted.get("accuracy"),
        "dense_params": comp_cost.params,
    }
    budget_entry = _budget_entry(budget, baseline, result, outcome.search_achieved(budget), counted)
    report = {
        "schema": SCHEMA,
        "status": "ok" if budget_entry["met"] in (True, None) else "budget_not_met",
        "method": options.method or "plan",
        "budget": budget_entry,
        "baseline": baseline,
        "compressed": result,
        "quantize": options.quantize,
        "layers": _channel_rows(outcome, base_cost) + _layer_rows(outcome.working, plan, model_cost(outcome.working), search),
        "artifacts": artifacts,
        "search": _search_entry(outcome, search_data, held_out),
        "channels": outcome.channels.to_dict() if outcome.channels is not None else None,
        "gating": _gating_entry(options, outcome, *_gating_data(held_out, train_data), static_tflite, artifacts),
        "finetune": outcome.finetune_entry(),
        "calibration": None if calibration is None else {"samples": len(calibration), "data": calibration_source},
        "timings_s": {"search": round(search_s, 3), "export": round(export_s, 3), "total": round(time.perf_counter() - started, 3)},
        "options": options.to_dict(),
        "notes": _notes(plan, calibration_source),
    }
    if report["gating"] and report["gating"]["applied"]:
        result["expected_flops"] = report["gating"]["flops_per_input"]["mean"]
    _relocate(report, staging, options.out)
    write_report(staging / "report.json", report)
    _write_markdown(report, staging, log)
    return report, compressed


def _relocate(report: dict[str, Any], staging: Path, out: Path) -> None:
    """Point the artifact paths of the report at where the files will be after the move."""
    tflite = (report.get("gating") or {}).get("tflite") or {}
    for entry in [*report["artifacts"], tflite]:
        for key in ("path", "baseline_path", "static_path"):
            if entry.get(key):
                entry[key] = str(Path(out) / Path(entry[key]).relative_to(staging))


def _gating_data(held_out: Optional[Dataset], train_data: Optional[Dataset]) -> tuple[Optional[Dataset], str]:
    """The inputs the gates' skip rates are measured on: held-out data, else the training data."""
    return (held_out, "held-out") if held_out is not None else (train_data, "train")


def _gating_entry(options: CompressOptions, outcome: _Outcome, data: Optional[Dataset], data_name: str,
                  static_tflite: Optional[dict], artifacts: list[dict]) -> Optional[dict[str, Any]]:
    """What the gates do: skip rate per block, FLOPs per input, TFLite latency per input against the static model."""
    record = outcome.plan.gating
    if record is None and outcome.gating is None:
        return None
    trained = outcome.gating
    attempts = trained.attempts if trained is not None else []
    if record is None:
        return {"applied": False, "target": options.gating_target, "attempts": attempts, "reason": trained.reason,
                "latency_check": trained.latency_check}
    from compressor.graph.cost import model_cost
    from compressor.search.gating import block_flops, gating_statistics
    from compressor.techniques.gating import find_residual_blocks

    static_cost = model_cost(outcome.static)
    flops = trained.flops if trained is not None else block_flops(outcome.static, find_residual_blocks(outcome.static))
    entry = {
        "applied": True,
        "blocks": [{"name": name, "flops": flops[name], "skip_rate": None} for name in record["blocks"]],
        "target": options.gating_target if trained is not None else record["target"],
        "trained_target": record["target"],
        "network": record["network"],
        "epochs": record["epochs"],
        "offset": record["offset"],
        "attempts": attempts,
        "latency_check": trained.latency_check if trained is not None else None,
        "history": list(trained.history) if trained is not None else [],
        "measured_on": data_name,
        "static_flops": static_cost.flops,
    }
    if data is not None:
        stats = gating_statistics(outcome.compressed, data.x, flops, model_cost(outcome.compressed).flops)
        entry.update(stats)
        entry["expected_flops_fraction"] = stats["flops_per_input"]["mean"] / static_cost.flops
    gated = next((a for a in artifacts if a["format"] == "tflite" and a.get("quantize", "none") == "none"), None)
    if static_tflite is not None and gated is not None and gated.get("latency_ms"):
        entry["tflite"] = {
            "path": gated["path"],
            "latency_ms": gated["latency_ms"],
            "static_path": static_tflite["path"],
            "static_latency_ms": static_tflite["latency_ms"],
            "static_bytes": static_tflite["bytes"],
            "mean_latency_ratio": gated["latency_ms"]["mean"] / static_tflite["latency_ms"]["mean"],
        }
    return entry


def _write_markdown(report: dict[str, Any], folder: Path, log: Log) -> None:
    from compressor.report.markdown import write_markdown_report

    log("writing report.md and plots")
    write_markdown_report(report, folder)


@dataclass
class _Outcome:
    """What the search (or a replay) made: the plan, the models, and how they were reached.

    `working` is the model the per-layer edits apply to: the original, or the original
    without its removed channels.
    """

    plan: Any
    compressed: Any
    working: Any
    search: Any = None
    channels: Any = None
    tuning: Any = None
    static: Any = None  # the compressed model before gates were added (None: no gating)
    gating: Any = None  # the GatingOutcome, when gating was asked for

    def search_achieved(self, budget: Any) -> Optional[float]:
        """The search data's measure of the budget, when one search alone made the result (or gating last)."""
        if budget is None:
            return None
        gated = self.gating
        if gated is not None and gated.model is not None and budget.kind == "accuracy_drop":
            return None if gated.accuracy is None else gated.baseline_accuracy - gated.accuracy
        if self.channels is None:
            return None if self.search is None else self.search.achieved
        if self.search is None and budget.kind == "accuracy_drop" and self.channels.accuracy is not None:
            return self.channels.baseline_accuracy - self.channels.accuracy
        return None

    def finetune_entry(self) -> dict[str, Any]:
        channel_epochs = self.channels.epochs if self.channels is not None else 0
        final = self.tuning.epochs_run if self.tuning is not None else 0
        return {
            "epochs": channel_epochs + final,
            "channel_steps_epochs": channel_epochs,
            "final_epochs": final,
            "stopped_early": bool(self.tuning.stopped_early) if self.tuning is not None else None,
            "history": list(self.tuning.history) if self.tuning is not None else [],
        }


def _search_all(options: CompressOptions, model: Any, budget: Any, search_data: Optional[Dataset],
                train_data: Optional[Dataset], progress: Optional[Progress], log: Log) -> _Outcome:
    """Channels first (when asked for), then the per-layer techniques on what is left, then fine-tuning."""
    from compressor.search.apply import apply_plan
    from compressor.search.result import model_identity
    from compressor.surgery.plan import Plan

    layer_techniques = tuple(t for t in options.techniques if t not in STAGE_TECHNIQUES)
    gating = "gating" in options.techniques
    if gating:
        _check_gateable(model)  # before minutes of static search, not after
    working, channels = model, None
    if "channels" in options.techniques:
        channels = _search_channels(options, model, budget, search_data, train_data, layer_techniques, log, progress)
        working = channels.model
    search, statistics, compressed = None, None, working
    remaining = _remaining_budget(budget, model, working, channels) if layer_techniques else None
    if remaining is not None:
        with _layer_statistics(options, working, search_data, train_data, log) as statistics:
            search = _search(options, working, remaining, search_data, progress, layer_techniques)
            compressed = apply_plan(working, search.plan)
    tuning = None
    if options.finetune_epochs and search is not None and search.plan.edits:
        tuning = _finetune(options, compressed, model, working, search.plan.edits, train_data, search_data, budget, log, progress)
    static, gated = compressed, None
    if gating:
        gated = _gate(options, model, static, budget, search_data, train_data, log, progress)
        if gated.model is not None:
            compressed = gated.model
    plan = Plan(
        model=model_identity(model),
        edits=search.plan.edits if search else (),
        skipped=search.plan.skipped if search else (),
        channels=channels.removals if channels else (),
        finetune=_finetune_record(options, channels, tuning),
        statistics=statistics,
        gating=_gating_record(gated),
    )
    applied = gated is not None and gated.model is not None
    return _Outcome(plan, compressed, working, search, channels, tuning, static if applied else None, gated)


STAGE_TECHNIQUES = ("channels", "gating")
"""Techniques that are stages of their own, not per-layer edits."""

def _check_gateable(model: Any) -> None:
    from compressor.techniques.gating import find_residual_blocks

    if not find_residual_blocks(model):
        raise CompressorError(
            f"--techniques gating: model '{model.name}' has no residual block (a branch added back to its own input) to gate"
        )


def _gate(options: CompressOptions, model: Any, static: Any, budget: Any, search_data: Optional[Dataset],
          train_data: Optional[Dataset], log: Log, progress: Progress) -> Any:
    """Gate the residual blocks of the statically compressed model and train the gates.

    The static stages spend the budget as they would alone; gating comes on top. Under
    an accuracy budget the gated model must stay within it on the search data (with
    the same margin for held-out noise as the static stages), measured against the
    original: gating spends what the static stages left, and training the network with
    the gates (distilling the static model) wins some back.
    """
    from compressor.finetune import accuracy
    from compressor.search.channels import MARGIN
    from compressor.search.gating import GatingConfig, gate_model

    floor = baseline = None
    if budget is not None and budget.kind == "accuracy_drop" and search_data is not None and search_data.y is not None:
        baseline = accuracy(model, search_data)
        floor = baseline - MARGIN * budget.limit
    config = GatingConfig(target=options.gating_target, epochs=options.gating_epochs, network=options.gating_network, seed=options.seed)
    outcome = gate_model(
        static, train_data, config, search=search_data, min_accuracy=floor, log=log,
        on_epoch=lambda epoch, epochs: progress("training gates", epoch, epochs),
    )
    if outcome.model is not None:
        timing = (search_data, "search") if search_data is not None else (train_data, "training")
        _check_speed(options, static, outcome, *timing, log)
    if outcome.model is None:
        log(f"gating: not applied, {outcome.reason}")
    outcome.baseline_accuracy = baseline
    return outcome


def _check_speed(options: CompressOptions, static: Any, outcome: Any, data: Dataset, name: str, log: Log) -> None:
    """Keep the gates only if the gated TFLite file is faster per input than the static one, measured.

    Timed on the search data (else the training data; never the held-out data the
    report measures on), converted as `compress` exports them, interleaved; a gated
    model whose gates cost more than their skipping saves (small blocks, few skips) is
    dropped here.
    """
    from compressor.search.gating import tflite_latency

    log("timing the gated TFLite model against the static one")
    x = data.x[:LATENCY_SAMPLES]
    static_ms, gated_ms = tflite_latency(static, outcome.model, x, threads=options.threads, seed=options.seed)
    outcome.latency_check = {"static_ms": static_ms, "gated_ms": gated_ms, "data": name, "samples": len(x)}
    if gated_ms >= static_ms:
        outcome.model = None
        outcome.reason = (
            f"the gated TFLite model took {gated_ms:.3f} ms per input on average against {static_ms:.3f} ms "
            f"without gates ({len(x)} {name} inputs): the gates cost more than they skip"
        )


LATENCY_SAMPLES = 200


def _gating_record(gated: Any) -> Optional[dict[str, Any]]:
    if gated is None or gated.model is None:
        return None
    from compressor.search.gating import gating_record

    return gating_record(gated)


def _search_channels(options, model, budget, search_data, train_data, layer_techniques, log, progress):
    from compressor.search.budgets import Budget
    from compressor.search.channels import ChannelSettings, search_channels

    channel_budget = budget
    if budget.kind != "accuracy_drop" and layer_techniques:
        # Two stages share one cost budget: channels take the square root of it.
        channel_budget = Budget(budget.kind, budget.limit ** 0.5)
    settings = ChannelSettings(
        criterion=options.criterion,
        max_fraction=options.max_channel_fraction,
        finetune=_finetune_config(options),
        objective=options.budget_on if budget.kind != "accuracy_drop" else "flops",
        seed=options.seed,
    )
    log(f"removing channels ({options.criterion})")
    return search_channels(model, channel_budget, settings, search_data, train_data, log, progress)


def _remaining_budget(budget: Any, model: Any, working: Any, channels: Any) -> Any:
    """The budget left for the per-layer search after channel pruning; None when nothing is left."""
    from compressor.graph.cost import model_cost
    from compressor.search.budgets import Budget

    if channels is None:
        return budget
    if budget.kind == "accuracy_drop":
        # Both stages keep the channel search's margin for held-out noise.
        from compressor.search.channels import MARGIN

        spent = channels.baseline_accuracy - channels.accuracy
        left = MARGIN * budget.limit - max(spent, 0.0)
        return Budget.accuracy_drop(left) if left > 0 else None
    base, now = model_cost(model), model_cost(working)
    base_value, now_value = (base.params, now.params) if budget.kind == "params" else (base.flops, now.flops)
    fraction = budget.limit * base_value / max(now_value, 1)
    return Budget(budget.kind, fraction) if fraction < 1.0 else None


def _finetune_config(options: CompressOptions) -> Any:
    if not options.finetune_epochs:
        return None
    from compressor.finetune import FinetuneConfig

    return FinetuneConfig(epochs=options.finetune_epochs, seed=options.seed)


def _finetune(options, compressed, teacher, working, edits, train_data, search_data, budget, log, progress):
    """Fine-tune the rewritten model with the original as teacher.

    Kernels the plan masks by magnitude are pruned gradually instead (tfmot's
    PolynomialDecay schedule, from dense to the planned density over the first 60% of
    the steps), which recovers more than fine-tuning a one-shot mask; other zeros
    (masks by another criterion, sparse residual branches) stay fixed.
    """
    from compressor.finetune import GradualSparsity, accuracy, finetune, fixed_masks
    from compressor.surgery.editable import editable_layers

    gradual = {}
    if options.criterion == "magnitude":
        gradual = {edit.layer: edit.sparsity for edit in edits if edit.technique == "sparsity"}
        dense, sparse = editable_layers(working), editable_layers(compressed)
        for name in gradual:
            sparse[name].set_weights(dense[name].get_weights())
    target = None
    if budget is not None and budget.kind == "accuracy_drop" and search_data is not None and search_data.y is not None:
        target = accuracy(teacher, search_data) - budget.limit / 4
    log(f"fine-tuning up to {options.finetune_epochs} epoch(s)")
    return finetune(
        compressed, teacher, train_data, _finetune_config(options),
        val=search_data if search_data is not None and search_data.y is not None else None,
        target_accuracy=target,
        masks={name: mask for name, mask in fixed_masks(compressed).items() if name not in gradual},
        sparsity=GradualSparsity(targets=gradual) if gradual else None,
        on_epoch=lambda epoch, epochs, _entry: progress("fine-tuning", epoch, epochs),
    )


def _finetune_record(options: CompressOptions, channels: Any, tuning: Any) -> Optional[dict[str, Any]]:
    epochs = (channels.epochs if channels is not None else 0) + (tuning.epochs_run if tuning is not None else 0)
    if not epochs:
        return None
    return {"epochs": epochs, "epochs_per_run": options.finetune_epochs, "teacher": "original", "seed": options.seed}


@contextmanager
def _layer_statistics(options: CompressOptions, model: Any, search_data: Optional[Dataset],
                      train_data: Optional[Dataset], log: Log) -> Iterator[Optional[dict[str, Any]]]:
    """Register the data-driven per-layer techniques for a block of work; yield how their data was gathered.

    "hessian" needs K-FAC eigenbases of each layer; "sparsity" with a --criterion other
    than magnitude ranks weights by that criterion's scores. Both come from
    --train-data (or --data) and are recomputed the same way when a plan is replayed.
    """
    from compressor.techniques.registry import use_technique

    data, source = (train_data, "train") if train_data is not None else (search_data, "search")
    hessian = "hessian" in options.techniques
    scored = "sparsity" in options.techniques and options.criterion != "magnitude"
    if not (hessian or scored):
        yield None
        return
    if data is None:
        what = "K-FAC statistics" if hessian else f"{options.criterion} scores"
        raise CompressorError(f"--techniques {','.join(options.techniques)} gathers {what} on data: pass --train-data or --data")
    record: dict[str, Any] = {"data": source, "seed": options.seed}
    with ExitStack() as stack:
        if hessian:
            stack.enter_context(use_technique(_hessian_technique(model, data, options.seed, log)))
            record.update(kfac_samples=min(KFAC_SAMPLES, len(data)), labels="sampled")
        if scored:
            from compressor.techniques.scores import weight_scores
            from compressor.techniques.sparsity import Sparsity

            log(f"scoring weights ({options.criterion})")
            scores = weight_scores(model, options.criterion, data, seed=options.seed)
            stack.enter_context(use_technique(Sparsity(scores)))
            record["criterion"] = options.criterion
        yield record


def _hessian_technique(model: Any, data: Dataset, seed: int, log: Log) -> Any:
    from compressor.surgery.editable import editable_layers
    from compressor.techniques.hessian import Hessian, eigen_decompose, kfac_factors

    log("gathering K-FAC statistics")
    factors = kfac_factors(model, data, seed=seed, samples=KFAC_SAMPLES)
    layers = editable_layers(model)
    return Hessian({name: eigen_decompose(layers[name], factor) for name, factor in factors.items() if name in layers})


KFAC_SAMPLES = 512


def _replay(options: CompressOptions, model: Any, plan: Any, search_data: Optional[Dataset],
            train_data: Optional[Dataset], log: Log) -> _Outcome:
    """Re-apply a saved plan; recompute K-FAC statistics and re-fine-tune where it says so."""
    from compressor.search.apply import apply_plan, prune_planned_channels

    if plan.finetune and train_data is None:
        raise CompressorError(f"{options.plan} was fine-tuned ({plan.finetune.get('epochs')} epochs): pass --train-data to replay it")
    working = prune_planned_channels(model, plan) if plan.channels else model
    with _layer_statistics(_replay_options(options, plan), working, search_data, train_data, log):
        compressed = apply_plan(model, plan)
    tuning = None
    if plan.finetune:
        from compressor.finetune import FinetuneConfig, finetune, fixed_masks

        config = FinetuneConfig(epochs=int(plan.finetune["epochs"]), seed=int(plan.finetune.get("seed", options.seed)))
        log(f"fine-tuning {config.epochs} epoch(s), as the plan records")
        tuning = finetune(compressed, model, train_data, config, masks=fixed_masks(compressed))
    static = None
    if plan.gating:
        from compressor.search.gating import replay_gates

        log("adding the plan's gates")
        static, compressed = compressed, replay_gates(compressed, plan.gating, train_data)
    return _Outcome(plan, compressed, working, tuning=tuning, static=static)


def _replay_options(options: CompressOptions, plan: Any) -> CompressOptions:
    """The options that rebuild the plan's data-driven edits as they were made."""
    import dataclasses

    techniques = {edit.technique for edit in plan.edits} & {"hessian", "sparsity"}
    criterion = (plan.statistics or {}).get("criterion", "magnitude")
    return dataclasses.replace(options, techniques=tuple(sorted(techniques)) or ("tucker",), criterion=criterion)


def _channel_rows(outcome: _Outcome, base_cost: Any) -> list[dict[str, Any]]:
    """One row per layer with weights that channel removal narrowed, and per pruned group.

    A group is named after its first producer layer: that layer's row also says how many
    of the group's channels went. Costs compare the original with the pruned model,
    before any per-layer edit (those have rows of their own).
    """
    from compressor.graph.cost import model_cost

    if not outcome.plan.channels:
        return []
    removals = {removal.group: removal for removal in outcome.plan.channels}
    after = {row.name: row for row in model_cost(outcome.working).layers}
    rows = []
    for before in base_cost.layers:
        now, removal = after.get(before.name), removals.pop(before.name, None)
        if now is None or not before.params or (removal is None and (now.params, now.flops) == (before.params, before.flops)):
            continue
        row = {"name": before.name, "technique": "channels", "params_before": before.params, "params_after": now.params,
               "flops_before": before.flops, "flops_after": now.flops}
        if removal is not None:
            row.update(_group_fields(removal))
        rows.append(row)
    return rows + [{"name": removal.group, "technique": "channels", **_group_fields(removal)} for removal in removals.values()]


def _group_fields(removal: Any) -> dict[str, Any]:
    return {"criterion": removal.criterion, "channels_before": removal.size, "channels_after": removal.size - len(removal.remove)}


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write report.json atomically."""
    import json

    from compressor.io.atomic import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def _data_loader(model: Any, options: CompressOptions, inputs: Inputs) -> Callable[[str], Optional[Dataset]]:
    """Load an option's data (by option name), checked against the model: samples of its input shape, labels among its classes.

    In-memory data of `inputs` stands in for the option's file; None when there is neither.

    Labels are checked here, right after the model loads, so that a label the model
    cannot predict stops the run before the search rather than at the timing step.
    """
    from compressor.export.writers import single_input_shape
    from compressor.io.data import check_fits, check_labels, load_data

    shape = single_input_shape(model)[1:]
    outputs = model.outputs
    classes = outputs[0].shape[-1] if len(outputs) == 1 and len(outputs[0].shape) >= 2 else None

    def load(option: str) -> Optional[Dataset]:
        data, spec = getattr(inputs, option), getattr(options, option)
        if data is None and spec is None:
            return None
        if data is None:
            data = load_data(spec, input_shape=shape)
        else:
            check_fits(data, shape)
        if classes is not None:
            check_labels(data, int(classes))
        return data

    return load


def _datasets(options: CompressOptions, load: Callable[[str], Optional[Dataset]]) -> tuple[Optional[Dataset], Optional[Dataset]]:
    data = load("data")
    if options.method == "fixed_loss" and data is not None and data.y is None:
        raise OptionError("method fixed_loss needs labels: {source} has no 'y'", source=data.source)
    test = load("test_data")
    if test is not None:
        return data, test
    if data is None:
        return None, None
    if options.method == "fixed_loss":
        return split_data(data, options.test_fraction, options.seed)
    return None, data  # data-free search: all of --data measures the result


def _search(options: CompressOptions, model: Any, budget: Any, data: Optional[Dataset], progress: Optional[Progress], techniques: tuple[str, ...]):
    from compressor.search.candidates import layer_candidates
    from compressor.search.kernels import KernelCache

    pattern = options.pattern() if "sparsity" in techniques else None
    kernels = KernelCache()  # effective kernels built for the candidates, reused by the search
    candidates, skipped = layer_candidates(model, techniques, pattern, kernels=kernels)
    if not candidates:
        reasons = "; ".join(f"{skip.layer}: {skip.reason}" for skip in skipped[:3]) or "it has no layers with weights"
        raise CompressorError(f"no layer can be compressed with --techniques {','.join(techniques)} ({reasons})")
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


def _calibration(options: CompressOptions, train_data: Optional[Dataset], search_data: Optional[Dataset],
                 held_out: Optional[Dataset]) -> tuple[Optional[np.ndarray], Optional[str]]:
    """Samples that calibrate int8 quantization: training data first, held-out data only as a last resort."""
    if options.quantize != "int8":
        return None, None  # dynamic-range and float16 need no activation ranges
    from compressor.export.quantize import calibration_set

    for data, name in ((train_data, "train"), (search_data, "search"), (held_out, "held-out")):
        if data is not None:
            return calibration_set(data.x, options.calibration_samples, seed=options.seed), name
    return None, None


def _export(options: CompressOptions, model: Any, compressed: Any, plan: Any, held_out: Optional[Dataset], out: Path,
            calibration: Optional[np.ndarray], progress: Progress, static: Any = None) -> tuple[list[dict], Optional[dict]]:
    """Write and verify the artifacts (float, then quantized), then time each format against the original's.

    With `static` (the model before gating), its float TFLite artifact is written to
    `static/` and timed in the same run as the gated one.

    Returns:
        The artifact entries, and the static TFLite artifact's measurements (or None).
    """
    from compressor.export.verify import ensure_passed, export_and_verify, verification_inputs

    x = verification_inputs(compressed, held_out, samples=64, seed=options.seed)
    sparse = any(edit.residual is not None or edit.technique == "sparsity" for edit in plan.edits)
    runtime = [fmt for fmt in options.export if fmt in RUNTIME_FORMATS]
    steps = len(options.export) + len(runtime)
    checks, baselines, extra = [], {}, {}
    for done, fmt in enumerate(options.export):
        progress("exporting artifacts", done, steps)
        checks += export_and_verify(
            compressed, out, [fmt], x, atol=options.atol, sparse_tflite=sparse,
            quantize=options.quantize if fmt in RUNTIME_FORMATS else "none", calibration=calibration,
            int8_io=options.int8_io and fmt == "tflite", allow_model_code=options.allow_model_code,
        )
    for done, fmt in enumerate(runtime, start=len(options.export)):
        progress("exporting artifacts", done, steps)
        baselines.update({check.format: check for check in export_and_verify(model, out / "baseline", [fmt], x, atol=options.atol)})
    if static is not None and "tflite" in runtime:
        extra["tflite"] = export_and_verify(static, out / "static", ["tflite"], x, atol=options.atol, sparse_tflite=sparse)[0]
    progress("exporting artifacts", steps, steps)
    ensure_passed(checks + list(baselines.values()) + list(extra.values()))
    labelled = held_out if held_out is not None and held_out.y is not None else None
    entries = [_artifact_entry(check) for check in checks]
    static_entry = None
    for done, fmt in enumerate(runtime):
        progress("timing artifacts", done, len(runtime))
        mine = [entry for entry in entries if entry["format"] == fmt]
        others = [extra[fmt].path] if fmt in extra else []
        bench = benchmark_against(baselines[fmt].path, others + [entry["path"] for entry in mine], labelled, options)
        original, *ours = bench.results
        if others:
            static_result, *ours = ours
            static_entry = {**static_result.to_dict(), "max_abs_diff": extra[fmt].max_abs_diff}
        for entry, result in zip(mine, ours):
            entry.update(
                accuracy=result.accuracy,
                baseline_accuracy=original.accuracy,
                latency_ms=result.latency_ms.to_dict(),
                baseline_latency_ms=original.latency_ms.to_dict(),
                latency_ratio=result.ratio_to_first,
                baseline_path=baselines[fmt].path,
                baseline_bytes=baselines[fmt].bytes,
            )
    if runtime:
        progress("timing artifacts", len(runtime), len(runtime))
    if labelled is not None:
        from compressor.finetune import accuracy

        for entry in entries:
            if entry["format"] == "keras":
                entry.update(accuracy=accuracy(compressed, labelled), baseline_accuracy=accuracy(model, labelled))
    return entries, static_entry


def benchmark_against(original: str, artifacts: list[str], data: Optional[Dataset], options: CompressOptions) -> Any:
    """Time the original's artifact and ours in one interleaved run (ratios stay fair on a noisy machine)."""
    from compressor.bench.benchmark import benchmark

    return benchmark([original, *artifacts], data=data, runs=options.runs, warmup=options.warmup,
                     threads=options.threads, seed=options.seed)


def _artifact_entry(check: Any) -> dict[str, Any]:
    return {
        "format": check.format,
        "quantize": check.quantize,
        "path": check.path,
        "bytes": check.bytes,
        "accuracy": None,
        "max_abs_diff": check.max_abs_diff,
        "top1_agreement": check.top1_agreement,
        "latency_ms": None,
        "baseline_latency_ms": None,
    }


FORMAT_ORDER = {"tflite": 0, "onnx": 1, "keras": 2}


def _counted_artifact(artifacts: list[dict]) -> Optional[dict]:
    """The artifact whose accuracy the budget is measured on: the one asked for.

    That is the quantized one when quantization was asked for, TFLite before ONNX before
    Keras, among those with a measured accuracy.
    """
    measured = [entry for entry in artifacts if entry.get("accuracy") is not None]
    if not measured:
        return None
    return min(measured, key=lambda e: (e.get("quantize", "none") == "none", FORMAT_ORDER[e["format"]]))


def _accuracy(artifacts: list[dict], key: str) -> Optional[float]:
    """The original's accuracy, from the artifact the budget is measured against."""
    counted = _counted_artifact(artifacts)
    return None if counted is None else counted.get(key)


def _budget_entry(budget: Any, baseline: dict, result: dict, search_achieved: Optional[float],
                  counted: Optional[dict]) -> dict[str, Any]:
    from compressor.search.budgets import achieved_drop, achieved_fraction

    if budget is None:
        return {"kind": None, "limit": None, "achieved": None, "met": None}
    if budget.kind == "accuracy_drop":
        if baseline["accuracy"] is None or result["accuracy"] is None:
            raise CompressorError("the accuracy budget needs labelled held-out data")
        achieved = achieved_drop(baseline["accuracy"], result["accuracy"])
        name = Path(counted["path"]).name
        measured_on = f"held-out data, on {name} against the original's {counted['format']} artifact"
    else:
        achieved = achieved_fraction(result[budget.kind], baseline[budget.kind])
        measured_on = f"{budget.kind} of the compressed model"
    entry = {"kind": budget.kind, "limit": budget.limit, "achieved": achieved, "met": budget.met(achieved), "measured_on": measured_on}
    if counted is not None:
        entry["artifact"] = Path(counted["path"]).name
    if search_achieved is not None:
        entry["search_achieved"] = search_achieved
    return entry


def _search_entry(outcome: _Outcome, search_data: Optional[Dataset], held_out: Optional[Dataset]) -> dict[str, Any]:
    search = outcome.search
    entry = {
        "search_samples": 0 if search_data is None else len(search_data),
        "held_out_samples": 0 if held_out is None else len(held_out),
        "evaluations": 0,
        "cached_evaluations": 0,
        "trials": [],
    }
    if outcome.channels is not None:
        entry["trials"] += [trial.to_dict() for trial in outcome.channels.trials]
    if search is not None:
        entry.update(
            evaluations=search.evaluations,
            cached_evaluations=search.cached_evaluations,
            baseline_accuracy=search.baseline_accuracy,
            accuracy=search.accuracy,
        )
        entry["trials"] += [trial.to_dict() for trial in search.trials]
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


def _notes(plan: Any, calibration_source: Optional[str]) -> list[str]:
    notes = []
    if calibration_source == "held-out":
        notes.append(
            "Quantization was calibrated on the held-out data the accuracy is measured on (no --train-data "
            "or search data was given), which flatters the quantized artifact's accuracy a little."
        )
    if any(edit.residual is not None or edit.technique == "sparsity" for edit in plan.edits):
        notes.append(
            "Sparse weights make the TFLite file smaller (stored sparsely), but TFLite runs "
            "convolutions dense: compare latency_ms, not the parameter count, for speed."
        )
    return notes
