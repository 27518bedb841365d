"""Load evaluation and calibration data: .npz files, image folders, Python hooks.

No TensorFlow here: the benchmark runtime reads data on boards without it. A hook may
return a `tf.data.Dataset`; it is read through its own `as_numpy_iterator`.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from compressor.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_HOOK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

Shape = Sequence[Optional[int]]
Shapes = Union[Shape, Mapping[str, Shape]]
"""One input's per-sample shape, or (several inputs) one per input name, in the model's input order."""
Samples = Union[np.ndarray, dict]
"""A model's inputs, batch first: one array, or (several inputs) a dict input name -> array, in input order."""

TARGET_PREFIX = "y_"
"""An .npz array `y_<output name>` holds the targets of that output of a multi-output model."""


@dataclass(frozen=True)
class Dataset:
    """Samples and (optional) integer class labels, batch first.

    Attributes:
        x: Inputs, float32 unless the source had another numeric type: one array, or
            for a model with several inputs a dict input name -> array, in the
            model's input order (`Samples`).
        y: Class indices (int64), or None when the source has no labels; loaded with
            `numeric`, the numbers `y` held (float32 regression targets, batch first).
        source: Where the data came from, for messages and reports.
        output: The model output `y` labels, for a model with several outputs (None:
            its only output).
        targets: Per output name, that output's targets as stored (`y_<name>` arrays of
            an .npz; regression targets too); empty for single-output data.
    """

    x: Samples
    y: Optional[np.ndarray]
    source: str
    output: Optional[str] = None
    targets: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return sample_count(self.x)

    def take(self, n: int) -> "Dataset":
        """The first n samples."""
        return self.select(slice(0, n))

    def select(self, index: Any) -> "Dataset":
        """The samples at `index` (a slice, a boolean mask or integer positions), labels and targets with them."""
        return replace(
            self,
            x=sample_rows(self.x, index),
            y=None if self.y is None else self.y[index],
            targets={name: values[index] for name, values in self.targets.items()},
        )


def sample_count(x: Samples) -> int:
    """How many samples `x` holds (one array, or one array per input)."""
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return int(first.shape[0])


def sample_rows(x: Samples, index: Any) -> Samples:
    """The samples of `x` at `index`, for one array or one array per input."""
    if isinstance(x, dict):
        return {name: values[index] for name, values in x.items()}
    return x[index]


def dataset_arrays(data: Dataset) -> dict[str, np.ndarray]:
    """The .npz arrays `load_data` reads back as `data`: `x` and `y`, or one per input and per output's targets."""
    arrays = dict(data.x) if isinstance(data.x, dict) else {"x": data.x}
    arrays.update((TARGET_PREFIX + name, values) for name, values in data.targets.items())
    if data.y is not None and (data.output is None or data.output not in data.targets):
        arrays["y"] = data.y
    return arrays


def with_labels_of(data: Dataset, output: str, numeric: bool = False) -> Dataset:
    """The data with `y` the labels of `output`, from its `y_<output>` targets (or `y` as given).

    Args:
        data: Loaded data.
        output: The output's name.
        numeric: Read the targets as numbers (regression targets), not class labels.

    Raises:
        DataError: The targets of `output` are not class labels (or, `numeric`, not finite numbers).
    """
    if output in data.targets:
        source = f"{data.source} ({TARGET_PREFIX}{output})"
        read = _targets if numeric else _labels
        return replace(data, y=read(data.targets[output], len(data), source), output=output)
    return replace(data, output=output)


def load_data(spec: str | Path, input_shape: Optional[Shapes] = None, numeric: bool = False) -> Dataset:
    """Load data from an .npz file, an image folder, or a `pkg.module:function` hook.

    Args:
        spec: Path to an .npz (arrays `x`, and `y` with integer labels or one-hot; for
            a model with several inputs one array per input named as the input, and
            for several outputs `y_<output name>` per labelled output), a folder with
            one subfolder of images per class, or a hook.
        input_shape: Per-sample input shape of the model (no batch axis; None for
            free dimensions), or one per input name for several inputs (`Shapes`).
            Images are resized to it; every source is checked against it.
        numeric: Keep `y` as the numbers it holds (regression targets, `compressor.metrics`)
            instead of reading it as class labels.

    Returns:
        The dataset.

    Raises:
        DataError: The source is missing or unreadable, or does not fit `input_shape`.
    """
    text = str(spec)
    path = Path(text)
    names = tuple(input_shape) if isinstance(input_shape, Mapping) and len(input_shape) > 1 else ()
    single = _single_shape(input_shape)
    if path.is_dir():
        if numeric:
            raise DataError(f"{text} is an image folder, whose labels are classes; targets come in an .npz's 'y'")
        if names:
            raise DataError(f"an image folder feeds one input, but the model has inputs {', '.join(names)}; "
                            "give an .npz with one array per input, named as the input")
        data = _load_image_folder(path, single)
    elif path.suffix.lower() == ".npz" or path.exists():
        data = _load_npz(path, names, numeric)
    elif _HOOK.match(text):
        data = _load_hook(text, single, numeric)
    else:
        raise DataError(f"data not found: {text} ({_EXPECTED})")
    if input_shape is not None:
        check_fits(data, input_shape)
    return data


