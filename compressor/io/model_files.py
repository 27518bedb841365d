"""Check a model path before anything loads it: present, of a kind we read, and intact.

No TensorFlow here, so the command line can refuse a missing or damaged model at once
instead of after TensorFlow's start-up. A damaged file is named by the part that is
damaged, which Keras' own errors (raw h5py or JSON messages) do not say:

- `.keras` is a zip archive: every member must pass its CRC, its JSON members
  (config.json, metadata.json) must parse, and its HDF5 members (model.weights.h5)
  must open — a truncated HDF5 file fails its end-of-file check on opening;
- `.h5` must carry the HDF5 signature and open;
- a SavedModel folder must hold saved_model.pb and the Keras metadata that lets its
  layers be rebuilt.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable

from compressor.errors import ModelLoadError, first_line

H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_model_path(path: Path | str) -> Path:
    """Refuse a model path that is missing, of an unknown kind, or damaged.

    Args:
        path: A `.keras` file, an `.h5` file, or a tf_keras SavedModel folder.

    Returns:
        The path.

    Raises:
        ModelLoadError: One line naming what is wrong (and, for a damaged file, which part).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_dir():
        _check_saved_model_dir(path)
        return path
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelLoadError(
            f"cannot load {path}: expected a .keras or .h5 file or a tf_keras SavedModel "
            f"folder, got '{suffix or 'no extension'}'"
        )
    if suffix == ".keras":
        _check_keras_archive(path)
    else:
        _check_h5_file(path)
    return path


def _check_saved_model_dir(path: Path) -> None:
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


def _check_keras_archive(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path} is not a valid .keras file (not a zip archive, or a truncated one); "
            "re-save the model with model.save('model.keras')"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "config.json" not in names:
                raise ModelLoadError(f"{path} is corrupt: it has no config.json (members: {', '.join(names[:5])})")
            for info in archive.infolist():
                if not info.is_dir():
                    _check_member(path, archive, info)
    except (zipfile.BadZipFile, OSError) as exc:  # a damaged central directory or local header
        raise ModelLoadError(f"{path} is corrupt: its zip archive is unreadable ({first_line(exc)})") from exc


def _check_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Read one member through its CRC check, then parse it if it is JSON or HDF5."""
    name = info.filename
    if name.endswith(".h5"):
        # h5py seeks back and forth, which is slow in a zip member: check a plain copy.
        with tempfile.TemporaryFile() as copy:
            _read_member(path, archive, info, lambda member: shutil.copyfileobj(member, copy, 1 << 20))
            copy.seek(0)
            reason = _h5_problem(copy)
        if reason:
            raise ModelLoadError(f"{path} is corrupt: its weights file {name} is truncated or unreadable ({reason})")
    elif name.endswith(".json"):
        _check_json(path, name, _read_member(path, archive, info, lambda member: member.read()))
    else:
        _read_member(path, archive, info, _drain)


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, read: Callable[[IO[bytes]], Any]) -> Any:
    """Read a member to its end, where zipfile checks its CRC."""
    try:
        with archive.open(info) as member:
            return read(member)
    except Exception as exc:  # noqa: BLE001 - zipfile raises BadZipFile, zlib.error, EOFError, ...
        if "CRC" in str(exc):
            raise ModelLoadError(
                f"{path} is corrupt: its member {info.filename} fails its CRC check (damaged on disk or in transfer)"
            ) from exc
        raise ModelLoadError(f"{path} is corrupt: its member {info.filename} cannot be read ({first_line(exc)})") from exc


def _drain(member: IO[bytes]) -> None:
    while member.read(1 << 20):
        pass


def _check_json(path: Path, name: str, text: bytes) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{path} is corrupt: its {name} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is corrupt: its {name} is not valid JSON (not UTF-8 text)") from exc


def _check_h5_file(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(8)
    if head != H5_SIGNATURE:
        raise ModelLoadError(f"{path} is not a valid HDF5 file; re-save the model with model.save('model.h5')")
    with path.open("rb") as handle:
        reason = _h5_problem(handle)
    if reason:
        raise ModelLoadError(f"{path} is corrupt: the HDF5 file is truncated or unreadable ({reason})")


def _h5_problem(source: IO[bytes]) -> str | None:
    """Why an HDF5 file does not open and walk, or None when it does (or h5py is absent)."""
    try:
        import h5py
    except ImportError:  # a runtime-only install; loading the model will say what is missing
        return None
    try:
        with h5py.File(source, "r") as handle:
            handle.visit(lambda name: None)  # reads every group's index
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError, ...
        return _h5_reason(exc)
    return None


def _h5_reason(exc: Exception) -> str:
    text = first_line(exc)
    start = text.find("(")
    # h5py: "Unable to synchronously open file (truncated file: eof = 6604, ...)": keep the cause.
    return text[start + 1 : text.rfind(")")] if 0 <= start < text.rfind(")") else text
