"""Per-layer error curves: the kernel error of every option of every layer, cached across runs.

A data-free search prices each layer's options by their relative kernel error. The
techniques that can (`LayerTechnique.kernel_errors`: Tucker-2 and SVD) give the errors
of all of a layer's ranks from one factorization; the other options (hybrid residuals,
data-driven bases) are built to know theirs (`KernelCache`).

The data-free errors depend on nothing but the weights and the options, so they are
cached on disk as the sensitivity table of fixed_loss is: one file per model
(`curves-<fingerprint>.json`, keyed by the model's fingerprint), one entry per layer
and option list, written atomically. A run with another compression factor, budget
kind or method on the same model offers the same options and reads them back without
factorizing anything; changing the techniques or the sparsity pattern changes a
layer's option list, and that layer is computed again beside the others.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from compressor.errors import CompressorError, first_line
from compressor.io.atomic import write_bytes_atomic
from compressor.io.fingerprint import model_fingerprint
from compressor.search.kernels import KernelCache
from compressor.surgery.plan import LayerEdit

CURVES_VERSION = 1

Pending = tuple[str, Any, Sequence[LayerEdit]]  # (qualified layer name, original layer, its edits)


def option_errors(
    model: Any,
    layers: Sequence[Pending],
    kernels: KernelCache,
    cache_dir: Optional[Path | str] = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each layer's per-edit kernel errors, read from the cache where it holds them.

    Args:
        model: The model the layers are in (its fingerprint keys the cache file).
        layers: The layers and their edits.
        kernels: Builds (and keeps) the effective kernels of edits no technique prices
            alone; its registry provides the techniques.
        cache_dir: Folder of the cache (created if missing); None: no cache.

    Returns:
        (layer name → errors in edit order, layer name → why its edits cannot be
        built, for the layers whose edits failed).
    """
    store = _CurveFile(Path(cache_dir).expanduser(), model) if cache_dir is not None and layers else None
    stored = store.load() if store is not None else {}
    found: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    changed = False
    for name, layer, edits in layers:
        key = _entry_key(name, edits)
        try:
            known = stored.get(key)
            if known is None or len(known) != len(edits):
                known = _data_free_errors(kernels, layer, edits)
                stored[key] = known
                changed = changed or any(error is not None for error in known)
            found[name] = [kernels.get(layer, edit).error if error is None else error
                           for edit, error in zip(edits, known)]
        except CompressorError as exc:
            failed[name] = first_line(exc)
    if store is not None and changed:
        store.save(stored)
    return found, failed


def _data_free_errors(kernels: KernelCache, layer: Any, edits: Sequence[LayerEdit]) -> list[Optional[float]]:
    """What the techniques price from the weights alone (None where an edit must be built)."""
    errors: list[Optional[float]] = [None] * len(edits)
    by_technique: dict[str, list[int]] = {}
    for i, edit in enumerate(edits):
        by_technique.setdefault(edit.technique, []).append(i)
    for technique, positions in by_technique.items():
        priced = kernels.registry[technique].kernel_errors(layer, [edits[i] for i in positions])
        for i, error in zip(positions, priced):
            errors[i] = error
    return errors


def _entry_key(name: str, edits: Sequence[LayerEdit]) -> str:
    options = json.dumps([edit.to_dict() for edit in edits], sort_keys=True)
    return f"{name}|{hashlib.sha256(options.encode()).hexdigest()[:24]}"


class _CurveFile:
    """The cache file of one model's curves: entry key → errors (null: built each run)."""

    def __init__(self, folder: Path, model: Any) -> None:
        self.model = model_fingerprint(model)
        digest = hashlib.sha256(f"{CURVES_VERSION}:{self.model}".encode()).hexdigest()
        self.path = folder / f"curves-{digest[:24]}.json"

    def load(self) -> dict[str, list[Optional[float]]]:
        """The entries, if the file is intact and made for this model; empty otherwise."""
        try:
            content = json.loads(self.path.read_text())
            if content["version"] != CURVES_VERSION or content["model"] != self.model:
                return {}
            return {str(key): [_error(value) for value in errors] for key, errors in content["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # missing or corrupt: computed again and rewritten

    def save(self, entries: dict[str, list[Optional[float]]]) -> None:
        content = {"version": CURVES_VERSION, "model": self.model, "layers": entries}
        try:
            write_bytes_atomic(self.path, (json.dumps(content, indent=1) + "\n").encode())
        except (CompressorError, OSError):
            pass  # an unwritable cache only costs the next run its factorizations


def _error(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"not a kernel error: {value!r}")
    return float(value)
