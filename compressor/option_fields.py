"""Options declared once, as dataclass fields, for every front end that sets them.

An option of `compress` is one field of `CompressOptions` made with `option(...)`: its
name, type and default are the field's; its help, its command-line spelling, how a raw
value is read (`parse`) and what values it takes (`check`) ride in the field's
metadata. The command line (`compressor.cli.options.option_parameters`), the config
file (`compressor.config_file.read_toml`) and the Python API (`compressor.compress`) all
read the same fields, as `transformers.HfArgumentParser` reads dataclass fields.

Help and messages name other options as `{option}` placeholders (see
`compressor.errors.OptionError`): `help_text(spec, flag_name)` words them as flags,
`help_text(spec, python_name)` as keywords.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from compressor.errors import OptionError, word_options

FRONT_ENDS = frozenset({"cli", "file", "api"})
"""Where an option can be given: command-line flags, config-file keys, Python keywords."""

Check = Callable[[str, Any], None]


@dataclass(frozen=True)
class OptionSpec:
    """How the front ends present one option (the dataclass field holds name, type and default).

    Attributes:
        help: One line for `--help` and the API's docs; other options as `{name}`.
        flags: Command-line names when they are not just `--name-with-dashes`: a short
            alias (`("--out", "-o")`) or an on/off pair (`("--int8-io/--float-io",)`).
        cli_type: The flag's value type when the field's type is not one a flag can
            carry as it is (a list given as "a,b", a block size given as "2,2").
        parse: Turns a raw value (flag text, TOML value, Python keyword) into the
            field's value; None keeps it as given.
        check: Raises OptionError when a value is not one the option takes; None
            values (not given) are not checked.
        where: The front ends that offer it (see FRONT_ENDS).
    """

    help: str
    flags: tuple[str, ...] = ()
    cli_type: Optional[type] = None
    parse: Optional[Callable[[Any], Any]] = None
    check: Optional[Check] = None
    where: frozenset[str] = FRONT_ENDS


def option(default: Any = dataclasses.MISSING, *, help: str, **spec: Any) -> Any:
    """A dataclass field that is an option (see `OptionSpec` for the keywords).

    Args:
        default: The value when no front end gives one; omitted for a required option.
        help: One line of help, other options as `{name}` placeholders.
        **spec: `flags`, `cli_type`, `parse`, `check`, `where` (a collection of FRONT_ENDS).
    """
    if "where" in spec:
        spec["where"] = frozenset(spec["where"])
        assert spec["where"] <= FRONT_ENDS, spec["where"]
    return dataclasses.field(default=default, metadata={"option": OptionSpec(help=help, **spec)})


@dataclass(frozen=True)
class Declared:
    """One declared option, as a front end needs it."""

    name: str
    spec: OptionSpec
    default: Any
    annotation: Any

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def declared(cls: type, where: Optional[str] = None) -> Iterator[Declared]:
    """The declared options of a dataclass, in field order; with `where`, those that front end offers."""
    return (item for item in _declared(cls) if where is None or where in item.spec.where)


@functools.lru_cache(maxsize=None)
def _declared(cls: type) -> tuple[Declared, ...]:
    import typing

    hints = typing.get_type_hints(cls)
    return tuple(
        Declared(f.name, f.metadata["option"], f.default, hints[f.name])
        for f in dataclasses.fields(cls)
        if "option" in f.metadata
    )


def help_text(spec: OptionSpec, name_option: Callable[[str], str]) -> str:
    """The option's help with the options it names worded by `name_option` (flag_name or python_name)."""
    return word_options(spec.help, name_option)


def parse_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Each value read by its option's `parse` (None stays None: not given)."""
    specs = {item.name: item.spec for item in declared(cls)}
    out = {}
    for name, value in values.items():
        parse = specs[name].parse if name in specs else None
        out[name] = parse(value) if parse is not None and value is not None else value
    return out


def check_values(instance: Any) -> None:
    """Run every declared option's `check` on the instance's value (None: not given, not checked)."""
    for item in declared(type(instance)):
        value = getattr(instance, item.name)
        if item.spec.check is not None and value is not None:
            item.spec.check(item.name, value)


# --- checks: each raises OptionError saying what was expected and what was received ----------


