"""An emulated aarch64 board, end to end: `compressor bench --remote` on arm64 Debian under qemu.

    sudo python benchmarks/board_aarch64.py [--work DIR] [--runs 100] [--max-regression 0.25]
        [--artifacts DIR --data FILE] [--suite bookworm] [--mirror URL] [--output FILE]

Run as root from a checkout with the full extra installed (`pip install -e '.[full]'`);
the network is needed only for Debian's mirror and PyPI, and only the first time:

1. An arm64 Debian root folder (`debootstrap --variant=minbase`, python3 + venv), built
   once in WORK/arm64-root. Its programs run under qemu's user-mode emulation through
   binfmt_misc (Debian's qemu-user-static registers qemu-aarch64 with the F flag, so
   `chroot ROOT` runs arm64 binaries without copying qemu into the root; the script
   mounts binfmt_misc and enables the handler when they are not yet).
2. The runtime side of `compressor bench --remote` in a venv in that root (/opt/bench):
   numpy, ai-edge-litert and onnxruntime at the versions installed here, as aarch64
   wheels that pip on this machine downloads from PyPI (`pip download --platform
   manylinux_2_<glibc>_aarch64 --only-binary=:all:`) and the root's own pip installs
   offline. Nothing of compressor is installed there.
3. The artifacts: the digits-resnet20 example (`compressor example digits-resnet20`) and a
   quick compression of it to a quarter of its FLOPs (`compress --method fixed_params
   --compression-factor 0.25 --budget-on flops --techniques channels --finetune-epochs 1`,
   about 2 min; the README's quick start removes channels too, but searches under an
   accuracy budget with more fine-tuning: 10-15 min). Timed: the
   original's TFLite, the compressed TFLite and the compressed ONNX, copied to
   WORK/artifacts/ under distinct names. --artifacts DIR takes a `compress` output folder
   instead (e.g. the quick start's example/compressed, with --data example/test.npz).
4. `compressor bench` on them here (x86_64), then on the board through
   `--remote "unshare ... chroot ROOT env -i ..."` (a fresh /proc for the memory
   measurement, a clean environment like a login): top-1 accuracy on the same data must
   be equal on both machines for every artifact, and the report's host must be aarch64.
5. The latency gate on the board: a second run with the first as --baseline must pass
   (exit 0); a run where compressed.tflite is swapped for the original model (a build
   that lost its compression) must fail with exit 3.

Everything (the root, the wheels, the example, the reports) stays in WORK (default
benchmarks/work/board_aarch64, ignored by git); reruns reuse it. The result is written as
Markdown to --output (default benchmarks/board_aarch64.md). Exit 0 when every check held,
1 when one failed. Timings under emulation say nothing about a real board.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("numpy", "ai-edge-litert", "onnxruntime")
VENV = "/opt/bench"
WHEELS_IN_ROOT = "/opt/wheels"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
EXIT_REGRESSION = 3
READY = ".board-ready.json"
# A quarter of the FLOPs by removing channels, one fine-tuning epoch: about 2 minutes here.
QUICK_COMPRESS = ("--method fixed_params --compression-factor 0.25 --budget-on flops --techniques channels "
                  "--finetune-epochs 1 --train-data {train} --data {val}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}

    with timed(steps, "tools (apt-get, binfmt_misc)"):
        ensure_tools()
        enable_binfmt()
    root = work / "arm64-root"
    with timed(steps, "arm64 root (debootstrap)"):
        built_root = ensure_root(root, args.suite, args.mirror)
    with timed(steps, "runtimes into the root (pip)"):
        board = ensure_runtimes(root, work / "wheels")
    with timed(steps, "artifacts (example + compress)"):
        artifacts, data, made_with = ensure_artifacts(work, args.artifacts, args.data)

    prefix = board_prefix(root)
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    common = [*map(str, artifacts), "--data", str(data), "--runs", str(args.runs), "--threads", "1"]
    remote = ["--remote", prefix, "--remote-python", f"{VENV}/bin/python"]

    with timed(steps, "bench here (x86_64)"):
        here = bench(common + ["--output", str(runs / "x86.json")])
    with timed(steps, "bench on the board, run 1"):
        first = bench(common + remote + ["--output", str(runs / "board-1.json")])
    with timed(steps, "bench on the board, run 2 (--baseline run 1)"):
        second = bench(common + remote + ["--baseline", str(runs / "board-1.json"),
                                          "--max-regression", str(args.max_regression),
                                          "--output", str(runs / "board-2.json")])
    regressed = swapped_artifacts(work, artifacts)
    with timed(steps, "bench on the board, run 3 (a slower compressed.tflite)"):
        third = bench([*map(str, regressed), *common[len(artifacts):]] + remote
                      + ["--baseline", str(runs / "board-1.json"), "--max-regression", str(args.max_regression)])

    checks = run_checks(here, first, second, third)
    wall = time.perf_counter() - started
    text = render(args, prefix, board, built_root, made_with, here, first, second, third, checks, steps, wall)
    write_atomic(args.output, text)
    print(text)
    failed = [name for name, ok, _ in checks if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all checks held; wrote {args.output} ({wall:.0f} s)", file=sys.stderr)
    return 0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "board_aarch64",
                        help="Folder for the root, the wheels, the artifacts and the reports (kept between runs).")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "board_aarch64.md")
    parser.add_argument("--runs", type=int, default=100, help="Timed calls per artifact and run.")
    parser.add_argument("--max-regression", type=float, default=0.25,
                        help="The gate's threshold for runs 2 and 3 (emulated timings jitter more than real ones).")
    parser.add_argument("--artifacts", type=Path, help="A compress output folder to time instead of a quick compression.")
    parser.add_argument("--data", type=Path, help="Labelled .npz for accuracy (with --artifacts).")
    parser.add_argument("--suite", default="bookworm", help="Debian suite of the root (bookworm: Python 3.11).")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    args = parser.parse_args(argv)
    if (args.artifacts is None) != (args.data is None):
        parser.error("--artifacts and --data go together")
    if args.runs < 1 or args.max_regression < 0:
        parser.error("--runs must be >= 1 and --max-regression >= 0")
    return args


class timed:
    """Record a step's wall time under its name."""

    def __init__(self, steps: dict[str, float], name: str) -> None:
        self.steps, self.name = steps, name

    def __enter__(self) -> None:
        print(f"== {self.name}", file=sys.stderr, flush=True)
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.steps[self.name] = time.perf_counter() - self.start


