"""Kernel masks held through a training run: a user's fixed masks and gradual sparsity.

Masked kernels stay sparse: a mask multiplies the kernel's gradient (so Adam's
moments of a masked weight never build up) and the kernel itself after every
optimizer step (so nothing, a moment left from before the weight was masked
included, can revive it). Gradual sparsity (`compressor.finetune.GradualSparsity`)
prunes a layer during the run to a target pattern, its density following tfmot's
`PolynomialDecay` schedule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf

from compressor.errors import CompressorError
from compressor.graph.calls import layer_calls
from compressor.surgery.plan import SparsitySpec
from compressor.techniques.base import kernel_index, kernel_name, pattern_kernel, restore_kernel
from compressor.techniques.sparsity import Sparsity, check_pattern
from compressor.techniques.sparsity import mask as sparsity_mask

if TYPE_CHECKING:
    from compressor.finetune import GradualSparsity


def kernel_layers(model: keras.Model) -> dict[str, Any]:
    """Layer name (qualified in nested models) -> layer, for the layers with a main kernel."""
    return {call.path: call.operation for call in layer_calls(model) if kernel_name(call.operation) is not None}


@dataclass
class MaskedKernel:
    """One masked kernel: its variable, the mask applied to it, and where it comes from."""

    name: str
    layer: Any
    variable: Any
    mask: tf.Variable  # float32, 1 where kept; applied to gradients and weights
    fixed: Optional[np.ndarray]  # boolean, the user's mask, if any
    target: Optional[SparsitySpec]  # the gradual-sparsity target, if any
    sparsity: Optional[np.ndarray] = None  # the schedule's sparsity per step


class KernelMasks:
    """Holds the masked kernels of one run, and updates them on the sparsity schedule.

    Args:
        model: The model being trained; its kernels are masked in place.
        masks: Layer name → boolean mask shaped like its kernel, held all run.
        gradual: Layers to prune gradually, or None.
        steps: The run's planned optimizer steps (the schedule's length).

    Raises:
        CompressorError: A name without a kernel layer, a mask of the wrong shape, or
            a target the layer cannot take (PlanError).
    """

    def __init__(
        self, model: keras.Model, masks: Mapping[str, np.ndarray], gradual: Optional[GradualSparsity], steps: int
    ) -> None:
        self._gradual = gradual
        self._entries: list[MaskedKernel] = []
        targets = dict(gradual.targets) if gradual else {}
        names = list(masks) + [name for name in targets if name not in masks]
        layers = kernel_layers(model) if names else {}
        for name in names:
            self._entries.append(self._entry(name, layers, masks.get(name), targets.get(name)))
        self._prune = np.zeros(steps, dtype=bool)
        self._end_step = 0
        if gradual is not None:
            self._plan(gradual, steps)
        for entry in self._entries:
            if entry.fixed is not None:
                self._set(entry, entry.fixed)

    @staticmethod
    def _entry(name: str, layers: dict, fixed: Optional[np.ndarray], target: Optional[SparsitySpec]) -> MaskedKernel:
        if name not in layers:
            shown = ", ".join(sorted(layers)) or "none"
            raise CompressorError(f"no layer with a kernel named {name!r} to mask; layers with kernels: {shown}")
        layer = layers[name]
        variable = layer.weights[kernel_index(layer)]
        shape = tuple(variable.shape)
        if fixed is not None:
            fixed = np.asarray(fixed)
            if fixed.shape != shape:
                raise CompressorError(
                    f"the mask for layer {name!r} has shape {fixed.shape}; expected its kernel's shape {shape}"
                )
            fixed = fixed.astype(bool)
        if target is not None:
            _check_target(name, layer, target)
        mask = tf.Variable(np.ones(shape, np.float32), trainable=False, name="finetune_mask")
        return MaskedKernel(name, layer, variable, mask, fixed, target)

    def _plan(self, gradual: GradualSparsity, steps: int) -> None:
        """Evaluate tfmot's schedule at every step of the run, once."""
        # Imported here: tfmot imports tf_keras, which takes seconds that runs without it need not spend.
        from tensorflow_model_optimization.sparsity.keras import PolynomialDecay

        begin = math.floor(gradual.begin_fraction * steps)
        end = max(round(gradual.end_fraction * steps), begin + 1)  # the schedule divides by end - begin
        self._end_step = end
        every_step = tf.range(steps, dtype=tf.int64)
        for entry in self._entries:
            if entry.target is None:
                continue
            final = 0.0 if entry.target.structure == "n:m" else 1.0 - entry.target.density
            schedule = PolynomialDecay(0.0, final, begin, end, power=gradual.power, frequency=gradual.frequency)
            prune, sparsity = schedule(every_step)
            self._prune = prune.numpy()
            entry.sparsity = sparsity.numpy()

    def masks_for(self, variables: list) -> list[Optional[tf.Variable]]:
        """The mask of each variable (None for unmasked ones), to multiply its gradient by."""
        by_id = {id(entry.variable): entry.mask for entry in self._entries}
        return [by_id.get(id(variable)) for variable in variables]

    def apply_in_graph(self) -> None:
        """Zero the masked weights (called inside the compiled step, after the optimizer)."""
        for entry in self._entries:
            entry.variable.assign(entry.variable * entry.mask)

    def update(self, step: int) -> None:
        """At a pruning step of the schedule, mask each target again at its density."""
        if step >= len(self._prune) or not self._prune[step]:
            return
        for entry in self._entries:
            if entry.target is not None:
                spec = entry.target if step >= self._end_step else _at_density(entry.target, entry.sparsity[step])
                self._set(entry, self._mask(entry, spec))

    def finish(self) -> None:
        """Give every target its exact final mask (a run may end before the schedule does)."""
        for entry in self._entries:
            if entry.target is not None:
                self._set(entry, self._mask(entry, entry.target))

    def pruning_done(self, step: int) -> bool:
        """Whether the schedule has reached its final densities by `step`."""
        return self._gradual is None or step > self._end_step

    def densities(self) -> dict[str, float]:
        """Fraction of each target kernel's weights that are kept."""
        return {
            entry.name: np.count_nonzero(keras.ops.convert_to_numpy(entry.mask)) / int(np.prod(entry.mask.shape))
            for entry in self._entries
            if entry.target is not None
        }

    @staticmethod
    def _mask(entry: MaskedKernel, spec: SparsitySpec) -> np.ndarray:
        """The layer's mask in `spec`; weights the user's mask drops rank below every other."""
        layer = entry.layer
        kernel = pattern_kernel(layer, keras.ops.convert_to_numpy(entry.variable))
        scores = np.square(kernel.astype(np.float64))
        if entry.fixed is not None:
            scores = np.where(pattern_kernel(layer, entry.fixed), scores, -1.0)
            keep = sparsity_mask(kernel, spec, scores) & pattern_kernel(layer, entry.fixed)
        else:
            keep = sparsity_mask(kernel, spec, scores)
        return restore_kernel(layer, keep)

    @staticmethod
    def _set(entry: MaskedKernel, keep: np.ndarray) -> None:
        entry.mask.assign(keep.astype(np.float32))
        entry.variable.assign(entry.variable * keras.ops.convert_to_tensor(entry.mask))


def _check_target(name: str, layer: Any, target: SparsitySpec) -> None:
    """Raise now, not mid-run, if the layer cannot be masked or the pattern does not fit it."""
    reason = Sparsity().check(layer)
    if reason is not None:
        raise CompressorError(f"cannot prune layer {name!r}: it {reason}")
    check_pattern(layer, target)  # PlanError, with the reason


def _at_density(target: SparsitySpec, sparsity: float) -> SparsitySpec:
    if target.structure == "n:m":
        return target
    return dataclasses.replace(target, density=min(1.0, max(0.0, 1.0 - float(sparsity))))
