"""The compression plan: plain, JSON-serializable per-layer edits.

Techniques propose edits; `compressor.surgery.rewrite.rewrite_model` applies them to the
original model. A plan holds no weights: every factorization and mask is recomputed
deterministically from the original weights, so a saved `plan.json` re-applied to the
same model reproduces the compressed model exactly.

    {
      "version": 1,
      "model": {"name": "resnet20", "params": 272474, "fingerprint": "sha256:..."},
      "edits": [
        {"layer": "stage1_block1_conv1", "technique": "tucker", "ranks": [8, 6],
         "residual": {"density": 0.02, "structure": "unstructured"}},
        {"layer": "dense", "technique": "svd", "rank": 4},
        {"layer": "stage3_block3_conv2", "technique": "sparsity",
         "sparsity": {"density": 0.5, "structure": "n:m", "n": 2, "m": 4}}
      ],
      "skipped": [{"layer": "stem_conv", "reason": "factorizing does not lower its cost"}],
      "channels": [{"group": "stage1_block1_conv1", "size": 16, "remove": [3, 7],
                    "criterion": "magnitude"}],
      "finetune": {"epochs": 6, "teacher": "original"}
    }

Channel removals (optional) come first: `compressor.surgery.channels.prune_channels`
removes each group's channels (indices of the original model's groups), then the
edits apply to the pruned model (layer names do not change). A plan with "hessian"
edits needs the K-FAC statistics it was made with ("statistics": how they were
gathered), and a plan with "finetune" was fine-tuned after the rewrite: replaying
either recomputes them from data, so weights match the first run only up to
training noise.

Layer names are qualified (`outer/inner`) inside nested models, as in `compressor inspect`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from compressor.errors import CompressorError
from compressor.io.atomic import write_bytes_atomic

PLAN_VERSION = 1
STRUCTURES = ("unstructured", "filter", "channel", "block", "n:m")
TECHNIQUES = ("tucker", "svd", "sparsity", "hessian")


class PlanError(CompressorError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class SparsitySpec:
    """Which weights are kept, and in what pattern.

    Attributes:
        density: Fraction of weights kept (non-zero), 0 < density <= 1.
        structure: One of STRUCTURES. "filter" zeroes whole output channels,
            "channel" whole input channels, "block" blocks of `block_size` over the
            (input, output) channel axes, "n:m" keeps n of every m consecutive input
            channel weights (density is then n/m).
        block_size: (rows, cols) for "block".
        n, m: For "n:m".
    """

    density: float
    structure: str = "unstructured"
    block_size: Optional[tuple[int, int]] = None
    n: Optional[int] = None
    m: Optional[int] = None

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise PlanError(
                f"Invalid sparsity structure. Expected one of {STRUCTURES}. Received: structure={self.structure!r}"
            )
        if not 0.0 <= self.density <= 1.0:
            raise PlanError(f"Sparsity density must be in [0, 1]. Received: density={self.density}")
        if self.structure == "block":
            if not self.block_size or len(self.block_size) != 2 or min(self.block_size) < 1:
                raise PlanError(f"Block sparsity needs block_size=(rows, cols) >= 1. Received: {self.block_size}")
            object.__setattr__(self, "block_size", tuple(int(v) for v in self.block_size))
        if self.structure == "n:m":
            if not (self.n and self.m and 0 < self.n < self.m):
                raise PlanError(f"n:m sparsity needs 0 < n < m. Received: n={self.n}, m={self.m}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsitySpec":
        data = dict(data)
        if data.get("block_size") is not None:
            data["block_size"] = tuple(data["block_size"])
        return cls(**data)


@dataclass(frozen=True)
class LayerEdit:
    """One edit of one layer.

    Attributes:
        layer: Qualified layer name.
        technique: "tucker" (k×k conv → 1×1, k×k, 1×1 with ranks (r_in, r_out)),
            "hessian" (the same three layers in the K-FAC eigenbasis, ranks (R1, R2)),
            "svd" (1×1 conv, Conv1D or Dense → two layers through `rank`), or
            "sparsity" (same layer, masked kernel).
        ranks: For "tucker": (R1, R2), the input- and output-channel ranks.
        rank: For "svd".
        residual: For "tucker"/"svd": a sparse residual S so that W ≈ factors + S,
            computed in a parallel branch. None: no residual.
        sparsity: For "sparsity": the mask pattern of the kernel.
    """

    layer: str
    technique: str
    ranks: Optional[tuple[int, int]] = None
    rank: Optional[int] = None
    residual: Optional[SparsitySpec] = None
    sparsity: Optional[SparsitySpec] = None

    def __post_init__(self) -> None:
        if self.technique not in TECHNIQUES:
            raise PlanError(
                f"Invalid technique for layer {self.layer!r}. Expected one of {TECHNIQUES}. "
                f"Received: technique={self.technique!r}"
            )
        if self.technique in ("tucker", "hessian"):
            if not self.ranks or len(self.ranks) != 2 or min(self.ranks) < 1:
                raise PlanError(f"{self.technique} edit of {self.layer!r} needs ranks=(R1, R2) >= 1. Received: {self.ranks}")
            object.__setattr__(self, "ranks", (int(self.ranks[0]), int(self.ranks[1])))
        if self.technique == "svd" and not (self.rank and self.rank >= 1):
            raise PlanError(f"svd edit of {self.layer!r} needs rank >= 1. Received: {self.rank}")
        if self.technique == "sparsity" and self.sparsity is None:
            raise PlanError(f"sparsity edit of {self.layer!r} needs a sparsity spec")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "technique": self.technique}
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        if self.rank is not None:
            out["rank"] = self.rank
        if self.residual is not None:
            out["residual"] = self.residual.to_dict()
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerEdit":
        try:
            return cls(
                layer=data["layer"],
                technique=data["technique"],
                ranks=tuple(data["ranks"]) if data.get("ranks") is not None else None,
                rank=data.get("rank"),
                residual=SparsitySpec.from_dict(data["residual"]) if data.get("residual") else None,
                sparsity=SparsitySpec.from_dict(data["sparsity"]) if data.get("sparsity") else None,
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed plan edit {data!r}: {exc}") from exc


@dataclass(frozen=True)
class SkippedLayer:
    """A layer left as it was, with a reason a user can read."""

    layer: str
    reason: str


@dataclass(frozen=True)
class ChannelRemoval:
    """Channels removed from one dependency group (`compressor.graph.groups`).

    Attributes:
        group: The group's name (its first producer's qualified name).
        size: How many channels the group has in the original model.
        remove: Indices (0..size-1) of the removed channels, ascending.
        criterion: The importance score that chose them.
    """

    group: str
    size: int
    remove: tuple[int, ...]
    criterion: str = "magnitude"

    def __post_init__(self) -> None:
        remove = tuple(sorted(int(i) for i in self.remove))
        if len(set(remove)) != len(remove) or (remove and (remove[0] < 0 or remove[-1] >= self.size)):
            raise PlanError(
                f"channel removal of group {self.group!r} must list distinct indices in [0, {self.size}). "
                f"Received: remove={list(self.remove)}"
            )
        if len(remove) >= self.size:
            raise PlanError(f"channel removal of group {self.group!r} removes all {self.size} channels; keep at least one")
        object.__setattr__(self, "remove", remove)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "size": self.size, "remove": list(self.remove), "criterion": self.criterion}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChannelRemoval":
        try:
            return cls(data["group"], int(data["size"]), tuple(data["remove"]), data.get("criterion", "magnitude"))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed channel removal {data!r}: {exc}") from exc


@dataclass(frozen=True)
class Plan:
    """All edits for one model.

    Attributes:
        model: Identity of the model the plan was made for: name, params, fingerprint.
        edits: At most one edit per layer, applied after the channel removals.
        skipped: Layers considered and left alone, with reasons.
        channels: Channel removals, at most one per group, applied first.
        finetune: How the rewritten model was fine-tuned (None: it was not).
        statistics: How the K-FAC statistics of "hessian" edits were gathered.
        gating: The gates put before residual blocks after all other edits, and how
            they were trained (`compressor.search.gating.gating_record`); None: no gates.
    """

    model: dict[str, Any]
    edits: tuple[LayerEdit, ...] = ()
    skipped: tuple[SkippedLayer, ...] = ()
    channels: tuple[ChannelRemoval, ...] = ()
    finetune: Optional[dict[str, Any]] = None
    statistics: Optional[dict[str, Any]] = None
    gating: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        for what, names in (("edits layers", [e.layer for e in self.edits]), ("removes channels of groups", [c.group for c in self.channels])):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise PlanError(f"plan {what} more than once: {', '.join(duplicates)}")

    @property
    def removals(self) -> dict[str, tuple[int, ...]]:
        """Group name → removed channel indices, as `prune_channels` takes them."""
        return {removal.group: removal.remove for removal in self.channels if removal.remove}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": PLAN_VERSION,
            "model": dict(self.model),
            "edits": [edit.to_dict() for edit in self.edits],
            "skipped": [asdict(skip) for skip in self.skipped],
        }
        if self.channels:
            out["channels"] = [removal.to_dict() for removal in self.channels]
        if self.finetune is not None:
            out["finetune"] = dict(self.finetune)
        if self.statistics is not None:
            out["statistics"] = dict(self.statistics)
        if self.gating is not None:
            out["gating"] = dict(self.gating)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"unsupported plan: expected a JSON object with version {PLAN_VERSION}, "
                f"got version {data.get('version') if isinstance(data, dict) else type(data).__name__}"
            )
        return cls(
            model=dict(data.get("model", {})),
            edits=tuple(LayerEdit.from_dict(edit) for edit in data.get("edits", [])),
            skipped=tuple(SkippedLayer(**skip) for skip in data.get("skipped", [])),
            channels=tuple(ChannelRemoval.from_dict(removal) for removal in data.get("channels", [])),
            finetune=data.get("finetune"),
            statistics=data.get("statistics"),
            gating=data.get("gating"),
        )

    def save(self, path: Path | str) -> Path:
        """Write the plan as JSON, atomically."""
        return write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path | str) -> "Plan":
        """Read a plan written by `save`.

        Raises:
            PlanError: Missing file, invalid JSON, or an invalid plan.
        """
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
