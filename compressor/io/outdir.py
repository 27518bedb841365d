"""The output folder of `compress`: never half-written, never a user's file lost.

Everything a run writes goes into a staging folder inside the output folder; only a
run that finished moves its files into place, and then writes a manifest
(`compressor-manifest.json`) that lists each file it wrote with its size and SHA-256.
The manifest is the only thing `--overwrite` trusts: an earlier run's files are
those its manifest lists, and only those are replaced. Anything else in the folder
(the input model, a user's `plots/fig1.png`, a `model.onnx` no run recorded) is
never deleted or replaced: a run that would have to replace it is refused before it
starts. Ctrl-C or a crash removes the staging folder, so the output folder holds the
previous results or the new ones, never a mix.

Staging inside the output folder keeps every move a rename on one filesystem, even
when `--out` is a mounted volume; a move that still crosses filesystems (a subfolder
mounted on its own) copies to a temporary name and renames.

No TensorFlow here: the CLI checks the folder before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from compressor.errors import CompressorError
from compressor.io.atomic import write_bytes_atomic

MANIFEST = "compressor-manifest.json"
MANIFEST_SCHEMA = 1
RESULT_FILES = ("report.json", "report.md", "plan.json")
_ARTIFACT = re.compile(r"^model(\.[a-z0-9]+)?\.(tflite|onnx|keras)$")
_STAGING_PREFIX = ".compressor-staging-"


@dataclass(frozen=True)
class Manifest:
    """What one run wrote into its output folder.

    Attributes:
        status: "complete" (a finished run, whatever its budget verdict) or "error"
            (only an error report, which a rerun may replace without --overwrite).
        files: Paths relative to the folder, "/"-separated, sorted.
    """

    status: str
    files: tuple[str, ...]


def read_manifest(out: Path) -> Optional[Manifest]:
    """The manifest of the last run in `out`, or None when there is none.

    Raises:
        CompressorError: A manifest file that compressor cannot read back.
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        files = tuple(sorted(str(entry["path"]) for entry in raw["files"]))
        status = str(raw["status"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompressorError.naming("{path} is not a manifest this version can read ({exc}); move it away or choose another {out}", path=path, exc=exc) from exc
    unsafe = [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]
    if unsafe:
        raise CompressorError.naming("{path} lists paths outside its folder ({unsafe}); move it away or choose another {out}", path=path, unsafe=unsafe[0])
    return Manifest(status, files)


def existing_results(out: Path) -> list[str]:
    """Top-level names of earlier results in `out`: what its manifest lists, and files that look like results.

    A manifest's `baseline/model.tflite` shows as `baseline`.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    manifest = read_manifest(out)
    recorded = {name.split("/")[0] for name in manifest.files} | {MANIFEST} if manifest is not None else set()
    return sorted(recorded | set(_look_like_results(out)))


def holds_results(out: Path) -> bool:
    """Whether `out` holds results an error report must not replace (an earlier error report does not count)."""
    manifest = read_manifest(out) if Path(out).is_dir() else None
    if manifest is not None and manifest.status != "error":
        return True
    return bool(_unrecorded(Path(out), manifest))


def check_output_folder(out: Path, overwrite: bool, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse an output folder whose earlier results a run may not replace.

    Files that look like results (report.json, model.tflite, ...) but that no
    manifest lists are refused even with `overwrite`: no run recorded writing them,
    so they may be the user's own. Earlier results listed in a manifest need
    `overwrite`, except an error report alone. Inputs of the run (model, data, plan,
    config) are never replaced.

    Args:
        out: The output folder (need not exist).
        overwrite: Whether the user allows replacing an earlier run's results.
        inputs: Files this run reads; none of them may be among the files replaced.

    Raises:
        CompressorError: `out` is a file, or holds results the run may not replace.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError.naming("{out} {folder} is a file; choose a folder", folder=out)
    if not out.is_dir():
        return
    manifest = read_manifest(out)
    inputs = {Path(path).resolve(): path for path in inputs}
    unrecorded = _unrecorded(out, manifest)
    for name in unrecorded:
        if (out / name).resolve() in inputs:
            raise CompressorError.naming(
                "{folder} holds the input {name}, which this run would write over; choose another {out}", folder=out, name=name
            )
    if unrecorded:
        raise CompressorError.naming(
            "{folder} holds {names}, which no compressor run recorded writing (in {manifest}); "
            "move them away or choose another {out} ({overwrite} replaces only a run's own results)",
            folder=out, names=_shown(unrecorded), manifest=MANIFEST,
        )
    if manifest is None:
        return
    for name in manifest.files:
        if (out / name).resolve() in inputs:
            raise CompressorError.naming(
                "{input} is an input of this run but also an earlier result in {folder}, which this run would "
                "replace; copy it elsewhere first, or choose another {out}", input=inputs[(out / name).resolve()], folder=out,
            )
    if manifest.status != "error" and not overwrite:
        raise CompressorError.naming(
            "{folder} already holds results ({names}); pass {overwrite} to replace them, or choose another {out}",
            folder=out, names=_shown(manifest.files))


def _look_like_results(out: Path) -> list[str]:
    return [
        entry.name
        for entry in out.iterdir()
        if entry.is_file() and (entry.name in RESULT_FILES or _ARTIFACT.match(entry.name))
    ]


def _unrecorded(out: Path, manifest: Optional[Manifest]) -> list[str]:
    """Files in `out` that look like results but that the manifest does not list."""
    if not out.is_dir():
        return []
    recorded = set(manifest.files) if manifest is not None else set()
    return sorted(name for name in _look_like_results(out) if name not in recorded)


def _shown(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False, inputs: Iterable[Path | str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; on success, move its files into `out` and record them.

    The earlier run's files (per its manifest) are replaced as a whole, so no stale
    artifact of another run stays beside the new report; other files in `out` are
    left alone. If the block raises (including KeyboardInterrupt), the staging folder
    is removed, and so is `out` when this call created it.

    Args:
        out: The output folder (created if missing).
        overwrite: Passed to `check_output_folder`, checked again before the move.
        inputs: Files the run reads, which must not be replaced.

    Raises:
        CompressorError: The folder cannot be written, or its results may not be replaced.
    """
    out = Path(out)
    check_output_folder(out, overwrite, inputs)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    except OSError as exc:
        raise CompressorError(f"cannot write into the output folder {out}: {exc.strerror or exc}") from exc
    committed = False
    try:
        yield staging
        _commit(staging, out, overwrite, inputs)
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not committed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: nothing of anyone else's goes


def write_error_report(out: Path, report_json: bytes) -> None:
    """Write an error report.json into a folder holding no earlier results, and record it.

    Its manifest says "error", so rerunning the corrected command needs no --overwrite.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "report.json", report_json)
    _write_manifest(out, ["report.json"], status="error")


def _commit(staging: Path, out: Path, overwrite: bool, inputs: Iterable[Path | str]) -> None:
    """Move the staged files into `out`, setting the earlier run's files aside first.

    The folder may have changed while the run worked: it is checked again, and if the
    results may not go in after all, they are kept in a folder of their own.
    """
    new = sorted(_relative_files(staging))
    try:
        check_output_folder(out, overwrite, inputs)
        earlier = read_manifest(out)
        old = set(earlier.files) if earlier is not None else set()
        clashes = [name for name in new if (out / name).exists() and name not in old]
        if clashes:
            raise CompressorError(f"{out / clashes[0]} appeared during the run and is not an earlier result")
    except CompressorError as exc:
        kept = _keep_staging(staging, out)
        template = exc.template or str(exc).replace("{", "{{").replace("}", "}}")
        raise CompressorError.naming(template + "; nothing was replaced, the new results are in {kept}",
                                     **exc.values, kept=kept) from exc
    aside = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + "old-", dir=out))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in sorted(old | {MANIFEST}):
            if (out / name).is_file():
                _move(out / name, aside / name)
                moved_old.append(name)
        for name in new:
            _move(staging / name, out / name)
            moved_new.append(name)
        _write_manifest(out, new, status="complete")
    except OSError as exc:
        for name in moved_new:  # put the earlier results back where they were
            (out / name).unlink(missing_ok=True)
        for name in moved_old:
            _move(aside / name, out / name)
        raise CompressorError(f"cannot move results into {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    _remove_empty_folders(out, old - set(new))


def _relative_files(root: Path) -> Iterator[str]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path.relative_to(root).as_posix()


def _move(source: Path, target: Path) -> None:
    """Rename `source` onto `target`; across filesystems, copy to a temporary name, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copy2(source, name)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    source.unlink()


def _write_manifest(out: Path, files: Iterable[str], status: str) -> None:
    entries = []
    for name in sorted(files):
        path = out / name
        entries.append({"path": name, "bytes": path.stat().st_size, "sha256": _sha256(path)})
    manifest = {"schema": MANIFEST_SCHEMA, "written_by": "compressor", "status": status, "files": entries}
    write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_empty_folders(out: Path, gone: Iterable[str]) -> None:
    """Remove the folders the earlier results left empty (never a folder with anything in it)."""
    folders = {parent for name in gone for parent in Path(name).parents if parent != Path(".")}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            (out / folder).rmdir()


def _keep_staging(staging: Path, out: Path) -> Path:
    kept = out / f".compressor-results-{staging.name[len(_STAGING_PREFIX):]}"
    os.replace(staging, kept)
    return kept
