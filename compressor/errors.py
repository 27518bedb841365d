"""Errors a user can act on.

Library functions raise `CompressorError` (or a subclass) with a one-line message
that says what was found and what to do instead. The CLI prints that line and
exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from typing import Callable, Optional


class CompressorError(Exception):
    """An error caused by the input (model, data, options), with a readable message.

    A message that tells the user which option to pass names it as a placeholder
    (`DataError.naming("... pass {data} ...")`), so each front end words it its own way
    (`render`), as OptionError does.
    """

    template: Optional[str] = None
    values: dict = {}

    @classmethod
    def naming(cls, template: str, **values: object) -> "CompressorError":
        """An error of this class whose message names options as `{option}` placeholders."""
        error = cls(word_options(template, python_name, **values))
        error.template, error.values = template, values
        return error

    def render(self, name_option: Callable[[str], str]) -> str:
        """The message with each named option written by `name_option` (`flag_name`, `python_name`)."""
        return str(self) if self.template is None else word_options(self.template, name_option, **self.values)


class OptionError(CompressorError):
    """An option is missing, out of range, or contradicts another.

    The message names options as `{option_name}` placeholders, so that each front end
    words them its own way: the CLI as flags (`--max-acc-loss`), the Python API as
    keyword arguments (`max_acc_loss=`). `str(error)` gives the Python wording.

        raise OptionError("method fixed_loss needs {max_acc_loss} (e.g. 0.02 for 2 points)")
    """

    def __init__(self, template: str, **values: object) -> None:
        super().__init__(word_options(template, python_name, **values))
        self.template, self.values = template, values


def word_options(template: str, name_option: Callable[[str], str], **values: object) -> str:
    """`template` with each `{option}` written by `name_option` and each `{key}` of `values` filled in.

    Option help uses it as OptionError messages do: `word_options("needs {train_data}", flag_name)`.
    """
    return _Placeholders(name_option, values).fill(template)


def python_name(option: str) -> str:
    """An option as the Python API spells it: `max_acc_loss=`."""
    return f"{option}="


def flag_name(option: str) -> str:
    """An option as the command line spells it: `--max-acc-loss`."""
    return "--" + option.replace("_", "-")


class _Placeholders(dict):
    def __init__(self, name_option: Callable[[str], str], values: dict) -> None:
        super().__init__(values)
        self._name_option = name_option

    def __missing__(self, key: str) -> str:
        return self._name_option(key)

    def fill(self, template: str) -> str:
        return template.format_map(self)


class ModelLoadError(CompressorError):
    """The model file is missing, unreadable, or not a model this tool can rewrite."""


class DataError(CompressorError):
    """The data is missing, unreadable, or does not fit the model."""


class ExportError(CompressorError):
    """An artifact could not be converted or written."""


class VerificationError(CompressorError):
    """An artifact was written but does not match the Keras model within tolerance."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
