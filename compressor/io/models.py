"""Load trained Keras models from the formats users have, and save them atomically.

Accepted: Keras 3 `.keras`, `.h5` written by Keras 3 or by legacy tf_keras (Keras 2
layer settings Keras 3 lacks are read by `compressor.io.legacy_layers`), and a
SavedModel folder written by tf_keras (`model.save(dir, save_format="tf")`), which is
loaded with tf_keras and bridged to Keras 3 through a temporary `.h5` file.
Only graph models (Sequential, Functional) can be analysed and rewritten.

Loading runs no code stored in the model unless the caller allows it
(`allow_model_code`, the `--allow-model-code` flag): Keras' safe mode refuses a
Lambda's Python function in `.keras` and `.h5` files, but tf_keras turns a
SavedModel's Lambda bytecode into a function while loading, so a SavedModel's Keras
metadata is read first and one with a Lambda layer is refused before tf_keras sees it.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import keras

from compressor.errors import ModelLoadError, first_line
from compressor.graph.keras_api import is_graph_model
from compressor.io.atomic import atomic_path
from compressor.io.legacy_layers import LEGACY_LAYERS, tensor_arguments_fixed
from compressor.io.model_files import check_model_path

ALLOW_CODE_HINT = "pass {allow_model_code} only if you trust the file"


def import_custom_objects(modules: Optional[Iterable[str]]) -> None:
    """Import user modules that register custom layers with Keras.

    Raises:
        ModelLoadError: A module cannot be imported.
    """
    for name in modules or ():
        if str(Path.cwd()) not in sys.path:
            # The working folder is importable, but last: a stray file there must not shadow an installed module.
            sys.path.append(str(Path.cwd()))
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ModelLoadError(
                f"could not import custom-objects module '{name}': {type(exc).__name__}: {exc}"
            ) from exc


def load_model(
    path: Path | str, custom_objects: Optional[Iterable[str]] = None, allow_model_code: bool = False
) -> keras.Model:
    """Load a trained model as a Keras 3 graph model (Sequential or Functional).

    Args:
        path: A `.keras` file, an `.h5` file, or a tf_keras SavedModel folder.
        custom_objects: Modules to import first; they register custom layers.
        allow_model_code: Run Python code stored in the model (the function of a
            Lambda layer): Keras' `safe_mode=False`. Only for models you trust.

    Returns:
        The model, uncompiled.

    Raises:
        ModelLoadError: The path is missing, corrupt, of an unsupported kind, stores
            code that `allow_model_code` does not allow, uses an unregistered custom
            layer, or holds a subclassed model.
    """
    path = Path(path)
    import_custom_objects(custom_objects)
    import compressor.layers.gating  # noqa: F401  (registers the gate layers of gated models)
    import compressor.layers.recurrent  # noqa: F401  (registers the low-rank cells of compressed recurrent layers)
    check_model_path(path)  # before Keras: a damaged file is named by its damaged part
    if path.is_dir():
        model = _load_saved_model_dir(path, allow_model_code)
    else:
        model = _keras_load(path, allow_model_code)
    return require_graph_model(model, path)


def _keras_load(path: Path, allow_model_code: bool, shown: Optional[Path] = None) -> keras.Model:
    shown = shown or path
    if path.suffix.lower() == ".h5":
        return _h5_load(path, allow_model_code, shown)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not allow_model_code)
    except Exception as exc:
        raise _load_error(exc, shown) from exc


def _h5_load(path: Path, allow_model_code: bool, shown: Path) -> keras.Model:
    """An `.h5` file, with the Keras 2 configs Keras 3 refuses read as Keras 3's (`compressor.io.legacy_layers`)."""
    import shutil

    import h5py

    try:
        with h5py.File(path, "r") as h5:
            stored = h5.attrs.get("model_config")
        fixed = tensor_arguments_fixed(json.loads(stored)) if stored is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            if fixed is not None:  # calls with tensor keyword arguments: load a copy with Keras 3 nodes
                copied = Path(tmp) / path.name
                shutil.copyfile(path, copied)
                with h5py.File(copied, "r+") as h5:
                    h5.attrs["model_config"] = json.dumps(fixed)
                path = copied
            return keras.saving.load_model(path, compile=False, safe_mode=not allow_model_code,
                                           custom_objects=LEGACY_LAYERS)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _load_error(exc, shown) from exc


