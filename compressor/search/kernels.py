"""Effective kernels of edits, computed once per run and shared by the search's steps.

Every edit the techniques make (Tucker-2, SVD, masks, a sparse residual beside a
low-rank chain) is linear in the kernel: what the replacement computes equals the
original layer with its main kernel W replaced by one kernel Ŵ of the same shape
(`compressor.techniques.base.effective_kernel`). Building Ŵ is the expensive part
(a Tucker-2 HOOI, robust-PCA alternations), so it is cached here, keyed by the edit
(whose layer name is qualified, so one cache serves one model). A recurrent layer's
Ŵ is its input and recurrent kernels stacked (`compressor.techniques.recurrent`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from compressor.surgery.plan import LayerEdit
from compressor.techniques.base import effective_kernel, relative_error, searched_kernel
from compressor.techniques.registry import DEFAULT_REGISTRY, Registry

DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class EffectiveKernel:
    """Ŵ of one edit.

    Attributes:
        kernel: Ŵ in the layer's own layout and dtype.
        error: ||W − Ŵ||_F / ||W||_F, computed in float64.
    """

    kernel: np.ndarray
    error: float


class KernelCache:
    """Ŵ per edit, least recently used dropped first beyond `max_bytes`.

    Args:
        max_bytes: Memory for cached kernels; a dropped kernel is rebuilt on demand.
        registry: The technique instances that build the edits
            (`compressor.techniques.registry.Registry`); default: plain ones.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, registry: Optional[Registry] = None) -> None:
        self.max_bytes = max_bytes
        self.registry = DEFAULT_REGISTRY if registry is None else registry
        self.builds = 0  # how many replacements were built (misses)
        self._entries: OrderedDict[LayerEdit, EffectiveKernel] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, layer: Any, edit: LayerEdit) -> EffectiveKernel:
        """Ŵ of `edit` applied to `layer` (the original layer the edit names).

        Raises:
            PlanError: The technique cannot build the edit on this layer.
        """
        entry = self._entries.get(edit)
        if entry is not None:
            self._entries.move_to_end(edit)
            return entry
        entry = self._build(layer, edit)
        self._entries[edit] = entry
        self._bytes += entry.kernel.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.kernel.nbytes
        return entry

    def _build(self, layer: Any, edit: LayerEdit) -> EffectiveKernel:
        self.builds += 1
        original = searched_kernel(layer)
        approx = effective_kernel(layer, self.registry[edit.technique].build(layer, edit))
        error = relative_error(original.astype(np.float64), approx)
        return EffectiveKernel(np.ascontiguousarray(approx, dtype=original.dtype), error)
