"""The inputs of a run: the model and the data splits, loaded and checked before any stage starts.

    search, held_out = split_data(data, test_fraction=0.5, seed=0)

Accuracy in the report is measured on held-out data the search did not use: `test_data`
when given, else (fixed_loss) a stratified split of `data`; a data-free search
(fixed_params) measures all of `data`. A fixed_loss search splits its search data once
more: `guard_fraction` of it is the guard, which only the acceptance of models sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from compressor.errors import OptionError
from compressor.io.data import Dataset
from compressor.pipeline.context import Log, Splits

if TYPE_CHECKING:
    import keras

    from compressor.metrics import Metric

    from compressor.config import CompressOptions

DATA_OPTIONS = ("data", "test_data", "train_data")


def split_data(data: Dataset, test_fraction: float, seed: int,
               names: tuple[str, str] = ("search split", "held-out split")) -> tuple[Dataset, Dataset]:
    """Split into (search, held-out) parts, stratified by label when there are labels.

    Args:
        data: What to split.
        test_fraction: The share of each class that goes to the second part.
        seed: Seed of the shuffle.
        names: How the two parts are named in messages.

    Raises:
        OptionError: Too few samples to split.
    """
    n = len(data)
    if n < 4:
        raise OptionError("{source} has {n} samples; need at least 4 to split off {part} (or pass {test_data})",
                          source=data.source, n=n, part=names[1])
    rng = np.random.default_rng(seed)
    held = []
    by_class = data.y is not None and data.y.ndim == 1 and np.issubdtype(data.y.dtype, np.integer)
    groups = [np.flatnonzero(data.y == c) for c in np.unique(data.y)] if by_class else [np.arange(n)]
    for idx in groups:
        idx = rng.permutation(idx)
        held.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(n, bool)
    mask[np.asarray(held, int)] = True
    if mask.all() or not mask.any():
        raise OptionError("could not split {source} into a {first} and a {second}; pass more data",
                          source=data.source, first=names[0], second=names[1])

    def part(m: np.ndarray, name: str) -> Dataset:
        return replace(data.select(m), source=f"{data.source} ({name})")

    return part(~mask, names[0]), part(mask, names[1])


@dataclass(frozen=True)
class Inputs:
    """In-memory inputs that stand in for the files the options name (the Python API's model and arrays).

    Attributes:
        model: A Keras graph model, used instead of loading `options.model`.
        data, test_data, train_data: Datasets (`compressor.io.data.from_arrays`) used
            instead of loading the option of the same name.
    """

    model: Optional[keras.Model] = None
    data: Optional[Dataset] = None
    test_data: Optional[Dataset] = None
    train_data: Optional[Dataset] = None


def check_data_and_plan(options: CompressOptions, inputs: Optional[Inputs] = None) -> None:
    """Refuse data options that name nothing, and a plan that does not load (before TensorFlow loads).

    Raises:
        CompressorError: One line naming the input and what is wrong with it.
    """
    from compressor.io.data import check_data_spec
    from compressor.surgery.plan import read_plan

    for key in DATA_OPTIONS:
        spec = getattr(options, key)
        if spec is not None and (inputs is None or getattr(inputs, key) is None):
            check_data_spec(spec, key)
    if options.plan is not None:
        read_plan(options.plan)  # no TensorFlow: the techniques check their parameters when Plan.load reads it


def load_model(options: CompressOptions, inputs: Inputs, log: Log) -> keras.Model:
    """The model of `inputs`, else the one `options.model` names.

    Raises:
        ModelLoadError: A model this tool cannot read or rewrite.
    """
    from compressor.io.models import load_model as load, require_graph_model

    if inputs.model is not None:
        return require_graph_model(inputs.model)
    log(f"loading {options.model}")
    return load(options.model, options.custom_objects, allow_model_code=options.allow_model_code)


def load_splits(model: keras.Model, options: CompressOptions, inputs: Inputs, metric: Optional[Metric] = None,
                log: Log = lambda message: None) -> Splits:
    """The run's data, loaded and checked against the model, split by what it is for.

    Under `metric` agreement every split is labelled with the original's top-1 classes
    (its own labels, if any, are not read), so top-1 accuracy on it is agreement. For a
    model with several outputs the metric reads `options.metric_output` (labels: the
    data's `y_<name>`, or `y`); unnamed, the first output with class scores for a class
    metric (`compressor.graph.signature.metric_output`, with a note to `log`).

    Raises:
        DataError: Data that does not fit the model or the metric.
        OptionError: fixed_loss on unlabelled data, data too small to split, or no such output.
    """
    from compressor.metrics import TOP1

    load = _data_loader(model, options, inputs, metric or TOP1, log)
    data = load("data")
    if options.method == "fixed_loss" and data is not None and data.y is None:
        raise OptionError("method fixed_loss needs labels: {source} has no 'y'", source=data.source)
    test = load("test_data")
    if test is not None:
        search, held_out = data, test
    elif data is None:
        search, held_out = None, None
    elif options.method == "fixed_loss":
        search, held_out = split_data(data, options.test_fraction, options.seed)
    else:
        search, held_out = None, data  # data-free search: all of the data measures the result
    guard = None
    if options.method == "fixed_loss" and options.plan is None and search is not None:
        search, guard = split_data(search, options.guard_fraction, options.seed + 1, ("selection split", "guard split"))
    return Splits(search=search, held_out=held_out, train=load("train_data"), guard=guard)


def _data_loader(model: keras.Model, options: CompressOptions, inputs: Inputs, metric: Metric,
                 log: Log) -> Callable[[str], Optional[Dataset]]:
    """Load an option's data (by option name), checked against the model: samples of its input shapes, labels among its classes.

    In-memory data of `inputs` stands in for the option's file; None when there is neither.
    For a model with several outputs, `y` labels the output the accuracy reads.

    Labels are checked here, right after the model loads, so that a label the model
    cannot predict stops the run before the search rather than at the timing step.
    """
    from compressor.graph.signature import metric_output as choose_output, output_names, sample_shapes
    from compressor.io.data import check_fits, check_labels, load_data, with_labels_of
    from compressor.metrics import check_targets, output_index

    shape = sample_shapes(model)
    outputs = model.outputs
    several = len(outputs) > 1
    if several and options.metric_output is None and metric.labels == "targets":
        output_index(output_names(model), None)  # a metric on numbers: the output must be named
    output, note = choose_output(model, options.metric_output) if several else (None, None)
    index = output_names(model).index(output) if several else 0
    read = outputs[index]
    classes = read.shape[-1] if len(read.shape) >= 2 else None
    width = int(np.prod([d or 1 for d in read.shape[1:]]))
    if note is not None and any(getattr(inputs, key) is not None or getattr(options, key) is not None
                                for key in DATA_OPTIONS):
        log(note)

    def load(option: str) -> Optional[Dataset]:
        data, spec = getattr(inputs, option), getattr(options, option)
        if data is None and spec is None:
            return None
        if data is None:
            data = load_data(spec, input_shape=shape, numeric=metric.labels == "targets")
        else:
            check_fits(data, shape)
        if metric.name == "agreement":
            return _labelled_by(model, data, index, output)
        if output is not None:
            data = with_labels_of(data, output, numeric=metric.labels == "targets")
        if classes is not None and metric.labels == "classes":
            check_labels(data, int(classes))
        if data.y is not None and metric.labels == "targets":
            check_targets(metric, data.y, width, data.source)
        return data

    return load


def _labelled_by(model: keras.Model, data: Dataset, index: int = 0, output: Optional[str] = None) -> Dataset:
    """`data` with the original model's top-1 class of each sample (output `index`) as its label (metric agreement)."""
    from compressor.bench.benchmark import top1_classes
    from compressor.graph.signature import pick_output

    outputs = pick_output(model.predict(data.x, batch_size=256, verbose=0), index)
    outputs = np.asarray(outputs).reshape(len(data), -1)
    return replace(data, y=top1_classes(outputs), output=output)
