"""What a budget measures: top-1 (the default), top-5, MSE, MAE, agreement with the original, or a hook.

    metric = resolve_metric("mse")
    values = metric.values(outputs, y)           # per sample: squared error, mean over the output
    scores = metric.scores(values, reference)    # per sample, in the budget's unit (higher is better)
    drop = original_scores.mean() - scores.mean()   # what `max_metric_loss` bounds

Every budget is a drop of a mean of per-sample scores, so one search, one guard and one
report serve every metric:

| metric | per-sample value | score (mean of it is the "accuracy") | the drop is |
|---|---|---|---|
| top1 | label is the highest output | the same (1 or 0) | points of top-1 accuracy |
| top5 | label is among the 5 highest | the same | points of top-5 accuracy |
| agreement | same top-1 class as the original | the same | share of samples whose class changed |
| mse, mae | squared / absolute error, mean over the output | 1 − value / original's mean value | relative increase of the error |
| hook | function(y_true[i:i+1], y_pred[i:i+1]) | the value (negated when lower is better) | absolute change, in the hook's unit |

MSE and MAE budgets are relative to the original's error on the same samples (0.05: at
most 5% more error than the original), because a regression's absolute error has the
unit of its targets, which the tool cannot know; a hook's budget is absolute, in the
unit the hook returns. `agreement` needs no labels: the pipeline labels the samples
with the original model's top-1 classes, after which it is top-1 accuracy.

NumPy and the standard library only: no TensorFlow at import.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from compressor.errors import DataError, OptionError

BUILTIN = ("top1", "top5", "mse", "mae", "agreement")
CLASS_METRICS = ("top1", "top5", "agreement")
"""Metrics whose score is right-or-wrong per sample: `max_acc_loss` may spell their budget."""
_HOOK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Metric:
    """One way of scoring a model's outputs per sample (module docstring).

    Attributes:
        name: "top1", "top5", "mse", "mae", "agreement", or a hook's "pkg.module:function".
        higher_is_better: Whether a larger value of the metric is better.
        binary: Per-sample scores are right (1) or wrong (0): the paired bound on counts applies.
        relative: The budget is relative to the original's value (mse, mae).
        labels: What the data's `y` must hold: "classes", "targets" (arrays like the
            output, or any numbers a hook reads) or None (agreement: no labels needed).
        k: Top-k for class metrics.
        function: A hook's function.
    """

    name: str
    higher_is_better: bool = True
    binary: bool = True
    relative: bool = False
    labels: Optional[str] = "classes"
    k: int = 1
    function: Optional[Callable[[Any, Any], float]] = None

    @property
    def is_top1(self) -> bool:
        """Whether the score is top-1 correctness against `y` (top1, and agreement once labelled)."""
        return self.name in ("top1", "agreement")

    @property
    def unit(self) -> str:
        """The budget's unit in words, for help, logs and the report."""
        if self.binary:
            return "points of top-1 agreement with the original" if self.name == "agreement" else \
                f"points of top-{self.k} accuracy"
        if self.relative:
            return f"relative increase of the {self.name.upper()} over the original's (0.05 = 5% more)"
        return f"absolute change of {self.name} ({'higher' if self.higher_is_better else 'lower'} is better)"

    def values(self, outputs: np.ndarray, y: Any) -> np.ndarray:
        """Per sample, the metric's value from outputs (samples, ...) and labels or targets `y`.

        Class metrics give booleans (right or wrong), the others floats.

        Raises:
            DataError: Labels or targets that do not fit the outputs.
        """
        outputs = np.asarray(outputs)
        n = len(outputs)
        flat = outputs.reshape(n, -1)
        if self.binary:
            return top_k_correct(flat, np.asarray(y), self.k)
        if self.function is not None:
            return np.array([_hook_value(self, np.asarray(y)[i : i + 1], flat[i : i + 1]) for i in range(n)],
                            dtype=np.float64)
        targets = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        if targets.shape != flat.shape:
            raise DataError(f"{self.name} compares targets with outputs: y holds {targets.shape[1]} value(s) per "
                            f"sample, the model outputs {flat.shape[1]}")
        error = flat.astype(np.float64) - targets
        return np.mean(np.square(error) if self.name == "mse" else np.abs(error), axis=1)

    def scores(self, values: np.ndarray, reference: float) -> np.ndarray:
        """Per-sample scores in the budget's unit, higher is better (`reference`: the original's mean value).

        Raises:
            DataError: A relative metric whose original's value is 0 (nothing to be relative to).
        """
        if self.binary:
            return np.asarray(values, bool)
        values = np.asarray(values, np.float64)
        if self.relative:
            if not reference > 0:
                raise DataError(f"the original's {self.name} on this data is {reference:g}: a budget relative to it "
                                "means nothing (is y the model's own output?)")
            return 1.0 - values / reference
        return values if self.higher_is_better else -values

    def to_dict(self) -> dict[str, Any]:
        """The report's `budget.metric`."""
        return {"name": self.name, "higher_is_better": self.higher_is_better, "relative": self.relative,
                "unit": self.unit}


