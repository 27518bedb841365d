"""The config file and the command line's flags, merged into `CompressOptions`.

A TOML file (`--config compress.toml`) uses the flags' names, with dashes or
underscores; flags given on the command line win over it. The two opt-ins to running
code only the command line can give (COMMAND_LINE_ONLY): a config file may come from a
less trusted place (a pull request, a shared CI folder) than the command that uses it,
so options from a file that import Python code (custom-objects, and data values that
are `pkg.module:function` hooks) are refused unless `--allow-config-code` is on the
command line. Errors are ConfigError, which words option names as flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from compressor.config import DATA_KEYS, CompressOptions, ConfigError
from compressor.errors import OptionError
from compressor.option_fields import declared

COMMAND_LINE_ONLY = (*(item.name for item in declared(CompressOptions) if "file" not in item.spec.where
                       and "cli" in item.spec.where), "allow_config_code")
"""Opt-ins to running code: flags only, never keys of a config file."""



def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file into option names (dashes become underscores).

    Raises:
        ConfigError: Missing file, invalid TOML, or an unknown key.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found: {file}", file=path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("{file} is not valid TOML: {error}", file=path, error=exc) from exc
    known = {item.name for item in declared(CompressOptions, "file")}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    for key in COMMAND_LINE_ONLY:
        if key in values:
            raise ConfigError("{file}: {key} cannot be set in a config file; it allows code to run, so only the "
                              "command line gives it ({%s})" % key, file=path, key=key.replace("_", "-"))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError("{file}: unknown key(s) {unknown}; expected some of {known}", file=path,
                          unknown=", ".join(unknown), known=", ".join(sorted(k.replace("_", "-") for k in known)))
    return values


def build_options(
    model: Path, flags: Mapping[str, Any], config: Optional[Path] = None, allow_config_code: bool = False
) -> CompressOptions:
    """Merge the TOML file (if any) with the flags given (None = not given); flags win.

    Args:
        model: The model path.
        flags: Option values from the command line; None where a flag was not given.
        config: A TOML file with the same keys.
        allow_config_code: Let the file's options import Python code (custom-objects,
            data hooks); the command line's `--allow-config-code`.

    Raises:
        ConfigError: Invalid or contradictory options, or options from the file that
            would import code without `allow_config_code`.
    """
    from_file: dict[str, Any] = read_toml(config) if config else {}
    given = {key: value for key, value in flags.items() if value is not None}
    if config and not allow_config_code:
        _refuse_config_code(config, {key: value for key, value in from_file.items() if key not in given})
    merged = {**from_file, **given}
    if "out" not in merged:
        raise ConfigError("choose an output folder with {out} DIR")
    try:
        return CompressOptions.parse(model=Path(model), **merged)
    except ConfigError:
        raise
    except OptionError as exc:
        raise ConfigError(exc.template, **exc.values) from exc


def _refuse_config_code(config: Path, used: Mapping[str, Any]) -> None:
    """Refuse the config file's options (those no flag overrides) that would import Python code."""
    from compressor.io.data import is_hook

    if used.get("custom_objects"):
        raise ConfigError("{file}: custom-objects imports Python modules ({modules}); a config file runs no code "
                          "unless {allow_config_code} is given on the command line",
                          file=config, modules=_shown(used["custom_objects"]))
    for key in (*DATA_KEYS, "metric"):
        value = used.get(key)
        if value is not None and is_hook(str(value)):
            raise ConfigError("{file}: {key} = {value!r} is a Python hook (it imports code); a config file runs no "
                              "code unless {allow_config_code} is given on the command line",
                              file=config, key=key.replace("_", "-"), value=str(value))


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
