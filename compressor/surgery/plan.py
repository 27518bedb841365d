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

Each edit names a layer and a registered per-layer technique
(`compressor.techniques.registry`); its other keys are that technique's parameters,
which the technique declares and validates (`compressor.techniques.params`), so a
new technique needs no change here. Every plan written so far is version 1; a new
version gets a reader in `READERS` beside the old ones.

Block removals (optional, "blocks": the Add layers of residual blocks taken out whole,
`compressor.techniques.blocks`) come first. Channel removals (optional) come next:
`compressor.surgery.channels.prune_channels` removes each group's channels (indices of
the groups of the model without those blocks), then the edits apply to the pruned model
(layer names do not change). A plan with "hessian"
edits needs the K-FAC statistics it was made with ("statistics": how they were
gathered), and a plan with "finetune" was fine-tuned after the rewrite: replaying
either recomputes them from data, so weights match the first run only up to
training noise.

Layer names are qualified (`outer/inner`) inside nested models, as in `compressor inspect`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from compressor.errors import CompressorError
from compressor.io.atomic import write_bytes_atomic

PLAN_VERSION = 1
STRUCTURES = ("unstructured", "filter", "channel", "block", "n:m")


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


class Params(Mapping[str, Any]):
    """The parameters of one edit: read-only, hashable, in the technique's declaration order."""

    __slots__ = ("_values",)

    def __init__(self, values: Optional[Mapping[str, Any]] = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._values) == dict(other)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"


