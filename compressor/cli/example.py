"""`compressor example`: train a small built-in model and write it with its data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Mapping, Optional

import typer
from rich.table import Table

from compressor.cli.console import (
    err_console,
    handle_errors,
    human_bytes,
    load_tensorflow,
    print_json,
    stdout_to_stderr,
)
from compressor.cli.options import JsonOpt, OutDirOpt
from compressor.io.atomic import ensure_dir
from compressor.models.examples import EXAMPLES, ExampleResult, build_example, check_example

NameArg = Annotated[
    str,
    typer.Argument(
        help=f"Example to build, one of: {', '.join(EXAMPLES)}.", show_default=False
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data and the training.")]
EpochsOpt = Annotated[
    Optional[int],
    typer.Option("--epochs", min=1, help="Epochs to train (default: the example's own)."),
]
LimitOpt = Annotated[
    Optional[int],
    typer.Option("--limit", min=1, help="Train on at most this many samples (quick smoke runs)."),
]
SourceOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--source",
        help="Folder of the four Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) for the "
        "fashion-* examples (default: where Debian's dataset-fashion-mnist installs them).",
        show_default=False,
    ),
]


@handle_errors
def example_command(
    name: NameArg,
    out: OutDirOpt,
    seed: SeedOpt = 0,
    epochs: EpochsOpt = None,
    limit: LimitOpt = None,
    source: SourceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a built-in example model offline and write model.keras plus train/val/test .npz.

    The data is made locally or read from files already on the machine (no download), and
    the same --seed gives the same files.
    """
    spec = check_example(name, source)  # fail on a bad name, data or folder before importing TensorFlow
    ensure_dir(out)
    load_tensorflow()
    if json_out:
        with stdout_to_stderr():
            result = _build(name, out, seed, epochs, limit, source, quiet=True)
        print_json(result.to_dict())
        return
    err_console.print(f"Building [bold]{spec.name}[/]: {spec.description}")
    started = time.perf_counter()
    result = _build(name, out, seed, epochs, limit, source, quiet=False)
    _print_summary(result, time.perf_counter() - started)


# `--help` lists each example with its description under the command's own text.
_CHOICES = "\n\n".join(f"[bold]{spec.name}[/]: {spec.description}" for spec in EXAMPLES.values())
example_command.__doc__ = f"{example_command.__doc__}\n\nBuilt-in examples:\n\n{_CHOICES}"


def _build(
    name: str, out: Path, seed: int, epochs: Optional[int], limit: Optional[int], source: Optional[Path], quiet: bool
) -> ExampleResult:
    if quiet:
        return build_example(name, out, seed=seed, epochs=epochs, limit=limit, source=source)
    with err_console.status("starting TensorFlow") as status:
        return build_example(
            name, out, seed=seed, epochs=epochs, limit=limit, source=source,
            on_stage=lambda stage: status.update(stage),
            on_epoch=_print_epoch,
        )


def _print_epoch(epoch: int, epochs: int, metrics: Mapping[str, float]) -> None:
    parts = [f"epoch {epoch:>{len(str(epochs))}}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    err_console.print("  ".join(parts), highlight=False)


def _print_summary(result: ExampleResult, seconds: float) -> None:
    table = Table(title=f"{result.name} written to {result.out_dir}", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("samples", justify="right")
    for key, path in result.files.items():
        samples = str(result.samples[key]) if key in result.samples else ""
        table.add_row(path, human_bytes(result.bytes[key]), samples)
    err_console.print(table)
    err_console.print(
        f"{result.architecture}: {result.params:,} parameters, {result.epochs} epochs, "
        f"test accuracy [bold]{result.test_accuracy:.2%}[/] "
        f"(val {result.val_accuracy:.2%}); trained in {result.train_seconds:.0f} s, "
        f"{seconds:.0f} s in all"
    )
    err_console.print(f"Next: [bold]compressor inspect {result.files['model']}[/]", soft_wrap=True)

