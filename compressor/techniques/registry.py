"""The techniques by name, and which one a layer gets for the techniques a user asked for.

Users name techniques on the command line (`--techniques tucker,sparsity`):

- "tucker": low-rank. Tucker-2 for k×k Conv2D layers, truncated SVD for 1×1 Conv2D,
  Conv1D and Dense layers.
- "svd": truncated SVD only (1×1 Conv2D, Conv1D, Dense); k×k convolutions are left.
- "hessian": EigenDamage: the layer rotated into the eigenbases of its K-FAC factors
  and cut to its most important directions (1×1 → k×k → 1×1, as Tucker-2). Needs the
  K-FAC statistics, gathered on data before the search (`use_technique`); layers it
  does not apply to fall back to "tucker"/"svd" when those are asked for too.
- "sparsity": alone, masked kernels. With "tucker" or "svd": hybrid, a sparse
  residual on each low-rank edit; layers that cannot be factorized (depthwise,
  grouped, or where factorizing cannot lower the cost) get a masked kernel instead.
- "channels": not a per-layer technique: whole channels of dependency groups are
  removed first (`compressor.search.channels`); the others then edit what is left.
- "gating": not a per-layer technique either: after the static ones, a learned gate
  before each residual block decides per input whether the block runs
  (`compressor.techniques.gating`, trained by `compressor.search.gating`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from compressor.surgery.plan import PlanError
from compressor.techniques.base import Shape, Technique
from compressor.techniques.hessian import Hessian
from compressor.techniques.lowrank import SVD, Tucker
from compressor.techniques.sparsity import Sparsity

TECHNIQUES: dict[str, Technique] = {
    technique.name: technique for technique in (Tucker(), SVD(), Sparsity(), Hessian({}))
}
USER_TECHNIQUES = ("channels", "tucker", "svd", "hessian", "sparsity", "gating")
LAYER_TECHNIQUES = ("tucker", "svd", "hessian", "sparsity")  # the ones that edit single layers


@contextmanager
def use_technique(technique: Technique) -> Iterator[None]:
    """Register a technique instance (e.g. a Hessian holding K-FAC bases) for a block of work."""
    previous = TECHNIQUES[technique.name]
    TECHNIQUES[technique.name] = technique
    try:
        yield
    finally:
        TECHNIQUES[technique.name] = previous


@dataclass(frozen=True)
class Choice:
    """The technique one layer gets.

    Attributes:
        technique: The technique, or None when the layer is left as it is.
        residual: Hybrid: ask the low-rank technique for edits with a sparse residual.
        reason: Why the layer is left as it is (when `technique` is None).
    """

    technique: Optional[Technique]
    residual: bool = False
    reason: Optional[str] = None


def parse_techniques(names: Iterable[str]) -> frozenset[str]:
    """Validate a user's technique names (e.g. from "tucker,sparsity").

    Raises:
        PlanError: An unknown name, or none at all.
    """
    wanted = frozenset(name.strip().lower() for name in names if name.strip())
    unknown = sorted(wanted - set(USER_TECHNIQUES))
    if unknown or not wanted:
        raise PlanError(f"Invalid techniques. Expected some of {USER_TECHNIQUES}. Received: {sorted(wanted)}")
    return wanted


def technique_for(
    layer: Any, wanted: Iterable[str], input_shape: Optional[Shape] = None, output_shape: Optional[Shape] = None
) -> Choice:
    """The technique `layer` gets for the user's technique names (module docstring).

    Args:
        layer: A built layer.
        wanted: The user's technique names.
        input_shape, output_shape: Its call's shapes, batch first, to judge whether
            factorizing lowers its cost (default: its first call).

    Returns:
        The choice; when none applies, `reason` says why, naming the low-rank reason
        first when low-rank was asked for.

    Raises:
        PlanError: Unknown technique names.
    """
    wanted = parse_techniques(wanted)
    candidates = [TECHNIQUES["hessian"]] if "hessian" in wanted else []
    if "tucker" in wanted:
        candidates += [TECHNIQUES["tucker"], TECHNIQUES["svd"]]
    elif "svd" in wanted:
        candidates += [TECHNIQUES["svd"]]
    reasons = []
    for technique in candidates:
        reason = technique.check(layer, input_shape, output_shape)
        if reason is None:
            return Choice(technique, residual="sparsity" in wanted and technique.name != "hessian")
        reasons.append(reason)
    if "sparsity" in wanted:
        reason = TECHNIQUES["sparsity"].check(layer, input_shape, output_shape)
        if reason is None:
            return Choice(TECHNIQUES["sparsity"])
        reasons.append(reason)
    return Choice(None, reason=_best_reason(reasons))


def _best_reason(reasons: list[str]) -> str:
    """The most telling reason: not the one that points to another low-rank technique."""
    telling = [reason for reason in reasons if "use svd" not in reason and "use tucker" not in reason]
    return (telling or reasons or ["no per-layer technique was asked for"])[0]