TOP1 = Metric("top1")


def resolve_metric(spec: str = "top1", higher_is_better: Optional[bool] = None) -> Metric:
    """The metric `spec` names: a built-in name, or a "pkg.module:function(y_true, y_pred) -> float" hook.

    Args:
        spec: The metric's name or hook.
        higher_is_better: For a hook: whether larger values are better (required); not
            for the built-in metrics, whose direction is known.

    Raises:
        OptionError: An unknown name, a hook that does not import, or a direction that is
            missing (hook) or not allowed (built-in).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise OptionError("Invalid metric. Expected one of {known} or pkg.module:function. Received: metric={value!r}",
                          known=", ".join(BUILTIN), value=spec)
    spec = spec.strip()
    if spec.lower() in BUILTIN:
        if higher_is_better is not None:
            raise OptionError("{metric_higher_is_better} is for a pkg.module:function metric; {name} has its own "
                              "direction", name=spec.lower())
        return _builtin(spec.lower())
    if not _HOOK.match(spec):
        raise OptionError("Invalid metric. Expected one of {known} or pkg.module:function. Received: metric={value!r}",
                          known=", ".join(BUILTIN), value=spec)
    if higher_is_better is None:
        raise OptionError("metric {hook} is a function: say which way is better with {metric_higher_is_better} "
                          "(or its opposite)", hook=spec)
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module: one line
        raise OptionError("metric {hook}: could not import {module}: {reason}", hook=spec, module=module_name,
                          reason=f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise OptionError("metric {hook}: {module} has no function {function}", hook=spec, module=module_name,
                          function=function_name)
    return Metric(spec, bool(higher_is_better), binary=False, relative=False, labels="targets", function=function)


def _builtin(name: str) -> Metric:
    if name in ("mse", "mae"):
        return Metric(name, higher_is_better=False, binary=False, relative=True, labels="targets")
    if name == "agreement":
        return Metric(name, labels=None)
    return Metric(name, k=5 if name == "top5" else 1)


def output_index(output_names: Sequence[str], requested: Optional[str]) -> int:
    """The index of the output the metric reads: the one `requested` names, or the only one.

    Raises:
        OptionError: A model with several outputs and no name, or a name it does not have.
    """
    names = list(output_names)
    if requested is None:
        if len(names) != 1:
            raise OptionError("the model has {count} outputs ({outputs}): choose the one the metric reads with "
                              "{metric_output}", count=len(names), outputs=", ".join(names))
        return 0
    if requested not in names:
        raise OptionError("the model has no output {name}; its outputs are {outputs} (see {metric_output})",
                          name=requested, outputs=", ".join(names))
    return names.index(requested)


def top_k_correct(outputs: np.ndarray, y: np.ndarray, k: int = 1) -> np.ndarray:
    """Per row of (samples, scores), whether label `y` is among the `k` highest scores.

    k = 1 reads as `compressor.bench.benchmark.top1_classes` (a single column is a sigmoid
    probability thresholded at 0.5); ties count for the label, as in `tf.math.in_top_k`.
    """
    if k == 1 or outputs.shape[1] == 1:
        predicted = (outputs[:, 0] > 0.5).astype(np.int64) if outputs.shape[1] == 1 else outputs.argmax(axis=1)
        return predicted == y
    own = outputs[np.arange(len(outputs)), y.astype(np.int64)]
    return np.sum(outputs > own[:, None], axis=1) < k


def check_targets(metric: Metric, y: Optional[np.ndarray], output_width: int, source: str) -> None:
    """Refuse data whose `y` the metric cannot read, with one line.

    Raises:
        DataError: No `y` where the metric needs labels, or targets of another size than the output.
    """
    if metric.labels is None:
        return
    if y is None:
        raise DataError(f"data from {source} has no 'y'; metric {metric.name} needs "
                        + ("class labels" if metric.labels == "classes" else "targets")
                        + (" (metric agreement needs no labels)" if metric.labels == "classes" else ""))
    if metric.labels == "targets" and metric.function is None:
        width = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
        if width != output_width:
            raise DataError(f"data from {source}: metric {metric.name} compares y with the model's output, but y "
                            f"holds {width} value(s) per sample and the output {output_width}")


def _hook_value(metric: Metric, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    try:
        value = float(metric.function(y_true, y_pred))  # type: ignore[misc]
    except Exception as exc:  # the user's function: one line naming it
        raise DataError(f"metric {metric.name} failed on one sample: {type(exc).__name__}: {exc}") from None
    if not np.isfinite(value):
        raise DataError(f"metric {metric.name} returned {value} for a sample; a metric must be finite")
    return value