def run(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(list(command), check=kwargs.pop("check", True), text=True, **kwargs)


def ensure_tools() -> None:
    """debootstrap and qemu-user-static from Debian's packages, when missing."""
    if shutil.which("debootstrap") and shutil.which("qemu-aarch64-static"):
        return
    if os.geteuid() != 0:
        sys.exit("error: needs root (debootstrap, chroot, apt-get); run it with sudo")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "debootstrap", "qemu-user-static", "binfmt-support"], env=env)


def enable_binfmt() -> None:
    """Let the kernel hand arm64 binaries to qemu-aarch64-static (binfmt_misc, F flag)."""
    if os.geteuid() != 0:
        sys.exit("error: needs root (debootstrap, chroot, binfmt_misc); run it with sudo")
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists() and shutil.which("update-binfmts"):
        run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not handler.exists():
        sys.exit("error: binfmt_misc has no qemu-aarch64 handler; install qemu-user-static and binfmt-support")
    flags = handler.read_text().split("flags:")[-1].split()[0] if "flags:" in handler.read_text() else ""
    if "F" not in flags:
        sys.exit(f"error: the qemu-aarch64 binfmt handler lacks the F flag ({flags!r}); chroot would not find qemu")


def in_root(root: Path, *command: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command inside the arm64 root (emulated), with a clean environment."""
    return run(["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/root", "LC_ALL=C.UTF-8", *command], **kwargs)


def ensure_root(root: Path, suite: str, mirror: str) -> bool:
    """The arm64 Debian root, built once; True when built now."""
    if (root / "usr/bin/python3").exists() and (root / "etc/debian_version").exists():
        check_machine(root)
        return False
    if root.exists():
        print(f"removing an unfinished root: {root}", file=sys.stderr)
        shutil.rmtree(root)
    run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv",
         suite, str(root), mirror])
    check_machine(root)
    return True


def check_machine(root: Path) -> None:
    machine = in_root(root, "uname", "-m", capture_output=True).stdout.strip()
    if machine != "aarch64":
        sys.exit(f"error: programs in {root} run as {machine!r}, not aarch64")


def ensure_runtimes(root: Path, wheels: Path) -> dict[str, Any]:
    """numpy, ai-edge-litert, onnxruntime in the root's venv, at the versions installed here."""
    wanted = {name: importlib.metadata.version(name) for name in RUNTIMES}
    ready = root / VENV.lstrip("/") / READY
    if ready.exists():
        board = json.loads(ready.read_text())
        if board.get("requested") == wanted:
            return board
    probe = in_root(root, "python3", "-c",
                    "import platform, sys; print(sys.version_info[0], sys.version_info[1], platform.libc_ver()[1])",
                    capture_output=True).stdout.split()
    major, minor, glibc = probe
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels), "--only-binary=:all:",
         *(f"--platform={tag}" for tag in manylinux_platforms(glibc)), "--python-version", f"{major}.{minor}",
         "--implementation", "cp", *pins])
    target = root / WHEELS_IN_ROOT.lstrip("/")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(wheels, target)
    in_root(root, "python3", "-m", "venv", VENV)
    in_root(root, f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links", WHEELS_IN_ROOT, *pins)
    report = in_root(root, f"{VENV}/bin/python", "-c", (
        "import importlib.metadata as m, json, platform, sys\n"
        "import numpy, onnxruntime\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        f"print(json.dumps({{'python': platform.python_version(), 'machine': platform.machine(), "
        f"'glibc': platform.libc_ver()[1], 'installed': {{n: m.version(n) for n in {list(RUNTIMES)!r}}}}}))"
    ), capture_output=True).stdout
    board = {**json.loads(report), "requested": wanted,
             "debian": (root / "etc/debian_version").read_text().strip()}
    ready.write_text(json.dumps(board, indent=1))
    return board


def manylinux_platforms(glibc: str, arch: str = "aarch64") -> list[str]:
    """Every manylinux platform tag a glibc runs, for `pip download --platform`.

    pip before 24 takes `--platform manylinux_2_36_aarch64` literally, so a wheel tagged
    manylinux_2_28 would not match: name each one from 2_17 (manylinux2014) up.
    """
    major, minor = (int(part) for part in glibc.split(".")[:2])
    if major != 2 or minor < 17:
        raise ValueError(f"glibc {glibc} is older than manylinux2014 (2.17)")
    return [f"manylinux2014_{arch}", *(f"manylinux_2_{m}_{arch}" for m in range(17, minor + 1))]


def ensure_artifacts(work: Path, folder: Optional[Path], data: Optional[Path]) -> tuple[list[Path], Path, str]:
    """The artifacts to time (original TFLite, compressed TFLite, compressed ONNX), the data, and how they were made."""
    if folder is None:
        example = work / "example"
        if not (example / "model.keras").exists():
            compressor(["example", "digits-resnet20", "--out", str(example)])
        folder = work / "compressed"
        if not (folder / "model.tflite").exists():
            words = [{"T": str(example / "train.npz"), "V": str(example / "val.npz")}.get(word, word)
                     for word in QUICK_COMPRESS.format(train="T", val="V").split()]
            compressor(["compress", str(example / "model.keras"), *words, "--out", str(folder), "--overwrite"])
        data = example / "test.npz"
        made_with = ("`compressor example digits-resnet20`, then `compress model.keras "
                     + QUICK_COMPRESS.format(train="train.npz", val="val.npz") + "`")
    else:
        made_with = f"the `compress` output folder given with --artifacts ({folder.name})"
    sources = {"original.tflite": folder / "baseline" / "model.tflite",
               "compressed.tflite": folder / "model.tflite",
               "compressed.onnx": folder / "model.onnx"}
    target = work / "artifacts"
    target.mkdir(exist_ok=True)
    for name, source in sources.items():
        if not source.is_file():
            sys.exit(f"error: {source} not found (expected a compress output folder)")
        shutil.copyfile(source, target / name)
    return [target / name for name in sources], Path(data).resolve(), made_with


def swapped_artifacts(work: Path, artifacts: Sequence[Path]) -> list[Path]:
    """The same file names, but compressed.tflite is the original model: a build that lost its compression."""
    folder = work / "regressed"
    folder.mkdir(exist_ok=True)
    for path in artifacts:
        shutil.copyfile(path, folder / path.name)
    shutil.copyfile(artifacts[0], folder / "compressed.tflite")
    return [folder / path.name for path in artifacts]


def compressor(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TMPDIR", None)  # the board's side makes its folder in ${TMPDIR:-/tmp}: this machine's TMPDIR is not there
    return run([sys.executable, "-m", "compressor", *args], env=env, **kwargs)


def bench(args: Sequence[str]) -> dict[str, Any]:
    """`compressor bench ... --json`: its exit code, the JSON report, and the error line if any."""
    done = compressor(["bench", *args, "--json"], check=False, capture_output=True)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    if report is None:
        sys.stderr.write(done.stderr)
    return {"exit": done.returncode, "report": report, "stderr": errors[-1] if errors else "",
            "command": "compressor bench " + shlex.join(args)}


def board_prefix(root: Path) -> str:
    """The --remote prefix: a fresh /proc in a mount namespace of its own, chroot, a clean environment."""
    return (f"unshare --mount --pid --fork --kill-child --mount-proc={shlex.quote(str(root / 'proc'))} "
            f"chroot {shlex.quote(str(root))} /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8")


def run_checks(here: dict, first: dict, second: dict, third: dict) -> list[tuple[str, bool, str]]:
    """(check, held, detail) for every claim the Markdown makes."""
    checks = []
    for name, result in (("bench here", here), ("board run 1", first), ("board run 2", second)):
        checks.append((f"{name} exits 0", result["exit"] == 0 and result["report"] is not None,
                       f"exit {result['exit']} {result['stderr']}".strip()))
    if here["report"] is None or first["report"] is None:
        return checks
    host = first["report"].get("host", {})
    checks.append(("the report names the host as aarch64", host.get("machine") == "aarch64",
                   f"host: {host}"))
    for a, b in zip(here["report"]["results"], first["report"]["results"]):
        name = Path(a["path"]).name
        samples = first["report"]["samples"]
        checks.append((f"{name}: same top-1 on aarch64 as on x86_64",
                       a["accuracy"] is not None and a["accuracy"] == b["accuracy"],
                       f"{hits(a['accuracy'], samples)} vs {hits(b['accuracy'], samples)} right"))
    gate2 = (second["report"] or {}).get("gate") or {}
    checks.append(("run 2 against run 1: gate passes (exit 0)", second["exit"] == 0 and gate2.get("passed") is True,
                   f"exit {second['exit']}"))
    gate3 = (third["report"] or {}).get("gate") or {}
    slow = [Path(name).name for name in gate3.get("regressions", [])]
    checks.append(("compressed.tflite swapped for the original: gate fails (exit 3)",
                   third["exit"] == EXIT_REGRESSION and slow == ["compressed.tflite"],
                   f"exit {third['exit']}, regressions {slow}"))
    return checks


def hits(accuracy: Optional[float], samples: int) -> str:
    """'346/360' from an accuracy over `samples`."""
    return "-" if accuracy is None else f"{round(accuracy * samples)}/{samples}"


def render(args, prefix, board, built_root, made_with, here, first, second, third, checks, steps, wall) -> str:
    def ms(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3g}"

    def mb(value: Optional[int]) -> str:
        return "-" if value is None else f"{value / 2**20:.1f}"

    def acc(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2%}"

    commit = git("rev-parse", "--short", "HEAD")
    qemu = run(["qemu-aarch64-static", "--version"], capture_output=True).stdout.splitlines()[0]
    date = datetime.date.today().isoformat()
    samples = first["report"]["samples"] if first["report"] else "?"
    lines = [
        "# EMULATED aarch64 board: `compressor bench --remote` on arm64 Debian under qemu",
        "",
        "**Emulated, not a real board.** Every arm64 instruction below ran under qemu's user-mode",
        "emulation on an x86_64 machine: the latencies, load times and memory of the board columns say",
        "nothing about a Raspberry Pi or any other real board (qemu translates each instruction, and its",
        "own memory counts in the resident set). What is real: the arm64 root and its Python, the",
        "install of the aarch64 wheels from PyPI, both runtimes executing aarch64 code, `--remote`",
        "through a command prefix, accuracy on aarch64 and its parity with x86_64, and the gate's",
        "decisions and exit codes.",
        "",
        "```",
        "python benchmarks/board_aarch64.py   # as root" + ("" if args.runs == 100 else f" --runs {args.runs}")
        + ("" if args.max_regression == 0.25 else f" --max-regression {args.max_regression:g}"),
        "```",
        "",
        f"Run {date} on compressor at {commit}; x86_64 host: {platform.node()}, {os.cpu_count()} cores, "
        f"other jobs running beside it. Wall time {wall:.0f} s"
        + (" (the arm64 root built in this run)." if built_root else " (the arm64 root cached from an earlier run)."),
        "",
        "## The board",
        "",
        f"- Debian {board['debian']} arm64 (`debootstrap --variant=minbase --include=python3,python3-venv "
        f"{args.suite}`), run through binfmt_misc with {qemu}.",
        f"- Python {board['python']} (platform.machine() = {board['machine']}, glibc {board['glibc']}), "
        f"venv {VENV} with "
        + ", ".join(f"{name} {version}" for name, version in board["installed"].items())
        + " (aarch64 wheels from PyPI, the versions installed on the x86_64 side).",
        f"- Reached with `--remote \"{prefix.replace(str(args.work.resolve()), 'WORK')}\" "
        f"--remote-python {VENV}/bin/python` (WORK: the script's --work folder): a mount namespace with its "
        "own /proc (peak memory reads /proc/self/status), chroot, and a clean environment as after a login.",
        f"- Artifacts: {made_with}. Timed: the original's TFLite, the compressed TFLite and ONNX, "
        f"batch 1, 1 thread, {args.runs} timed runs after 10 warm-up runs, interleaved; accuracy is top-1 on "
        f"test.npz ({samples} samples) on each machine.",
        "",
        "## Accuracy parity and statistics",
        "",
        "| artifact | bytes | top-1 x86_64 | top-1 aarch64 | equal | median ms x86_64 | median ms aarch64 (emulated) "
        "| init ms aarch64 | first call ms aarch64 | std ms aarch64 | peak MB aarch64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if here["report"] and first["report"]:
        for a, b in zip(here["report"]["results"], first["report"]["results"]):
            lat = b["latency_ms"]
            lines.append(
                f"| {Path(a['path']).name} | {a['bytes']:,} | {acc(a['accuracy'])} | {acc(b['accuracy'])} "
                f"| {'yes' if a['accuracy'] == b['accuracy'] else 'NO'} | {ms(a['latency_ms']['median'])} "
                f"| {ms(lat['median'])} | {ms(b.get('init_ms'))} | {ms(b.get('first_inference_ms'))} "
                f"| {ms(lat.get('std'))} | {mb(b.get('peak_memory_bytes'))} |")
        lines += ["", f"Host in the board's report: `{json.dumps(first['report'].get('host'))}`; "
                      f"here: {platform.machine()}."]
    lines += ["", "## Latency gate on the board", "",
              f"Each run against run 1 (`--baseline board-1.json --max-regression {args.max_regression:g}`; "
              "emulated timings jitter more than real ones, hence a wider threshold than the default 0.10). "
              "Run 3 times a build where compressed.tflite is the original model, as if the compression "
              "step had been lost.", "",
              "| run | artifact | baseline median ms | median ms | change | verdict |", "|---|---|---|---|---|---|"]
    for label, result in (("2: same artifacts", second), ("3: compressed.tflite = original", third)):
        gate = (result["report"] or {}).get("gate") or {}
        for row in gate.get("compared", []):
            lines.append(f"| {label} | {Path(row['name']).name} | {ms(row['baseline_ms'])} | {ms(row['ms'])} "
                         f"| {row['change']:+.1%} | {'REGRESSED' if row['regressed'] else 'ok'} |")
        verdict = "passed" if gate.get("passed") else "failed: " + result["stderr"].replace("|", "/")
        lines.append(f"| {label} | **exit {result['exit']}** | | | | {verdict} |")
    lines += ["", "## Checks", "", "| check | held | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {detail.replace('|', '/')} |" for name, ok, detail in checks]
    lines += ["", "## Wall time per step", "", "| step | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in steps.items()]
    # The work folder is this machine's: name it as the command line does.
    return "\n".join(lines).replace(str(args.work.resolve()), "WORK") + "\n"


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:  # its own output is above
        sys.exit(f"error: {shlex.join(map(str, exc.cmd))[:300]} failed with exit status {exc.returncode}")
