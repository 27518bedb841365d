"""Write files so that a reader never sees half of one: temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from compressor.errors import CompressorError


def ensure_dir(path: Path) -> Path:
    """Create an output folder, or fail with one clear line if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressorError(f"cannot create output folder {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise CompressorError(f"output folder {path} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it onto `final` only on success.

    The temporary name keeps the final suffix (Keras insists on `.keras`). If the
    block raises, the temporary file (or folder) is removed and `final` is untouched.
    """
    final = Path(final)
    ensure_dir(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers want to create the file themselves
    try:
        yield tmp
        if not tmp.exists():
            raise CompressorError(f"nothing was written for {final}")
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes_atomic(final: Path | str, data: bytes) -> Path:
    """Write bytes to `final` atomically and return its path."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)
