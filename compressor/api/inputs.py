"""What the Python API accepts as a model and as data, turned into what the library takes.

A model is a `keras.Model` or a path to a model file. Data is a path (.npz, image
folder), a `pkg.module:function` hook, `(x, y)` arrays, `x` alone, a `tf.data.Dataset`
of (x, y) pairs, or a `compressor.Dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from compressor.errors import OptionError
from compressor.io.data import Dataset, Shapes, check_fits, from_arrays, from_tf_dataset, load_data


def is_path(value: Any) -> bool:
    """Whether the value names a file (or a hook), rather than being the thing itself."""
    return isinstance(value, (str, os.PathLike))


def as_model(model: Any, custom_objects: Sequence[str] = (), allow_model_code: bool = False) -> Any:
    """The Keras graph model itself, loaded when `model` is a path.

    Raises:
        OptionError: Neither a keras.Model nor a path.
        ModelLoadError: A file that cannot be loaded, or a subclassed model.
    """
    if is_path(model):
        from compressor.io.models import load_model

        return load_model(Path(model), custom_objects, allow_model_code=allow_model_code)
    import keras

    from compressor.io.models import require_graph_model

    if not isinstance(model, keras.Model):
        raise OptionError("Invalid model. Expected a keras.Model or the path of a model file. Received: {kind}",
                          kind=type(model).__name__)
    return require_graph_model(model)


def model_name(model: Any) -> str:
    """How reports call a model given as an object: "keras.Model 'resnet20'"."""
    return f"keras.Model {getattr(model, 'name', '?')!r}"


def data_name(option: str, value: Any) -> str:
    """How messages and reports call in-memory data given for `option`, e.g. "data arrays".

    Raises:
        OptionError: A value that is no kind of data.
    """
    if isinstance(value, Dataset):
        return value.source
    if hasattr(value, "as_numpy_iterator"):
        return f"{option} tf.data.Dataset"
    if isinstance(value, (tuple, list)) and len(value) == 2 or hasattr(value, "shape"):
        return f"{option} arrays"
    raise OptionError(
        "Invalid {%s}. Expected a path, a pkg.module:function hook, (x, y) arrays, x alone, a tf.data.Dataset "
        "or a compressor.Dataset. Received: {kind}" % option, kind=type(value).__name__)


def as_dataset(option: str, value: Any, input_shape: Optional[Shapes] = None, numeric: bool = False) -> Optional[Dataset]:
    """The Dataset of a value given for a data option (None stays None); paths and hooks are loaded.

    Args:
        option: The keyword it was given as (for messages).
        value: See the module docstring.
        input_shape: Per-sample model input shape (one per input name for several
            inputs), to check samples against (and to tell batched tf.data elements
            from single ones); None when no model is at hand.
        numeric: Keep `y` as numbers (regression targets) rather than class labels.

    Raises:
        OptionError: A value that is no kind of data.
        DataError: Data that cannot be read or does not fit.
    """
    if value is None:
        return None
    if is_path(value):
        return load_data(value, input_shape=input_shape, numeric=numeric)
    name = data_name(option, value)
    if isinstance(value, Dataset):
        data = value
    elif hasattr(value, "as_numpy_iterator"):
        data = from_tf_dataset(value, name, input_shape, numeric)
    elif isinstance(value, (tuple, list)):
        data = from_arrays(value[0], value[1], name, numeric)
    else:
        data = from_arrays(value, None, name)
    if input_shape is not None:
        check_fits(data, input_shape)
    return data
