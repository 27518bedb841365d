"""What `compressor bench` measures on data beside latency: one metric per artifact (`compressor.metrics`).

    output, scores = score_artifacts(runners, data, resolve_metric("mse"), "score")
    scores[1].metric_value    # the second artifact's mean squared error on output "score"

The metric reads one output, chosen as `compress` chooses it: the one named (or the one
the data's labels were read for), the only one, or, for the class metrics (top1, top5,
agreement), the first whose last dimension is above 1; numeric metrics (mse, mae, hooks)
on several outputs need it named. Labels come from the data's `y`, or `y_<output>` for
the named output.

`agreement` reads no labels: the FIRST artifact's top-1 classes are them, so the first
artifact agrees with itself (1.0) and each other one says how often it picks the same
class as the reference of the latency ratios.

`accuracy` stays what it always was, the share of top-1 predictions that match class
labels, wherever the data's `y` holds class labels (top1, top5); it is None under the
metrics whose `y` is not classes (mse, mae, hooks) or is not read (agreement).

No TensorFlow: this module runs on target boards (`compressor.bench.remote`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

from compressor.bench.runtime import ArtifactRunner
from compressor.errors import CompressorError, DataError, OptionError
from compressor.io.data import Dataset, with_labels_of
from compressor.metrics import Metric, output_index, top_k_correct


@dataclass(frozen=True)
class ArtifactScore:
    """One artifact's measurement on the data.

    Attributes:
        accuracy: Top-1 accuracy against class labels (top1, top5), else None.
        values: Per sample, the metric's value (`Metric.values`: booleans for class
            metrics, floats for the others); None without data to measure on.
    """

    accuracy: Optional[float] = None
    values: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @property
    def metric_value(self) -> Optional[float]:
        """The metric's mean over the samples: the share right (class metrics), the mean error, the hook's mean."""
        return None if self.values is None else float(np.mean(self.values))


def score_artifacts(
    runners: Sequence[ArtifactRunner], data: Optional[Dataset], metric: Metric, output: Optional[str] = None,
    required: bool = False,
) -> tuple[Optional[str], list[ArtifactScore]]:
    """Each artifact's value of `metric` on `data` (module docstring).

    Args:
        runners: The artifacts, the reference first.
        data: Loaded samples, or None (nothing is measured).
        metric: What to measure.
        output: The output the metric reads, by name (default: `data.output`, else the
            only one, else the first with class scores for a class metric).
        required: Refuse data without the labels the metric needs; otherwise such data
            scores nothing (all None), as unlabelled data always has. No data scores nothing.

    Returns:
        The output read (None: the artifacts' only output), and one score per artifact.

    Raises:
        OptionError: Several outputs and none named for a numeric metric, or a name the
            artifacts do not have.
        CompressorError: A later artifact lacks the output the first one's metric reads.
        DataError: Labels or targets that do not fit the output; with `required`, no labels.
    """
    if data is None:
        return None, [ArtifactScore() for _ in runners]
    if len(data) == 0:
        raise DataError(f"data from {data.source} has no samples")
    if metric.labels is not None and data.y is None and not data.targets:
        if required:
            _refuse_unlabelled(data, metric, output or data.output)
        return None, [ArtifactScore() for _ in runners]  # nothing to score: nothing to run
    first = runners[0].predict_outputs(data.x)
    name = read_output(runners[0].output_names, first, metric, output or data.output)
    data = _labelled(data, name, metric, first)
    if data.y is None:
        if required:
            _refuse_unlabelled(data, metric, name)
        return name, [ArtifactScore() for _ in runners]
    scores = []
    for k, runner in enumerate(runners):
        if k == 0:
            outputs = first[name] if name is not None else next(iter(first.values()))
        else:
            outputs = runner.predict(data.x, output=_checked(runner, name, runners[0]))
        scores.append(_score(runner, outputs.reshape(len(data), -1), data, metric))
    return name, scores


def read_output(names: Sequence[str], outputs: dict[str, np.ndarray], metric: Metric,
                requested: Optional[str]) -> Optional[str]:
    """The output the metric reads (None: the only one), as `compressor.graph.signature.metric_output` chooses.

    Raises:
        OptionError: A name the artifact lacks; several outputs and no name for a
            numeric metric, or none with class scores for a class metric.
    """
    names = list(names)
    if requested is not None:
        return names[output_index(names, requested)]
    if len(names) <= 1:
        return None
    if metric.labels == "targets":
        output_index(names, None)  # several outputs and no name: the error lists them
    scores = [n for n in names if outputs[n].ndim >= 2 and outputs[n].shape[-1] > 1]
    if not scores:
        raise OptionError("the artifacts have outputs {outputs} and none holds class scores; name the output the "
                          "metric reads with {metric_output}", outputs=", ".join(names))
    return scores[0]


def check_scoring(runners: Sequence[ArtifactRunner], data: Optional[Dataset], metric: Metric,
                  output: Optional[str] = None, required: bool = False) -> None:
    """What `score_artifacts` would refuse without running anything: checked before the timing.

    Raises:
        OptionError, DataError: As `score_artifacts` would (but an output with class scores).
    """
    if data is None:
        return
    names = list(runners[0].output_names)
    requested = output or data.output
    if requested is not None:
        requested = names[output_index(names, requested)]
    elif len(names) > 1 and metric.labels == "targets":
        output_index(names, None)
    for runner in runners[1:]:
        _checked(runner, requested, runners[0])
    labelled = data.y is not None or (requested in data.targets if requested is not None else bool(data.targets))
    if required and metric.labels is not None and not labelled:
        _refuse_unlabelled(data, metric, requested)


def _refuse_unlabelled(data: Dataset, metric: Metric, output: Optional[str]) -> None:
    kind = "class labels" if metric.labels == "classes" else "targets"
    where = "'y'" if output is None else f"'y' or 'y_{output}'"
    hint = " (metric agreement needs no labels)" if metric.labels == "classes" else ""
    raise DataError(f"data from {data.source} has no {where}; metric {metric.name} needs {kind}{hint}")


def _labelled(data: Dataset, output: Optional[str], metric: Metric, first: dict[str, np.ndarray]) -> Dataset:
    """The data with `y` as the metric reads it: the output's labels, or (agreement) the first artifact's classes."""
    if metric.name == "agreement":
        outputs = first[output] if output is not None else next(iter(first.values()))
        return replace(data, y=top1_classes(outputs.reshape(len(data), -1)), output=output)
    if output is not None:
        return with_labels_of(data, output, numeric=metric.labels == "targets")
    return data


def _checked(runner: ArtifactRunner, output: Optional[str], first: ArtifactRunner) -> Optional[str]:
    if output is not None and output not in runner.output_names:
        raise CompressorError(
            f"artifacts have different outputs: {first.path.name} has {output!r} but {runner.path.name} has "
            f"{', '.join(runner.output_names)}; benchmark artifacts of the same model together"
        )
    return output


def _score(runner: ArtifactRunner, outputs: np.ndarray, data: Dataset, metric: Metric) -> ArtifactScore:
    if metric.labels == "classes":
        classes = max(outputs.shape[1], 2)
        if int(data.y.max()) >= classes:
            raise DataError(f"data from {data.source} has labels up to {int(data.y.max())}, but "
                            f"{runner.path.name} outputs {outputs.shape[1]} class scores")
    values = metric.values(outputs, data.y)
    accuracy = float(np.mean(top_k_correct(outputs, data.y, 1))) if metric.labels == "classes" else None
    return ArtifactScore(accuracy, values)


def top1_classes(outputs: np.ndarray) -> np.ndarray:
    """The predicted class of each row of (samples, scores): the highest score, or a single sigmoid column at 0.5."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0.5).astype(np.int64)
    return outputs.argmax(axis=1)
