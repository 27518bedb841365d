"""Stable fingerprints of models and data: for plans, the sensitivity cache and the judged file's cache."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import numpy as np


def model_fingerprint(model: Any) -> str:
    """"sha256:<hex>" of a model's architecture config and weights.

    Two models share a fingerprint when they have the same config (layer names
    included) and bit-identical weights in the same order; fine-tuning or renaming
    a layer changes it.
    """
    digest = hashlib.sha256()
    config = json.dumps(model.get_config(), sort_keys=True, default=repr)
    digest.update(config.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(f"{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return "sha256:" + digest.hexdigest()


def data_fingerprint(x: np.ndarray | dict, y: Optional[np.ndarray]) -> str:
    """"sha256:<hex>" of the samples and labels (values, dtypes and shapes); samples of several inputs by name."""
    digest = hashlib.sha256()
    arrays = [x, y]
    if isinstance(x, dict):
        for name in x:
            digest.update(f"input {name}".encode())
        arrays = [*x.values(), y]
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()
