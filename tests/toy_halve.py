"""A toy technique: "halve" keeps the larger-magnitude `keep` fraction of a Dense kernel's weights.

Everything adding a technique takes is this module and one registration line (in
tests/test_registry.py; README, "Adding a technique"):

    register("halve", "toy_halve:Halve", summary="keep the larger half of a Dense kernel's weights")
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np

from compressor.surgery.plan import LayerEdit
from compressor.surgery.replacement import Piece, Replacement
from compressor.techniques.base import LayerTechnique, masked_cost
from compressor.techniques.params import FRACTION, Param


class Halve(LayerTechnique):
    """Zero the smaller-magnitude weights of a Dense kernel; the layer stays the same class and name."""

    name = "halve"
    params = (Param("keep", FRACTION),)  # what its edits carry: {"keep": 0.5} in plan.json

    def applies(self, layer: Any) -> Optional[str]:
        if type(layer) is not keras.layers.Dense:
            return f"halve applies to Dense layers, not {type(layer).__name__}"
        return None

    def options(self, layer: Any, residual: Any = None, input_shape: Any = None, output_shape: Any = None) -> list:
        return [] if self.applies(layer) else [LayerEdit(layer.name, self.name, keep=0.5)]

    def cost(self, layer: Any, edit: LayerEdit, input_shape: Any, output_shape: Any) -> tuple[int, int]:
        return masked_cost(layer, _kept(layer, edit), input_shape, output_shape)

    def build(self, layer: Any, edit: LayerEdit) -> Replacement:
        self.check_edit(layer, edit)
        kernel, *rest = layer.get_weights()
        order = np.argsort(-np.abs(kernel).ravel(), kind="stable")
        keep = np.zeros(kernel.size, bool)
        keep[order[: _kept(layer, edit)]] = True
        clone = type(layer).from_config(layer.get_config())
        return Replacement(chain=[Piece(clone, [np.where(keep.reshape(kernel.shape), kernel, 0), *rest])])

    def sparse(self, edit: LayerEdit) -> bool:
        return True


def _kept(layer: Any, edit: LayerEdit) -> int:
    return int(round(edit.params["keep"] * int(np.prod(layer.kernel.shape))))
