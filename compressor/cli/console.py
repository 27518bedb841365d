"""The one place the CLI talks to the terminal.

Human output (tables, progress) goes to stderr-safe rich consoles; `--json` output is
the only thing written to stdout, so a pipeline can parse it. TensorFlow and the
converters print to stdout on their own (Keras' export prints signatures); while a
command works, `stdout_to_stderr` sends those prints to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Mapping, Optional, TypeVar

import typer
from rich.console import Console

from compressor.errors import CompressorError, flag_name
from compressor.quiet import muted_stderr, stdout_to_stderr  # noqa: F401 - re-exported for the commands

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ and Python logging unless the user asked for it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def load_tensorflow() -> None:
    """Import TensorFlow and Keras with C-level stderr muted.

    TensorFlow's native start-up prints absl and CUDA notices before any log level
    applies; a user of a CPU-only tool gains nothing from them. Python errors
    raised by the import still surface, after stderr is restored.

    Raises:
        CompressorError: TensorFlow or Keras is not installed (a `[runtime]` install).
    """
    if "tensorflow" in sys.modules:
        return
    try:
        with muted_stderr():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name not in ("keras", "tensorflow"):
            raise
        raise CompressorError(
            f"this command needs {exc.name}, which this install lacks (a runtime-only install "
            "runs `compressor bench`): pip install 'compressor[full]'"
        ) from None
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3":
        # tf.function retracing notices: fine-tuning and evaluating many candidate models trace each anew.
        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)


def human_bytes(count: int) -> str:
    """A file size for people: 512 B, 12.3 KiB, 4.5 MiB."""
    if count < 1024:
        return f"{count} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"


def print_json(payload: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


class _Interrupts:
    """Whether Ctrl-C was pressed while a command ran.

    Native code (the TFLite converter, pybind11) can turn the KeyboardInterrupt that
    Ctrl-C raises into another exception, which a writer then wraps as an export
    error. The SIGINT handler records the signal itself, so the command still ends
    as interrupted (exit 130), whatever exception came out.
    """

    def __init__(self) -> None:
        self.seen = False

    @contextlib.contextmanager
    def watch(self) -> Any:
        self.seen = False
        previous = signal.getsignal(signal.SIGINT)
        # Only where Python's own handler is in place (not under SIG_IGN, not in a thread).
        if previous is not signal.default_int_handler or threading.current_thread() is not threading.main_thread():
            yield
            return

        def record(signum: int, frame: Any) -> None:
            self.seen = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, record)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


interrupts = _Interrupts()


def interrupted() -> bool:
    """True when Ctrl-C was pressed during the running command."""
    return interrupts.seen


def handle_errors(func: Optional[F] = None, *, flags: Optional[Mapping[str, str]] = None) -> Any:
    """Turn library errors into one readable line and a non-zero exit code.

    Ctrl-C ends in exit 130 wherever it lands (see `_Interrupts`). Unexpected
    exceptions also end in one line (with a hint); set COMPRESSOR_DEBUG=1 to see the
    traceback. A library error names options as this command's flags: `--max-acc-loss`
    for `max_acc_loss`, or as `flags` says where the flag is spelled otherwise
    (`@handle_errors(flags={"formats": "--format"})`).
    """
    if func is None:
        return lambda command: handle_errors(command, flags=flags)
    renamed = dict(flags or {})

    def name_option(option: str) -> str:
        return renamed.get(option) or flag_name(option)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with interrupts.watch():
            try:
                return func(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt:
                raise fail("interrupted", code=EXIT_INTERRUPTED) from None
            except Exception as exc:  # noqa: BLE001 - last line of defence for the CLI
                if interrupted():
                    raise fail("interrupted", code=EXIT_INTERRUPTED) from None
                if isinstance(exc, CompressorError):
                    raise fail(exc.render(name_option)) from None
                if os.environ.get("COMPRESSOR_DEBUG"):
                    traceback.print_exc()
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise fail(
                    f"unexpected {type(exc).__name__}: {detail} "
                    "(set COMPRESSOR_DEBUG=1 for the traceback)"
                ) from None

    return wrapper  # type: ignore[return-value]
