"""Option and argument aliases shared by the commands, and the flags generated from declared options."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Trained model: .keras, .h5 (Keras 3 or tf_keras), or a tf_keras SavedModel folder.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        help="Data: an .npz with arrays x and y, a folder of images with one subfolder "
        "per class, or a Python hook pkg.module:function returning (x, y) or a tf.data.Dataset.",
    ),
]
CustomObjectsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--custom-objects",
        help="Python module to import first, which registers custom layers "
        "(@keras.saving.register_keras_serializable). Repeatable.",
    ),
]
AllowModelCodeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-model-code",
        help="Run Python code stored in the model file (e.g. Lambda layers); only for models you trust.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output folder (created if missing).")
]


def option_parameters(options: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per command-line option declared on `options` (a dataclass), in field order.

    Each is typed and helped as its declaration says (`compressor.option_fields`), and
    defaults to None, "not given", so that a config file's value can stand in for it.
    """
    from compressor.errors import flag_name
    from compressor.option_fields import declared, help_text

    parameters = []
    for item in declared(options, "cli"):
        if item.name in skip:
            continue
        flags = item.spec.flags or (flag_name(item.name),)
        info = typer.Option(*flags, help=help_text(item.spec, flag_name), show_default=False)
        kind = item.spec.cli_type or _flag_type(item.name, item.annotation)
        parameters.append(
            inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], info])
        )
    return parameters


def _flag_type(name: str, annotation: Any) -> type:
    """The type a flag carries: the field's, without Optional (str, int, float, bool, Path)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    kind = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    if kind not in (str, int, float, bool, Path):
        raise TypeError(f"option {name} of type {annotation} needs a cli_type in its declaration")
    return kind


def with_signature(parameters: list[inspect.Parameter]) -> Callable[[F], F]:
    """Give a command the parameters Typer reads (a signature built from declarations)."""

    def decorate(command: F) -> F:
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return command

    return decorate