def _single_shape(shapes: Optional[Shapes]) -> Optional[Shape]:
    """The one input's shape of `shapes`; None for several inputs or none known."""
    if isinstance(shapes, Mapping):
        return next(iter(shapes.values())) if len(shapes) == 1 else None
    return shapes


_EXPECTED = "expected an .npz file, an image folder, or a hook written pkg.module:function"


def from_arrays(x: Any, y: Any = None, source: str = "arrays", numeric: bool = False) -> Dataset:
    """A Dataset of in-memory arrays, checked as loaded data is (batch first, numeric, finite, labels).

    Args:
        x: Inputs, batch first: one array, or a dict input name -> array for a model
            with several inputs.
        y: Integer labels or one-hot rows, or None; for a model with several outputs,
            a dict output name -> targets (what `y_<name>` arrays of an .npz hold).
        source: How messages name the data.
        numeric: Keep `y` as numbers (regression targets), not class labels.

    Raises:
        DataError: The arrays are not usable data.
    """
    if isinstance(y, Mapping):
        return _finish(x, None, source, targets=y)
    return _finish(x, y, source, numeric)


def is_hook(spec: str | Path) -> bool:
    """Whether `load_data` would read this spec by importing a `pkg.module:function` hook.

    An existing path is always read as data, never imported.
    """
    text = str(spec)
    path = Path(text)
    return not path.exists() and path.suffix.lower() != ".npz" and bool(_HOOK.match(text))


def check_data_spec(spec: str | Path, option: str = "data") -> None:
    """Refuse, before any model work, a data spec that is neither an existing path nor a hook.

    Args:
        spec: What was given for the data option.
        option: The option's name (`data`, `test_data`, ...), for the message.

    Raises:
        DataError: The spec names no existing file or folder and is not a hook.
    """
    path = Path(str(spec))
    if path.exists() or is_hook(spec):
        return
    if path.suffix.lower() == ".npz":
        raise DataError.naming("data file not found: {spec} (given as {%s})" % option, spec=spec)
    raise DataError.naming("data not found: {spec} (given as {%s}; {expected})" % option, spec=spec, expected=_EXPECTED)


def check_labels(data: Dataset, classes: int) -> None:
    """Raise DataError naming the first label the model cannot predict.

    Args:
        data: A loaded dataset (nothing to check without labels).
        classes: The size of the model's output: its number of classes. One output
            column is read as a sigmoid probability, so it takes labels 0 and 1.

    Raises:
        DataError: A label is `classes` or more.
    """
    if data.y is None or not len(data.y):
        return
    limit = max(classes, 2)
    bad = np.flatnonzero(data.y >= limit)
    if not bad.size:
        return
    index = int(bad[0])
    has = "one output (a sigmoid probability)" if classes == 1 else f"{classes} classes"
    raise DataError(
        f"{data.source}: y[{index}] = {int(data.y[index])}, but the model has {has} "
        f"(labels must be 0..{limit - 1})"
    )


def check_fits(data: Dataset, input_shape: Shapes) -> None:
    """Raise DataError naming both shapes (and the input) when samples do not fit the model's inputs.

    Args:
        data: Loaded data.
        input_shape: The per-sample shape of the model's one input, or one per input name.
    """
    if isinstance(input_shape, Mapping) and len(input_shape) == 1 and not isinstance(data.x, dict):
        input_shape = next(iter(input_shape.values()))
    if not isinstance(input_shape, Mapping):
        if isinstance(data.x, dict):
            raise DataError(f"data from {data.source} has arrays {', '.join(data.x)}, but the model has one input; "
                            "give its samples as 'x'")
        _check_fit(data.x, input_shape, data.source, "")
        return
    if not isinstance(data.x, dict):
        raise DataError(f"data from {data.source} has one array of samples, but the model has inputs "
                        f"{', '.join(input_shape)}; give one array per input, named as the input")
    for name, shape in input_shape.items():
        if name not in data.x:
            raise DataError(f"data from {data.source} has no array for input '{name}' "
                            f"(it has {', '.join(data.x) or 'none'}; the model's inputs are {', '.join(input_shape)})")
        _check_fit(data.x[name], shape, data.source, f" for input '{name}'")


