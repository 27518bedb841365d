"""Dynamic inference on real data: static only, + blocks, + gates, + early exits, at 2 points; one table.

    python benchmarks/dynamic.py [--work DIR] [--examples fashion-resnet20] [--seeds 1]
        [--configs static,blocks,gates,exits] [--compress-args "..."] > benchmarks/dynamic.md

Needs Debian's dataset-fashion-mnist (or `--source DIR`), as `benchmarks/fashion.py`,
whose example training and compress runs this reuses: a run already done in the work
folder (its report.json) is read back, so the static and blocks runs of a fashion.py work
folder can be linked in (`runs/NAME-CONFIG-sSEED`). Each configuration is one `compress`
run per seed at `--max-acc-loss 0.02` with the same arguments but `--techniques`:

- static: `channels`
- blocks: `blocks,channels`
- gates: `channels,gating` (`--export tflite,keras`: ONNX quantization cannot reach `If` branches)
- exits: `channels,early-exit` (`--export tflite,keras`, likewise)

Per run: the held-out drop of the file the budget counts, FLOPs kept (the static part),
FLOPs per input on average (what dynamic inference runs), the TFLite speed-ups over the
original (float and int8, interleaved in the same run), and for gates and exits the
dynamic TFLite file's mean latency per input over the static model's, timed in the same
run over the held-out inputs (`gating.tflite` / `early_exit.tflite`), or why the stage
was not applied.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).parent))
from fashion import compress, ensure_example  # noqa: E402  (the benchmark next door)

COMMON = "--finetune-epochs 1 --finetune-steps 500 --finetune-lr 0.003 --runs 100 --warmup 10 --time-limit 17 --quantize int8"
CONFIGS = {
    "static": "--techniques channels",
    "blocks": "--techniques blocks,channels",
    "gates": "--techniques channels,gating --export tflite,keras",
    "exits": "--techniques channels,early-exit --export tflite,keras",
}


def row(name: str, report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the table shows of one run."""

    def artifact(quantize: str) -> dict[str, Any]:
        return next((a for a in report["artifacts"] if a["format"] == "tflite" and a["quantize"] == quantize), {})

    def faster(quantize: str) -> Optional[float]:
        entry = artifact(quantize)
        if applied:  # time per input depends on the input: the original's mean over ours
            ours, theirs = (entry.get(key, {}).get("mean") for key in ("latency_ms", "baseline_latency_ms"))
            return theirs / ours if ours and theirs else None
        ratio = entry.get("latency_ratio")
        return 1 / ratio if ratio else None

    dynamic = report.get("early_exit") or report.get("gating")
    applied = bool(dynamic and dynamic.get("applied"))
    compressed, baseline = report["compressed"], report["baseline"]
    entry = {"config": name, "drop": report["budget"]["achieved"], "met": report["budget"]["met"],
             "ci": report["budget"].get("ci"), "flops": compressed["flops"] / baseline["flops"],
             "expected": compressed.get("expected_flops", compressed["flops"]) / baseline["flops"],
             "float": faster("none"), "int8": faster("int8"), "wall_s": wall_s, "dynamic": None, "note": ""}
    if dynamic is not None:
        if dynamic.get("applied"):
            tflite = dynamic.get("tflite") or {}
            entry["dynamic"] = tflite.get("mean_latency_ratio")
            entry["static_ms"] = (tflite.get("static_latency_ms") or {}).get("mean")
            entry["dynamic_ms"] = (tflite.get("latency_ms") or {}).get("mean")
            if "exits" in dynamic:
                entry["note"] = ", ".join(f"{e['rate']:.0%} leave after {e['point']} ({fmt(e['accuracy'], '.1%')} right)"
                                          for e in dynamic["exits"])
            elif "blocks" in dynamic:
                entry["note"] = ", ".join(f"{b['name']} skipped for {b['skip_rate']:.0%}" for b in dynamic["blocks"])
        else:
            entry["note"] = f"not applied: {dynamic.get('reason')}"
    if report.get("blocks"):
        entry["note"] = f"{len(report['blocks']['removed'])} blocks removed" + (f"; {entry['note']}" if entry["note"] else "")
    return entry


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, spec)}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/dynamic"))
    parser.add_argument("--examples", default="fashion-resnet20")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--source", default=None, help="folder of the four Fashion-MNIST idx files")
    parser.add_argument("--compress-args", default=COMMON)
    args = parser.parse_args()
    rows = []
    for example in args.examples.split(","):
        folder, build = ensure_example(example, args.work, args.source)
        for config in args.configs.split(","):
            for seed in range(args.seeds):
                out = args.work / "runs" / f"{example}-{config}-s{seed}"
                run = compress(folder, 0.02, seed, out, f"{args.compress_args} {CONFIGS[config]}")
                rows.append((example, seed, row(config, run["report"], run["wall_s"])))
                print(f"{example} {config} seed {seed}: done", file=sys.stderr)
    print("# Dynamic inference on real data: Fashion-MNIST at 2 points\n")
    print(f"Command: `python benchmarks/dynamic.py --examples {args.examples} --configs {args.configs} --seeds {args.seeds}` "
          f"(compress arguments: `{args.compress_args}`, plus each configuration's `--techniques`).\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. Every accuracy "
          "figure is the int8 TFLite file's (the one the budget counts) on the official 10,000-image test set. "
          "Speed-ups are the original's median latency over ours (batch 1, one thread, interleaved in the same run; "
          "for a run whose exits or gates were kept, the original's mean over ours: timed calls cycle through the "
          "held-out inputs, and such a file's time depends on the input). "
          "`dynamic / static` is the dynamic float TFLite file's mean latency per input over the static model's "
          "(`static/model.tflite`), timed interleaved in the same run, each timed call on the next held-out input.\n")
    print("| example | seed | configuration | held-out drop (pts, 90% CI) | FLOPs kept | FLOPs per input | "
          "float TFLite speed-up | int8 TFLite speed-up | dynamic / static (mean ms) | compress (min) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for example, seed, r in rows:
        ci = f" ({100 * r['ci'][0]:.2f}–{100 * r['ci'][1]:.2f})" if r["ci"] else ""
        dynamic = "–" if r["dynamic"] is None else f"{r['dynamic']:.2f} ({r['dynamic_ms']:.3f} / {r['static_ms']:.3f})"
        print(f"| {example} | {seed} | {r['config']} | {100 * r['drop']:.2f}{ci}{'' if r['met'] else ' missed'} | "
              f"{r['flops']:.3f} | {r['expected']:.3f} | {fmt(r['float'], '.2f', '×')} | {fmt(r['int8'], '.2f', '×')} | "
              f"{dynamic} | {r['wall_s'] / 60:.1f} |")
    print()
    for example, seed, r in rows:
        if r["note"]:
            print(f"- {example}, seed {seed}, {r['config']}: {r['note']}.")


if __name__ == "__main__":
    main()
