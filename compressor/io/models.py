"""Load trained Keras models from the formats users have, and save them atomically.

Accepted: Keras 3 `.keras`, `.h5` written by Keras 3 or by legacy tf_keras, and a
SavedModel folder written by tf_keras (`model.save(dir, save_format="tf")`), which is
loaded with tf_keras and bridged to Keras 3 through a temporary `.h5` file.
Only graph models (Sequential, Functional) can be analysed and rewritten.
"""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import keras

from compressor.errors import ModelLoadError, first_line
from compressor.io.atomic import atomic_path

_H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def import_custom_objects(modules: Optional[Iterable[str]]) -> None:
    """Import user modules that register custom layers with Keras.

    Raises:
        ModelLoadError: A module cannot be imported.
    """
    for name in modules or ():
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the working folder is importable
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ModelLoadError(
                f"could not import custom-objects module '{name}': {type(exc).__name__}: {exc}"
            ) from exc


def load_model(path: Path | str, custom_objects: Optional[Iterable[str]] = None) -> keras.Model:
    """Load a trained model as a Keras 3 graph model (Sequential or Functional).

    Args:
        path: A `.keras` file, an `.h5` file, or a tf_keras SavedModel folder.
        custom_objects: Modules to import first; they register custom layers.

    Returns:
        The model, uncompiled.

    Raises:
        ModelLoadError: The path is missing, corrupt, of an unsupported kind, uses an
            unregistered custom layer, or holds a subclassed model.
    """
    path = Path(path)
    import_custom_objects(custom_objects)
    import compressor.techniques.gating  # noqa: F401  (registers the gate layers of gated models)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_dir():
        model = _load_saved_model_dir(path)
    else:
        model = _load_file(path)
    return _require_graph_model(model, path)


def _load_file(path: Path) -> keras.Model:
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(8)
    if suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path} is not a valid .keras file (not a zip archive); "
            "re-save the model with model.save('model.keras')"
        )
    if suffix in (".h5", ".hdf5") and head != _H5_SIGNATURE:
        raise ModelLoadError(f"{path} is not a valid HDF5 file; re-save the model with model.save('model.h5')")
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelLoadError(
            f"cannot load {path}: expected a .keras or .h5 file or a tf_keras SavedModel "
            f"folder, got '{suffix or 'no extension'}'"
        )
    return _keras_load(path)


def _keras_load(path: Path, shown: Optional[Path] = None) -> keras.Model:
    shown = shown or path
    try:
        return keras.saving.load_model(path, compile=False)
    except TypeError as exc:
        match = re.search(r"Could not locate (?:class|function) '([^']+)'", str(exc))
        if match:
            raise ModelLoadError(
                f"{shown} uses '{match.group(1)}', which is not registered: pass "
                "--custom-objects your.module (a module that defines it with "
                "@keras.saving.register_keras_serializable())"
            ) from exc
        raise ModelLoadError(f"could not load {shown}: {first_line(exc)}") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not load {shown}: {first_line(exc)}") from exc


def _load_saved_model_dir(path: Path) -> keras.Model:
    if not (path / "saved_model.pb").exists():
        raise ModelLoadError(
            f"{path} is a folder but not a SavedModel (no saved_model.pb); "
            "pass a .keras or .h5 file or a tf_keras SavedModel folder"
        )
    if not (path / "keras_metadata.pb").exists():
        raise ModelLoadError(
            f"{path} is a SavedModel without Keras metadata (written by tf.saved_model.save "
            "or Keras 3 model.export), so its layers cannot be recovered; load the original "
            "model in Python and save it with model.save('model.keras')"
        )
    try:
        import tf_keras
    except ImportError as exc:  # a dependency, but say what to do if it went missing
        raise ModelLoadError("loading a tf_keras SavedModel needs the tf-keras package: pip install tf-keras") from exc
    try:
        legacy = tf_keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise ModelLoadError(f"tf_keras could not load the SavedModel {path}: {first_line(exc)}") from exc
    if not getattr(legacy, "_is_graph_network", False) and not isinstance(legacy, tf_keras.Sequential):
        raise ModelLoadError(
            f"{path} holds a subclassed tf_keras model ({type(legacy).__name__}); compressor needs "
            "a Functional or Sequential model: rebuild it with the Functional API"
        )
    with tempfile.TemporaryDirectory() as tmp:
        bridge = Path(tmp) / "bridge.h5"
        try:
            legacy.save(str(bridge), save_format="h5")
        except Exception as exc:
            raise ModelLoadError(
                f"could not convert the tf_keras SavedModel {path} to .h5: {first_line(exc)}"
            ) from exc
        return _keras_load(bridge, shown=path)


def _require_graph_model(model: object, path: Path) -> keras.Model:
    from keras.src.models.functional import Functional

    if isinstance(model, (keras.Sequential, Functional)):
        return model
    raise ModelLoadError(
        f"{path} holds a subclassed model ({type(model).__name__}); compressor can only rewrite "
        "Functional or Sequential models: rebuild it with the Functional API and save it again"
    )


def save_model(model: keras.Model, path: Path | str) -> Path:
    """Save a model as `.keras`, atomically (temporary name, then rename).

    Raises:
        ModelLoadError: The path does not end in `.keras`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelLoadError(f"models are saved as .keras files, got {path.name}")
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path

