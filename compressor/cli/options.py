"""Option and argument aliases shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
