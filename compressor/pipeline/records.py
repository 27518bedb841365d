"""What each stage keeps of what it did: typed records, from which the plan and the report are made.

A model stage's record holds its fields of the plan (`plan_fields`), which is all a
replay of the stage reads, and, after a search, the search's own account (None after
a replay) that only the report reads. The output stages (export, timing) keep what they
measured for the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from compressor.surgery.plan import ChannelRemoval, LayerEdit, SkippedLayer

if TYPE_CHECKING:
    import numpy as np

    from compressor.export.verify import ArtifactCheck
    from compressor.finetune import FinetuneResult
    from compressor.search.block_search import BlockResult
    from compressor.search.channel_result import ChannelResult
    from compressor.search.early_exit import ExitOutcome
    from compressor.search.gating import GatingOutcome
    from compressor.search.result import SearchResult


class _StepSearch:
    """What a search that fine-tunes between its steps (blocks, channels) spent on it, read from its `result`."""

    result: Any

    @property
    def epochs(self) -> int:
        """Fine-tuning epochs the search spent between its steps (0 after a replay)."""
        return self.result.epochs if self.result is not None else 0

    @property
    def finetune_steps(self) -> int:
        """Fine-tuning optimizer steps the search spent between its steps (0 after a replay)."""
        return self.result.finetune_steps if self.result is not None else 0


@dataclass(frozen=True)
class BlockRecord(_StepSearch):
    """The block stage: the residual blocks removed whole, by their Add layers' names.

    Attributes:
        removed: The plan's "blocks".
        result: The block search's account (None after a replay).
    """

    removed: tuple[str, ...]
    result: Optional[BlockResult] = None

    def plan_fields(self) -> dict[str, Any]:
        return {"blocks": self.removed}


@dataclass(frozen=True)
class ChannelRecord(_StepSearch):
    """The channel stage: the channels removed, as channels of the groups of the model it started from.

    Attributes:
        removals: Per group, the channels removed (the plan's "channels").
        result: The channel search's account: steps, trials, accuracies (None after a replay).
    """

    removals: tuple[ChannelRemoval, ...]
    result: Optional[ChannelResult] = None

    def plan_fields(self) -> dict[str, Any]:
        return {"channels": self.removals}


@dataclass(frozen=True)
class LayerRecord:
    """The per-layer stage: an edit per compressed layer, and why the others were left alone.

    Attributes:
        edits: The plan's edits, applied to the model without its removed channels.
        skipped: Layers considered and left alone, with reasons.
        statistics: How the data-driven statistics of the edits were gathered (the plan's
            "statistics": data, seed, and "kfac_samples" or "criterion"); None when
            no edit needed any.
        costs: Layer -> (params, FLOPs) after its edit.
        search: The search's account (None after a replay).
    """

    edits: tuple[LayerEdit, ...]
    skipped: tuple[SkippedLayer, ...]
    statistics: Optional[dict[str, Any]] = None
    costs: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    search: Optional[SearchResult] = None

    @property
    def sparse_weights(self) -> bool:
        """Whether some edit leaves zeros in a kernel (a sparsity mask or a sparse residual branch)."""
        from compressor.techniques.registry import has_sparse_weights

        return has_sparse_weights(self.edits)

    def plan_fields(self) -> dict[str, Any]:
        return {"edits": self.edits, "skipped": self.skipped, "statistics": self.statistics}


@dataclass(frozen=True)
class FinetuneRecord:
    """The fine-tuning stage.

    Attributes:
        entry: The plan's "finetune": {"epochs" (all of the run's epochs, channel steps
            included), "epochs_per_run", "steps" (all of its optimizer steps),
            "steps_per_run" (the cap, or None), "learning_rate" (the initial one), "teacher",
            "seed"}; None when nothing was fine-tuned. Plans written before steps were recorded
            lack "steps", before learning rates were, "learning_rate" (they ran at 0.001).
        result: The last fine-tuning run (after the per-layer edits, or the replay's one run).
    """

    entry: Optional[dict[str, Any]]
    result: Optional[FinetuneResult] = None

    def plan_fields(self) -> dict[str, Any]:
        return {"finetune": self.entry}


@dataclass(frozen=True)
class GatingRecord:
    """The gating stage.

    Attributes:
        entry: The plan's "gating" (`compressor.search.gating.gating_record`); None when
            no gates were kept.
        outcome: The gate training's account: attempts, history, why gates were not kept
            (None after a replay).
        flops: Residual block -> FLOPs that skipping it saves, for every residual block
            of the model before gates.
    """

    entry: Optional[dict[str, Any]]
    outcome: Optional[GatingOutcome] = None
    flops: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def plan_fields(self) -> dict[str, Any]:
        return {"gating": self.entry}


@dataclass(frozen=True)
class ExitRecord:
    """The early-exit stage.

    Attributes:
        entry: The plan's "early_exit" (`compressor.pipeline.early_exit.exit_entry`); None
            when no exit was kept.
        outcome: The training and calibration's account (None after a replay).
    """

    entry: Optional[dict[str, Any]]
    outcome: Optional[ExitOutcome] = None

    def plan_fields(self) -> dict[str, Any]:
        return {"early_exit": self.entry}


@dataclass(frozen=True)
class Calibration:
    """The samples int8 quantization is calibrated on, and which split they came from (None: no calibration)."""

    samples: Optional[np.ndarray] = None
    source: Optional[str] = None


@dataclass(frozen=True)
class Baselines:
    """The original model's runtime artifacts, written and verified before any search.

    Converting the original first is the export preflight: a layer that TFLite or ONNX
    cannot take ends the run in one line before the search spends any time.

    Attributes:
        checks: Runtime format -> the original model's artifact, to time ours against.
        seconds: Wall time spent "writing" them and on their "verification".
    """

    checks: Mapping[str, ArtifactCheck] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Exported:
    """The export stage: every artifact written and verified against the model it came from.

    Attributes:
        checks: Our artifacts, in the order of `options.export` (float, then quantized).
        baselines: Runtime format -> the original model's artifact, to time ours against.
        static: The model before gates as TFLite, to time the gated one against (or None).
        seconds: Wall time spent "writing" the artifacts and on their "verification".
    """

    checks: tuple[ArtifactCheck, ...]
    baselines: Mapping[str, ArtifactCheck]
    static: Optional[ArtifactCheck] = None
    seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateMeasurement:
    """What the kept gates do, measured for the report.

    Attributes:
        data: Which data it was measured on: "held-out", else "train".
        static_flops: FLOPs of the model before gates.
        statistics: `compressor.search.gating.gating_statistics` (skip rate per block,
            FLOPs per input); None without data.
    """

    data: str
    static_flops: int
    statistics: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Measured:
    """What the output stages measured, for the report.

    Attributes:
        artifacts: One report entry per artifact (`report.json`'s "artifacts").
        static_tflite: The TFLite model before gates, timed in the same run (or None).
        calibration: The int8 calibration samples.
        gates: What the gates do on data (None: no gates).
        exits: What the early exits do on data, and the artifacts' parity per exit (None: no exits).
    """

    artifacts: list[dict[str, Any]]
    static_tflite: Optional[dict[str, Any]]
    calibration: Calibration
    gates: Optional[GateMeasurement] = None
    exits: Optional[dict[str, Any]] = None  # `compressor.pipeline.early_exit.measure_exits`


def step_tuning(records: list[Any]) -> tuple[int, int]:
    """Fine-tuning epochs and optimizer steps the block and channel searches spent between their steps."""
    searches = [record for record in records if isinstance(record, (BlockRecord, ChannelRecord))]
    return sum(record.epochs for record in searches), sum(record.finetune_steps for record in searches)