def _load_error(exc: Exception, shown: Path) -> ModelLoadError:
    """One line for what Keras raised: code refused by safe mode, an unregistered class, or its own first line."""
    text = str(exc)
    if "safe_mode=False" in text:  # Keras' safe mode refused code stored in the file
        return ModelLoadError.naming(
            "{shown} stores Python code that would run on loading ({cause}); refused: " + ALLOW_CODE_HINT,
            shown=shown, cause=_first_sentence(exc),
        )
    match = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if isinstance(exc, TypeError) and match:
        return ModelLoadError.naming(
            "{shown} uses '{name}', which is not registered: pass {custom_objects} your.module (a module "
            "that defines it with @keras.saving.register_keras_serializable())", shown=shown, name=match.group(1),
        )
    return ModelLoadError(f"could not load {shown}: {first_line(exc)}")


def _first_sentence(exc: BaseException) -> str:
    text = first_line(exc)
    return text.split(". ")[0].rstrip(".")


def _load_saved_model_dir(path: Path, allow_model_code: bool) -> keras.Model:
    try:
        import tf_keras
    except ImportError as exc:  # a dependency, but say what to do if it went missing
        raise ModelLoadError("loading a tf_keras SavedModel needs the tf-keras package: pip install tf-keras") from exc
    if not allow_model_code:
        code = saved_model_code_layers(path)
        if code:
            raise ModelLoadError.naming(
                "{path} stores Python code in {layers}, which tf_keras would run while loading the SavedModel; "
                "refused: " + ALLOW_CODE_HINT, path=path, layers=", ".join(code[:3]),
            )
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
        return _keras_load(bridge, allow_model_code, shown=path)


def saved_model_code_layers(path: Path | str) -> list[str]:
    """The layers of a tf_keras SavedModel that store Python code, read without loading it.

    `keras_metadata.pb` is a `SavedMetadata` protobuf with one node per saved Keras
    object; each node's metadata is the JSON of that object, its config included, so a
    layer of a nested model appears as a node and inside its model's config too.
    tf_keras stores a Python function as bytecode in a `Lambda` layer (its function,
    output shape or mask, marked `"function_type": "lambda"` and the like) and in RNN
    cell wrappers (`"..._type": "lambda"`), and turns it back into a function on loading.

    Returns:
        Those layers (at any depth) as "layer NAME (CLASS)", each once.

    Raises:
        ModelLoadError: The metadata cannot be read.
    """
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString((Path(path) / "keras_metadata.pb").read_bytes())
        nodes = [json.loads(node.metadata) for node in metadata.nodes if node.metadata]
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, JSON errors, OSError
        raise ModelLoadError(f"{path} is corrupt: its keras_metadata.pb is unreadable ({first_line(exc)})") from exc
    return list(dict.fromkeys(name for node in nodes for name in _code_layers(node)))


def _code_layers(tree: Any) -> Iterator[str]:
    """Names of the layers in a JSON tree of configs that hold Python bytecode."""
    if isinstance(tree, dict):
        config = tree.get("config") if isinstance(tree.get("config"), dict) else {}
        marked = any(key.endswith("_type") and value == "lambda" for key, value in config.items())
        if tree.get("class_name") == "Lambda" or marked:
            yield f"layer {tree.get('name') or config.get('name')} ({tree.get('class_name')})"
        for value in tree.values():
            yield from _code_layers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _code_layers(value)


def require_graph_model(model: object, path: Optional[Path] = None) -> keras.Model:
    """The model itself when it is a graph model (Sequential or Functional) this tool can rewrite.

    Raises:
        ModelLoadError: A subclassed model (or not a model at all).
    """
    if is_graph_model(model):
        return model
    where = f"{path} holds" if path is not None else "the model is"
    raise ModelLoadError(
        f"{where} a subclassed model ({type(model).__name__}); compressor can only rewrite "
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

