"""What a technique's edits carry: declared parameters, validated and written as JSON.

A technique declares its parameters as a class attribute, e.g. Tucker-2's

    params = (Param("ranks", RANKS), Param("residual", PATTERN, required=False))

`compressor.surgery.plan.LayerEdit` holds them as a mapping and asks the technique
(through `compressor.techniques.registry`) to parse them, so a new technique needs
no change to the plan. In plan.json they sit beside "layer" and "technique":

    {"layer": "conv2d_2", "technique": "tucker", "ranks": [4, 5]}

This module imports no TensorFlow: plans can be checked before it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from compressor.surgery.plan import PlanError, SparsitySpec

RESERVED = ("layer", "technique")  # the keys of an edit that are not parameters


@dataclass(frozen=True)
class Kind:
    """A parameter type: how a value is read (from JSON or Python) and written as JSON.

    Attributes:
        expected: What a valid value looks like, for error messages ("(R1, R2) >= 1").
        parse: The typed value of a JSON or Python value; raises ValueError or
            TypeError for an invalid one.
        to_json: The JSON form of a typed value.
    """

    expected: str
    parse: Callable[[Any], Any]
    to_json: Callable[[Any], Any] = lambda value: value


@dataclass(frozen=True)
class Param:
    """One parameter of a technique's edits.

    Attributes:
        name: Its key in the edit (and in plan.json); not "layer" or "technique".
        kind: Its type.
        required: Whether every edit of the technique has it (else it may be absent).
    """

    name: str
    kind: Kind
    required: bool = True


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(value)
    return int(value)


def _ranks(value: Any) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(value)
    return (_positive_int(value[0]), _positive_int(value[1]))


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
        raise ValueError(value)
    return float(value)


def _pattern(value: Any) -> SparsitySpec:
    if isinstance(value, SparsitySpec):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(value)
    return SparsitySpec.from_dict(value)


RANK = Kind("an integer >= 1", _positive_int)
RANKS = Kind("(R1, R2) >= 1", _ranks, to_json=list)
FRACTION = Kind("a fraction in (0, 1]", _fraction)
PATTERN = Kind("a sparsity pattern (SparsitySpec)", _pattern, to_json=lambda spec: spec.to_dict())


def parse_params(technique: str, layer: str, declared: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The typed parameters of one edit, in declaration order; absent and None values left out.

    Args:
        technique: The technique's name (for messages).
        layer: The edited layer's name (for messages).
        declared: The technique's parameters.
        values: The edit's values, from JSON or Python.

    Returns:
        Parameter name → typed value.

    Raises:
        PlanError: A parameter the technique does not declare, a required one
            missing, or a value of the wrong kind.
    """
    names = [param.name for param in declared]
    unknown = sorted(key for key, value in values.items() if key not in names and value is not None)
    if unknown:
        raise PlanError(
            f"Invalid parameters of the {technique} edit of {layer!r}. Expected some of {tuple(names)}. "
            f"Received: {', '.join(unknown)}"
        )
    typed = {}
    for param in declared:
        value = values.get(param.name)
        if value is None:
            if param.required:
                raise PlanError(f"{technique} edit of {layer!r} needs {param.name}={param.kind.expected}. Received: None")
            continue
        try:
            typed[param.name] = param.kind.parse(value)
        except PlanError:
            raise
        except (TypeError, ValueError, KeyError):
            raise PlanError(
                f"{technique} edit of {layer!r} needs {param.name}={param.kind.expected}. Received: {value!r}"
            ) from None
    return typed


def params_to_json(declared: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of typed parameters (as `parse_params` returns them)."""
    kinds = {param.name: param.kind for param in declared}
    return {name: kinds[name].to_json(value) for name, value in values.items()}


def check_declared(technique: str, declared: Sequence[Param]) -> None:
    """Refuse a technique whose parameters clash with an edit's own keys or with each other.

    Raises:
        PlanError: A parameter named "layer" or "technique", or two of one name.
    """
    names = [param.name for param in declared]
    clash = sorted(set(names) & set(RESERVED)) or sorted({name for name in names if names.count(name) > 1})
    if clash:
        raise PlanError(f"technique {technique!r} declares parameter(s) {', '.join(clash)} more than once or under a reserved name")
