"""What the stages of one run share: the run context (read-only) and the run (what the stages make).

`RunContext` is fixed before the first stage: the options, the original model, the
data splits, the budget, where outputs are staged, and the log and progress callbacks.
`Run` is what the model stages hand on to each other: the models as they stand and the
record each stage kept (`compressor.pipeline.stages` describes the protocol). The plan
is assembled from the records, so what a replay reads is exactly what the stages wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, TypeVar

from compressor.metrics import TOP1, Metric

if TYPE_CHECKING:
    import keras
    import numpy as np

    from compressor.config import CompressOptions
    from compressor.io.data import Dataset
    from compressor.pipeline.acceptance import Acceptance
    from compressor.search.budgets import Budget
    from compressor.surgery.plan import Plan

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while a long step runs, e.g. ("fine-tuning", 120, 844): optimizer
steps of the current fine-tuning run (each run of a search starts again from 0)."""
Log = Callable[[str], None]
"""Called with one line for people at each step of the run."""


@dataclass(frozen=True)
class Splits:
    """The data of one run, by what it is for.

    Attributes:
        search: What the search measures candidates on (and fine-tuning stops early on).
        held_out: What the report measures the result on; no search sees it.
        train: What fine-tuning and gate training train on.
        guard: Under an accuracy budget, the part of the search data set aside for
            accepting models (`compressor.pipeline.acceptance`): the search never
            measures on it. None: models are accepted on the search data.
    """

    search: Optional[Dataset] = None
    held_out: Optional[Dataset] = None
    train: Optional[Dataset] = None
    guard: Optional[Dataset] = None

    @property
    def labelled_search(self) -> Optional[Dataset]:
        """The search data when it has labels (accuracy can be measured on it), else None."""
        return self.search if self.search is not None and self.search.y is not None else None


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run reads.

    Attributes:
        options: The run's options.
        model: The original model; no stage changes it.
        data: The data splits.
        budget: The budget of the method (None when a plan is replayed without one).
        staging: The folder outputs are written to before they move to `options.out`.
        log: One line per step, for people.
        progress: Progress of long steps.
        metric: What the budget measures (`compressor.metrics`).
        deadline: The `time.perf_counter()` by which the channel search should end
            (`CompressOptions.time_limit` after the run started); None: no limit.
    """

    options: CompressOptions
    model: keras.Model
    data: Splits
    budget: Optional[Budget]
    staging: Path
    log: Log = lambda message: None
    progress: Progress = lambda stage, done, total: None
    metric: Metric = TOP1
    deadline: Optional[float] = None
    _teacher: list[np.ndarray] = field(default_factory=list, compare=False, repr=False)

    def teacher_outputs(self) -> np.ndarray:
        """The original model's outputs for every training sample, computed on the first call of the run.

        Every stage that distils from the original (block removal, the channel search,
        the fine-tuning stage) reads these: one inference pass over the training data
        (83 s for Fashion-MNIST's 48,000 images through a ResNet-20 on 2 cores) instead
        of one per stage.
        """
        if not self._teacher:
            from compressor.distillation import teacher_predictions

            self._teacher.append(teacher_predictions(self.model, self.data.train.x))
        return self._teacher[0]


class StageRecord(Protocol):
    """What a model stage keeps of what it did: enough to replay it, and what the report says about it."""

    def plan_fields(self) -> dict[str, Any]:
        """The fields of the plan this record holds (e.g. {"channels": (...)})."""
        ...


R = TypeVar("R", bound=StageRecord)


@dataclass
class Run:
    """What the model stages made so far.

    Attributes:
        working: The model per-layer edits apply to: the original, or the original
            without its removed channels.
        compressed: The result so far.
        static: The compressed model before gates were added (None: no gates).
        identity: The plan's record of the model it was made for (`model_identity`);
            set from the plan when one is replayed, else when the plan is assembled.
        records: Each stage's record, in stage order.
        acceptance: The guard that accepts models under an accuracy budget (None:
            no guard, the search data decides).
        seconds: Wall time of each model stage that ran (searching or replaying), by stage name.
    """

    working: keras.Model
    compressed: keras.Model
    static: Optional[keras.Model] = None
    identity: Optional[dict[str, Any]] = None
    records: list[StageRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    acceptance: Optional[Acceptance] = None

    def accepts(self, label: str, model: keras.Model) -> bool:
        """Whether the run's guard accepts `model` (always, without a guard)."""
        return self.acceptance is None or self.acceptance.look(label, model)

    def record(self, kind: type[R]) -> Optional[R]:
        """The record of the stage that keeps records of this type, or None when that stage did not run."""
        return next((record for record in self.records if isinstance(record, kind)), None)

    def plan(self) -> Plan:
        """The plan the records make up, for the model of `identity`."""
        from compressor.surgery.plan import Plan

        fields: dict[str, Any] = {}
        for record in self.records:
            fields.update(record.plan_fields())
        return Plan(model=dict(self.identity or {}), **fields)
