"""Cost of a data-free search (fixed_params) at real model sizes, and where a run's time goes.

    python benchmarks/search_speed.py [--models ResNet50,MobileNetV2] [--size 224] [--before]

Each model is a Keras application built offline with random weights (weights=None,
seeded; nothing is downloaded) and saved as .keras. Per model:

1. `compress --method fixed_params --compression-factor 0.5` (default techniques and
   export formats), cache folder empty: report.json's timings_s (search, the layers
   stage, export split into writing, verification and timing, total) and params kept.
2. The same with `--compression-factor 0.4`, the cache folder kept (TFLite only, 5
   timed runs: only its search time is reported): the kernel-error curves are read
   back, nothing is factorized.
3. With `--before`: the candidates priced the way the search did before it factorized
   each layer once, by building every option (a Tucker-2 HOOI or an SVD per rank) and
   composing its kernel, then the same allocation; the table says whether that gives
   the same plan, and the kernel error of both plans as built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_model(name: str, size: int, folder: Path) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    path = folder / f"{name.lower()}.keras"
    model.save(path)
    return path


def compress_run(model: Path, out: Path, cache: Path, factor: float, **extra) -> dict:
    from compressor.config import CompressOptions
    from compressor.pipeline import compress

    options = CompressOptions(model=model, out=out, method="fixed_params", compression_factor=factor,
                              cache_dir=cache, **extra)
    return compress(options)


def before_search(path: Path, factor: float) -> dict:
    """The search as it priced options before: every option built (HOOI / SVD per rank), then allocated."""
    import keras

    from compressor.search.budgets import Budget
    from compressor.search.candidates import layer_candidates
    from compressor.search.fixed_params import search_fixed_params
    from compressor.search.kernels import KernelCache
    from compressor.techniques.lowrank import SVD, Tucker
    from compressor.techniques.registry import Registry

    class BuiltTucker(Tucker):
        def kernel_errors(self, layer, edits):
            return [None] * len(edits)

    class BuiltSVD(SVD):
        def kernel_errors(self, layer, edits):
            return [None] * len(edits)

    model = keras.saving.load_model(path, compile=False)
    registry = Registry().with_techniques(BuiltTucker(), BuiltSVD())
    started = time.perf_counter()
    kernels = KernelCache(registry=registry)
    candidates, skipped = layer_candidates(model, ["tucker"], kernels=kernels, registry=registry)
    result = search_fixed_params(model, candidates, Budget("params", factor), skipped=skipped)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "edits": {e.layer: e.to_dict() for e in result.plan.edits},
            "built_errors": {c.name: {json.dumps(o.edit.to_dict()): o.error for o in c.options} for c in candidates}}


def plan_edits(out: Path) -> dict:
    plan = json.loads((out / "plan.json").read_text())
    return {edit["layer"]: edit for edit in plan["edits"]}


def penalty(edits: dict, built_errors: dict) -> float:
    """Σ error² of a plan's edits, each at the error of the edit as built."""
    return sum(built_errors[layer][json.dumps(edit)] ** 2 for layer, edit in edits.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ResNet50,MobileNetV2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--before", action="store_true", help="also time the search as it priced options before")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            path = build_model(name, args.size, folder)
            cache = folder / f"cache-{name}"
            cold = compress_run(path, folder / f"{name}-cold", cache, 0.5)
            warm = compress_run(path, folder / f"{name}-warm", cache, 0.4, export=("tflite",), runs=5, warmup=1)
            t = cold["timings_s"]
            kept = cold["compressed"]["params"] / cold["baseline"]["params"]
            row = {"model": name, "before": None, "same": None, "search": t["search"], "layers": t["layers"],
                   "warm": warm["timings_s"]["search"], "writing": t["writing"], "verification": t["verification"],
                   "timing": t["timing"], "export": t["export"], "total": t["total"], "kept": kept}
            if args.before:
                before = before_search(path, 0.5)
                after = plan_edits(folder / f"{name}-cold")
                row["before"] = before["seconds"]
                row["same"] = "yes" if after == before["edits"] else (
                    f"no: Σe² {penalty(after, before['built_errors']):.3f} vs {penalty(before['edits'], before['built_errors']):.3f}")
            rows.append(row)
    print_table(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    def s(value):
        return "-" if value is None else f"{value:.1f}"

    print("# Data-free search cost at real model sizes\n")
    print(f"Command: `python benchmarks/search_speed.py --models {args.models} --size {args.size}"
          f"{' --before' if args.before else ''}` (weights=None, seeded; nothing downloaded).\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"input {args.size}×{args.size}×3; `compress --method fixed_params --compression-factor 0.5`, "
          "default techniques (tucker) and export formats (tflite, onnx, keras).\n")
    print("| model | search s before | search s | of it layers | search s, cached curves (factor 0.4) "
          "| writing s | verification s | timing s | export s | total s | params kept | plan as before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {s(r['before'])} | {s(r['search'])} | {s(r['layers'])} | {s(r['warm'])} | "
              f"{s(r['writing'])} | {s(r['verification'])} | {s(r['timing'])} | {s(r['export'])} | {s(r['total'])} | "
              f"{r['kept']:.3f} | {r['same'] or '-'} |")


if __name__ == "__main__":
    main()