@dataclass(frozen=True, init=False)
class LayerEdit:
    """One edit of one layer: a technique and the parameters it declares.

    The technique (`compressor.techniques.registry`) validates the parameters and
    types them, e.g. "tucker" takes `ranks=(R1, R2)` and an optional sparse
    `residual` (a SparsitySpec); "svd" `rank`; "hessian" `ranks`; "sparsity" a
    `sparsity` pattern. Parameters read as attributes too (`edit.ranks`); a
    parameter of another technique reads as None.

        LayerEdit("conv", "tucker", ranks=(4, 3))
        LayerEdit("conv", "tucker", {"ranks": [4, 3]})   # the same edit

    Attributes:
        layer: Qualified layer name.
        technique: A registered per-layer technique.
        params: Its parameters (None values are left out).

    Raises:
        PlanError: An unknown technique, or parameters it does not accept.
    """

    layer: str
    technique: str
    params: Params

    def __init__(self, layer: str, technique: str, params: Optional[Mapping[str, Any]] = None, **named: Any) -> None:
        from compressor.techniques.registry import technique_class  # the registry imports this module

        values = {**dict(params or {}), **named}
        if not isinstance(layer, str) or not isinstance(technique, str):
            raise PlanError(f"an edit needs a layer name and a technique name. Received: layer={layer!r}, technique={technique!r}")
        try:
            declared = technique_class(technique).params
        except PlanError as exc:
            raise PlanError(f"Invalid technique for layer {layer!r}: {exc}") from None
        from compressor.techniques.params import parse_params

        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "technique", technique)
        object.__setattr__(self, "params", Params(parse_params(technique, layer, declared, values)))

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("params")
        if params is None or name.startswith("_"):
            raise AttributeError(name)
        if name in params:
            return params[name]
        from compressor.techniques.registry import parameter_names

        if name in parameter_names():
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute or technique parameter {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """{"layer", "technique", **parameters as JSON} (the plan.json shape of an edit)."""
        from compressor.techniques.params import params_to_json
        from compressor.techniques.registry import technique_class

        return {"layer": self.layer, "technique": self.technique,
                **params_to_json(technique_class(self.technique).params, self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerEdit":
        """Read an edit written by `to_dict`.

        Raises:
            PlanError: Not an object with "layer" and "technique", or invalid parameters.
        """
        if not isinstance(data, Mapping) or "layer" not in data or "technique" not in data:
            raise PlanError(f"malformed plan edit {data!r}: expected an object with 'layer' and 'technique'")
        params = {key: value for key, value in data.items() if key not in ("layer", "technique")}
        return cls(data["layer"], data["technique"], params)


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
        channels: Channel removals, at most one per group, applied first (after the blocks).
        blocks: Residual blocks removed whole (their Add layers' names), before
            anything else (`compressor.techniques.blocks`).
        finetune: How the rewritten model was fine-tuned (None: it was not).
        statistics: How the K-FAC statistics of "hessian" edits were gathered.
        gating: The gates put before residual blocks after all other edits, and how
            they were trained (`compressor.search.gating.gating_record`); None: no gates.
        early_exit: The early exits put after all other edits: their points, thresholds
            and how their heads were trained (`compressor.pipeline.early_exit`); None: no exits.
    """

    model: dict[str, Any]
    edits: tuple[LayerEdit, ...] = ()
    skipped: tuple[SkippedLayer, ...] = ()
    channels: tuple[ChannelRemoval, ...] = ()
    finetune: Optional[dict[str, Any]] = None
    blocks: tuple[str, ...] = ()
    statistics: Optional[dict[str, Any]] = None
    gating: Optional[dict[str, Any]] = None
    early_exit: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        for what, names in (("edits layers", [e.layer for e in self.edits]), ("removes channels of groups", [c.group for c in self.channels]),
                            ("removes blocks", list(self.blocks))):
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
        if self.blocks:
            out["blocks"] = list(self.blocks)
        if self.channels:
            out["channels"] = [removal.to_dict() for removal in self.channels]
        if self.finetune is not None:
            out["finetune"] = dict(self.finetune)
        if self.statistics is not None:
            out["statistics"] = dict(self.statistics)
        if self.gating is not None:
            out["gating"] = dict(self.gating)
        if self.early_exit is not None:
            out["early_exit"] = dict(self.early_exit)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """Read a plan of any version written so far (`READERS`).

        Raises:
            PlanError: Not a plan, a version this code cannot read, or an invalid plan.
        """
        return READERS[check_plan(data)](data)

    def save(self, path: Path | str) -> Path:
        """Write the plan as JSON, atomically."""
        return write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path | str) -> "Plan":
        """Read a plan written by `save` (any version written so far).

        Raises:
            PlanError: Missing file, invalid JSON, or an invalid plan.
        """
        return cls.from_dict(read_plan(path))


def read_plan(path: Path | str) -> dict[str, Any]:
    """The JSON of a plan file, checked as far as possible without TensorFlow (`check_plan`).

    `Plan.load` reads it fully; this is what input checks use before TensorFlow loads
    (a technique's parameters are validated by its class, which imports it).

    Raises:
        PlanError: Missing file, invalid JSON, or a malformed plan.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from exc
    check_plan(data)
    return data


def check_plan(data: Any) -> int:
    """The version of a plan's JSON, after checking its shape and its technique names.

    Raises:
        PlanError: Not an object, an unsupported version, edits that are not objects
            naming a layer and a registered per-layer technique.
    """
    version = data.get("version") if isinstance(data, dict) else None
    if version not in READERS:
        raise PlanError(
            f"unsupported plan: expected a JSON object with version {' or '.join(map(str, READERS))}, "
            f"got version {version if isinstance(data, dict) else type(data).__name__}"
        )
    from compressor.techniques.registry import layer_technique_names  # no TensorFlow

    known = layer_technique_names()
    edits = data.get("edits", [])
    for edit in edits if isinstance(edits, list) else [edits]:
        if not isinstance(edit, dict) or not isinstance(edit.get("layer"), str):
            raise PlanError(f"malformed plan edit {edit!r}: expected an object with 'layer' and 'technique'")
        if edit.get("technique") not in known:
            raise PlanError(
                f"Invalid technique for layer {edit['layer']!r}. Expected one of {known}. "
                f"Received: technique={edit.get('technique')!r}"
            )
    return version


def _read_v1(data: dict[str, Any]) -> Plan:
    """Version 1, every plan written so far: edits as {"layer", "technique", **parameters}.

    Optional keys came later ("channels", "finetune", "statistics", "gating", "blocks", "early_exit"); plans
    without them read as plans without those steps.
    """
    return Plan(
        model=dict(data.get("model", {})),
        edits=tuple(LayerEdit.from_dict(edit) for edit in data.get("edits", [])),
        skipped=tuple(SkippedLayer(**skip) for skip in data.get("skipped", [])),
        channels=tuple(ChannelRemoval.from_dict(removal) for removal in data.get("channels", [])),
        finetune=data.get("finetune"),
        statistics=data.get("statistics"),
        gating=data.get("gating"),
        blocks=_names(data.get("blocks", []), "blocks"),
        early_exit=_early_exit(data.get("early_exit")),
    )


def _early_exit(value: Any) -> Optional[dict[str, Any]]:
    """The plan's early exits: {"points": [names], "thresholds": [one number in (0, 1] each], ...}."""
    if value is None:
        return None
    points = value.get("points") if isinstance(value, dict) else None
    thresholds = value.get("thresholds") if isinstance(value, dict) else None
    if (not isinstance(points, list) or not points or not isinstance(thresholds, list) or len(thresholds) != len(points)
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in thresholds)):
        raise PlanError("plan 'early_exit' must hold 'points' (layer names) and one threshold in (0, 1] per point. "
                        f"Received: {value!r}")
    _names(points, "early_exit.points")
    grid = value.get("grid")  # absent: a plan from before heads pooled to a grid (`replay_exits`)
    if "grid" in value and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
        raise PlanError("plan 'early_exit.grid' must be a whole number >= 1 (cells a side of a head's pooling). "
                        f"Received: {grid!r}")
    return dict(value)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise PlanError(f"plan {key!r} must be a list of layer names. Received: {value!r}")
    return tuple(value)


READERS = {1: _read_v1}
"""Plan version → the function that reads a plan of that version (add one per new version; keep the old)."""