def _check_fit(x: np.ndarray, input_shape: Shape, source: str, which: str) -> None:
    got = tuple(x.shape[1:])
    expected = tuple(input_shape)
    fits = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not fits:
        shown = tuple("?" if d is None else d for d in expected)
        raise DataError(f"data from {source} has samples of shape {got}{which}, but the model expects {shown}")


def _finish(x: Any, y: Any, source: str, numeric: bool = False, targets: Optional[Mapping[str, Any]] = None) -> Dataset:
    if isinstance(x, Mapping):
        if not x:
            raise DataError(f"{source}: no input arrays")
        inputs = {str(name): _input_array(values, source, f"input '{name}'") for name, values in x.items()}
        counts = {name: len(values) for name, values in inputs.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"{source}: the inputs have different numbers of samples: "
                            + ", ".join(f"{name} {n}" for name, n in counts.items()))
        x = inputs
    else:
        x = _input_array(x, source, "x")
    n = sample_count(x)
    kept = {}
    for name, values in (targets or {}).items():
        values = np.asarray(values)
        if values.ndim < 1 or len(values) != n:
            raise DataError(f"{source}: {TARGET_PREFIX}{name} has shape {values.shape}, but there are {n} samples")
        kept[str(name)] = values
    if y is not None:
        y = _targets(y, n, source) if numeric else _labels(y, n, source)
    return Dataset(x, y, source, targets=kept)


