"""The error boundary of the ``trainer`` command: bad input becomes one line on stderr, never a traceback.

Exit codes:
    0    the run finished (converged, or reached its limit)
    1    the run started and then diverged (the cost, a gradient or a parameter stopped being finite); also any
         unexpected error, which keeps its traceback because it is a bug
    2    the input cannot start a run: a bad setting, data file, checkpoint or device (nothing was written);
         LightningCLI's own parse errors (an unknown key, a value of the wrong type) exit 2 as well
    130  interrupted by Ctrl-C (during training a checkpoint is saved first)

``--debug`` on the command line, or ``HANDGRAD_DEBUG=1`` in the environment, shows the full traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

from trainer.data import DataError
from trainer.module import ConfigError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HANDGRAD_DEBUG"


class CheckpointError(ValueError):
    """A ``--ckpt_path`` that cannot be resumed from: missing, unreadable, unsafe, or of another model."""


class DeviceError(ValueError):
    """An accelerator or a number of devices this machine does not have."""


class DivergenceError(RuntimeError):
    """Training stopped because the cost, a gradient or a parameter is no longer finite."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a checkpoint; the message says where and how to resume."""


BAD_INPUT = (ConfigError, DataError, CheckpointError, DeviceError)

_OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("trainer", "models"))


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether the traceback was asked for, and ``argv`` without ``--debug`` (LightningCLI does not know it)."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or DEBUG_FLAG in argv, [a for a in argv if a != DEBUG_FLAG]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what caused it: jsonargparse wraps errors raised while it builds our classes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _raised_by_us(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is in ``trainer/`` or ``models/``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OUR_PACKAGES)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for an error the user can fix, or None for a bug (which keeps its traceback).

    Ours are ``ConfigError``, ``DataError``, ``CheckpointError``, ``DeviceError``, a ``ValueError`` raised in
    ``trainer/`` or ``models/`` (SGD, Convergence, the layers), Lightning's ``MisconfigurationException``
    (a Trainer setting that cannot work), and ``DivergenceError`` / ``Interrupted`` from a started run.
    """
    for e in _chain(exc):
        if isinstance(e, Interrupted):
            return EXIT_INTERRUPTED, one_line(e)
        if isinstance(e, DivergenceError):
            return EXIT_FAILED, one_line(e)
        if isinstance(e, BAD_INPUT) or (isinstance(e, ValueError) and _raised_by_us(e)):
            return EXIT_BAD_INPUT, one_line(e)
        if isinstance(e, MisconfigurationException):
            return EXIT_BAD_INPUT, f"trainer: {one_line(e)}"
    return None


__all__ = [
    "BAD_INPUT",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "CheckpointError",
    "DeviceError",
    "DivergenceError",
    "Interrupted",
    "debug_requested",
    "describe",
]