def one_of(choices: Sequence[str], label: str) -> Check:
    """A value among `choices` (`label` names the option in words: "budget-on", "quantization mode")."""

    def check(name: str, value: Any) -> None:
        if value not in choices:
            _invalid(label, f"one of {tuple(choices)}", name, value)

    return check


def integer(minimum: int, label: str) -> Check:
    """An int (not a bool) of at least `minimum`."""

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _invalid(label, f"an integer >= {minimum}", name, value)

    return check


def open_fraction(label: str) -> Check:
    """A number strictly between 0 and 1."""

    def check(name: str, value: Any) -> None:
        if not _is_number(value) or not 0.0 < value < 1.0:
            _invalid(label, "0 < f < 1", name, value)

    return check


def number(label: str, minimum: Optional[float] = None, above: Optional[float] = None) -> Check:
    """A finite int or float (not a bool), at least `minimum` and more than `above` when given."""

    def check(name: str, value: Any) -> None:
        if (not _is_number(value) or not math.isfinite(value) or (minimum is not None and value < minimum)
                or (above is not None and value <= above)):
            bound = "" if minimum is None else f" >= {minimum:g}"
            bound += "" if above is None else f" > {above:g}"
            _invalid(label, "a number" + bound, name, value)

    return check


def boolean(name: str, value: Any) -> None:
    """True or False."""
    if not isinstance(value, bool):
        _invalid(name, "true or false", name, value)


def text(label: str) -> Check:
    """A non-empty string (a name such as an output's)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            _invalid(label, "a name", name, value)

    return check


def names(label: str) -> Check:
    """A tuple of non-empty strings (what `parse_list` makes)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(item, str) and item for item in value):
            _invalid(label, "a tuple of names", name, value)

    return check


def path(name: str, value: Any) -> None:
    """A path (a str or os.PathLike)."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        _invalid(name, "a path", name, value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(label: str, expected: str, name: str, value: Any) -> None:
    raise OptionError("Invalid {label}. Expected {expected}. Received: {name}={value!r}",
                      label=label, expected=expected, name=name, value=value)


# --- parsers: raw values from a flag, a TOML file or a Python keyword -------------------------


def parse_list(value: Any, name: str, lower: bool = True) -> tuple[str, ...]:
    """Accept "a,b" or ["a", "b"]: a tuple of stripped names without repeats (lower-case unless told).

    Raises:
        OptionError: Neither a string nor a list, or no names at all.
    """
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise OptionError("{%s} must be a comma-separated string or a list. Received: {value!r}" % name, value=value)
    items = [item.strip().lower() if lower else item.strip() for item in items if item.strip()]
    if not items:
        raise OptionError("{%s} is empty" % name)
    return tuple(dict.fromkeys(items))


def list_of(name: str, lower: bool = True) -> Callable[[Any], tuple[str, ...]]:
    """A `parse` for a list option: "a,b" or ["a", "b"]."""
    return lambda value: parse_list(value, name, lower=lower)


def parse_block_size(value: Any) -> Optional[tuple[int, int]]:
    """Accept "2,2", "2x2" or [2, 2].

    Raises:
        OptionError: Not two positive integers.
    """
    if value is None:
        return None
    parts = re.split(r"[,x]", value) if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        rows, cols = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise OptionError("Invalid block size. Expected ROWS,COLS (e.g. 2,2). Received: {value!r}", value=value) from None
    if rows < 1 or cols < 1:
        raise OptionError("Invalid block size. Expected positive ROWS,COLS. Received: {value!r}", value=value)
    return rows, cols


def block_shape(name: str, value: Any) -> None:
    """Two positive ints (what `parse_block_size` makes)."""
    if not (isinstance(value, tuple) and len(value) == 2 and all(type(v) is int and v >= 1 for v in value)):
        _invalid("block size", "positive ROWS,COLS", name, value)


def lowercase(value: Any) -> Any:
    """A name in any case ("INT8 " -> "int8"); other types are left to the check."""
    return value.strip().lower() if isinstance(value, str) else value


def as_path(value: Any) -> Any:
    """A Path from a str or os.PathLike; other types are left to the check."""
    import os

    return Path(value) if isinstance(value, (str, os.PathLike)) else value
