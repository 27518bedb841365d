"""The `compressor` command: a Typer app with one module per subcommand.

Nothing here imports TensorFlow: each command imports the library it needs when it
runs, so `compressor --help` answers at once.
"""

from __future__ import annotations

import typer

from compressor import __version__
from compressor.cli import bench, compress, example, export, inspect
from compressor.cli.console import quiet_tensorflow

app = typer.Typer(
    name="compressor",
    help="Make trained Keras models smaller and faster on edge runtimes, and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Make trained Keras models smaller and faster on edge runtimes, and prove it."""


app.command("compress")(compress.compress_command)
app.command("inspect")(inspect.inspect_command)
app.command("export")(export.export_command)
app.command("bench")(bench.bench_command)
app.command("example")(example.example_command)


def main() -> None:
    """Console-script entry point."""
    quiet_tensorflow()
    app()
