"""Files that are never left half-written (torch and the standard library only, so a test can import it
without Lightning).

``torch.save`` goes to a temporary file beside the target, which is flushed to disk and then renamed over
the target with ``os.replace``. A rename within one directory is atomic on POSIX and on Windows, so whoever
opens the path — a reader, or a resume after the process was killed mid-save — finds the old checkpoint or
the new one, never a part of either. A kill mid-save leaves at most a hidden ``.<name>.<pid>.<random>.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import torch


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_save(checkpoint: Any, path: str | os.PathLike, fsync: bool = True) -> None:
    """``torch.save(checkpoint, path)`` through a temporary file and ``os.replace``.

    Args:
        checkpoint: anything ``torch.save`` takes.
        path: the target; its directory is created when missing.
        fsync: flush the file (and the directory entry) to disk, so that a power cut cannot leave the new
            name pointing at unwritten blocks. A killed process needs only the rename.
    """
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: a fresh file, with the permissions the umask gives any other file (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync and hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = ["atomic_save", "is_local"]