def _input_array(x: Any, source: str, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise DataError(f"{source}: {name} must be batch-first with at least 2 dimensions, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{source}: {name} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_ or x.dtype.itemsize < 4:
        x = x.astype(np.float32, copy=False)
    _check_finite(x, source, name)
    return x


def _check_finite(x: np.ndarray, source: str, name: str = "x", chunk: int = 4096) -> None:
    """Refuse NaN and infinity in x, naming the first one.

    A NaN input poisons every output it reaches, so an accuracy or a parity check on
    it fails far from its cause; here it is found at load. Scanned in chunks of
    samples so the mask never holds a whole large dataset.
    """
    if not np.issubdtype(x.dtype, np.floating):
        return
    for start in range(0, len(x), chunk):
        bad = ~np.isfinite(x[start : start + chunk])
        if bad.any():
            where = np.unravel_index(int(np.argmax(bad)), bad.shape)
            index = (start + int(where[0]), *(int(i) for i in where[1:]))
            raise DataError(
                f"{source}: {name} holds {float(x[index])} at sample {index[0]} (index {index}); data must be finite"
            )


def _labels(y: Any, n: int, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)  # one-hot or probabilities
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: y must hold integer labels or one-hot rows, got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{source}: x has {n} samples but y has {len(y)} labels")
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{source}: y must be numeric class labels, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: y holds non-integer values; expected class indices or one-hot")
    if y.size and y.min() < 0:
        raise DataError(f"{source}: y holds negative labels; expected class indices from 0")
    return y.astype(np.int64)


def _targets(y: Any, n: int, source: str) -> np.ndarray:
    """`y` as numbers per sample (float32, or int64 when whole), batch first and finite."""
    y = np.asarray(y)
    if y.ndim < 1 or len(y) != n:
        raise DataError(f"{source}: x has {n} samples but y has shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise DataError(f"{source}: y must be numeric targets, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise DataError(f"{source}: y holds values that are not finite; targets must be finite")
        return y.astype(np.float32, copy=False)
    return y.astype(np.int64)


def _load_npz(path: Path, input_names: Sequence[str] = (), numeric: bool = False) -> Dataset:
    """An .npz: `x` (or, for several inputs, one array per name of `input_names`), `y`, `y_<output>` targets."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if input_names:
                missing = [name for name in input_names if name not in keys]
                if missing:
                    raise DataError(
                        f"{path} has no array for input '{missing[0]}'; a model with inputs {', '.join(input_names)} "
                        f"needs one array per input, named as the input (it has {sorted(keys)})"
                    )
                x = {name: archive[name] for name in input_names}
            elif "x" not in keys:
                raise DataError(
                    f"{path} has arrays {sorted(keys)}; expected an array named 'x' "
                    "(and 'y' for labels)"
                )
            else:
                x = archive["x"]
            y = archive["y"] if "y" in keys else None
            targets = {key[len(TARGET_PREFIX):]: archive[key] for key in sorted(keys) if key.startswith(TARGET_PREFIX)}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"could not read {path} as an .npz archive: {exc}") from exc
    return _finish(x, y, str(path), numeric, targets)


def _load_image_folder(root: Path, input_shape: Optional[Shape]) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; expected one subfolder of images per class")
    if input_shape is None or len(input_shape) != 3 or None in tuple(input_shape)[:2]:
        raise DataError(
            f"an image folder needs a model with a fixed (height, width, channels) input; "
            f"got {None if input_shape is None else tuple(input_shape)}"
        )
    height, width, channels = input_shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 3)
    if mode is None:
        raise DataError(f"cannot turn images into {channels} channels; expected 1, 3 or 4")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((int(width), int(height)), Image.BILINEAR)
                    images.append(np.asarray(img, dtype=np.float32).reshape(height, width, -1))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"could not read image {file}: {exc}") from exc
            labels.append(label)
    if not images:
        raise DataError(f"{root} has class folders {classes} but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return _finish(np.stack(images), np.asarray(labels), str(root))


def _load_hook(spec: str, input_shape: Optional[Shape], numeric: bool = False) -> Dataset:
    module_name, func_name = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # The working folder is importable, but last: a stray file there must not shadow an installed module.
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"could not import data hook module '{module_name}': {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"data hook {spec}: '{func_name}' is not a function in {module_name}")
    try:
        result = func()
    except Exception as exc:
        raise DataError(f"data hook {spec} failed: {type(exc).__name__}: {exc}") from exc
    if hasattr(result, "as_numpy_iterator"):
        return from_tf_dataset(result, spec, input_shape, numeric)
    if isinstance(result, tuple) and len(result) == 2:
        return _finish(result[0], result[1], spec, numeric)
    raise DataError(
        f"data hook {spec} returned {type(result).__name__}; expected a tuple (x, y) "
        "of arrays or a tf.data.Dataset of (x, y)"
    )


def from_tf_dataset(dataset: Any, source: str, input_shape: Optional[Shapes] = None, numeric: bool = False) -> Dataset:
    """A Dataset of a finite `tf.data.Dataset` of (x, y) pairs, batched or not, checked as loaded data is.

    Read through the dataset's own `as_numpy_iterator`, so this module imports no TensorFlow.

    Args:
        dataset: A finite tf.data.Dataset whose elements are (x, y) pairs.
        source: How messages and reports name the data.
        input_shape: Per-sample input shape of the model (no batch axis), which tells
            batched elements from single samples; None guesses from the first element.
        numeric: Keep `y` as numbers (regression targets), not class labels.

    Raises:
        DataError: An infinite or empty dataset, elements that are not pairs, or unusable arrays.
    """
    if int(dataset.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
        raise DataError(f"{source}: an infinite dataset; pass a finite one (e.g. .take(n))")
    xs, ys = [], []
    for element in dataset.as_numpy_iterator():
        if not (isinstance(element, tuple) and len(element) == 2):
            raise DataError(f"{source}: dataset elements must be (x, y) pairs")
        xs.append(element[0] if isinstance(element[0], dict) else np.asarray(element[0]))
        ys.append(np.asarray(element[1]))
    if not xs:
        raise DataError(f"{source}: an empty dataset")
    if isinstance(xs[0], dict):
        join = np.concatenate if _is_batched(next(iter(xs[0].values())), ys[0], None) else np.stack
        return _finish({name: join([x[name] for x in xs]) for name in xs[0]}, join(ys), source, numeric)
    batched = _is_batched(xs[0], ys[0], _single_shape(input_shape))
    x = np.concatenate(xs) if batched else np.stack(xs)
    y = np.concatenate(ys) if batched else np.stack(ys)
    return _finish(x, y, source, numeric)


def _is_batched(x: np.ndarray, y: np.ndarray, input_shape: Optional[Shape]) -> bool:
    """Whether dataset elements carry a batch axis (known from the model's input rank)."""
    if input_shape is not None:
        return x.ndim == len(tuple(input_shape)) + 1
    return y.ndim >= 1 and x.ndim >= 2 and len(y) == len(x)
