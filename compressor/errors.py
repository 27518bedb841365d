"""Errors a user can act on.

Library functions raise `CompressorError` (or a subclass) with a one-line message
that says what was found and what to do instead. The CLI prints that line and
exits non-zero; it never shows a traceback for these.
"""


class CompressorError(Exception):
    """An error caused by the input (model, data, options), with a readable message."""


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
