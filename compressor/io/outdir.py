"""The output folder of `compress`: never half-written, never silently overwritten.

Everything a run writes goes into a staging folder beside the output folder; only a
run that finished moves its files in. Ctrl-C or a crash removes the staging folder,
so the output folder holds either the previous results or the new ones, never a mix
of finished and half-written files.

No TensorFlow here: the CLI checks the folder before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from compressor.errors import CompressorError

RESULT_FILES = ("report.json", "report.md", "plan.json")
RESULT_FOLDERS = ("baseline", "plots", "static")
_ARTIFACT = re.compile(r"^model(\.[a-z0-9]+)?\.(tflite|onnx|keras)$")


def existing_results(out: Path) -> list[str]:
    """Names of earlier results of `compress` in `out` (empty when there are none)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if (entry.is_file() and (name in RESULT_FILES or _ARTIFACT.match(name))) or (
            entry.is_dir() and name in RESULT_FOLDERS
        ):
            found.append(name)
    return found


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds earlier results unless overwriting was asked for.

    Raises:
        CompressorError: `out` is a file, or holds results and `overwrite` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"--out {out} is a file; choose a folder")
    found = existing_results(out)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise CompressorError(f"{out} already holds results ({shown}); pass --overwrite to replace them, or choose another --out")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success, move its contents into `out`.

    Earlier results in `out` (see `existing_results`) are replaced as a whole, so no
    stale artifact of another run stays beside the new report. Other files in `out`
    are left alone. If the block raises (including KeyboardInterrupt), the staging
    folder is removed and `out` is untouched.

    Raises:
        CompressorError: The parent folder cannot be written.
    """
    out = Path(out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise CompressorError(f"cannot write beside the output folder {out}: {exc.strerror or exc}") from exc
    try:
        yield staging
        _commit(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out: Path) -> None:
    """Move the staged results into `out`, setting earlier results aside first."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressorError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    old = staging / ".replaced"
    old.mkdir()
    moved_old, moved_new = [], []
    try:
        for name in existing_results(out):
            os.replace(out / name, old / name)
            moved_old.append(name)
        for entry in sorted(staging.iterdir()):
            if entry.name != old.name:
                os.replace(entry, out / entry.name)
                moved_new.append(entry.name)
    except OSError as exc:
        # Put the earlier results back where they were.
        for name in moved_new:
            _remove(out / name)
        for name in moved_old:
            os.replace(old / name, out / name)
        raise CompressorError(f"cannot move results into {out}: {exc.strerror or exc}") from exc


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
