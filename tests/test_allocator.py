"""trainer/allocator.py: glibc's thresholds raised once per process, or left alone on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "from trainer.allocator import retain_freed_memory as r; print(r(), r())"


def _probe(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_thresholds_are_raised_once_on_linux() -> None:
    import ctypes.util

    if "musl" in (ctypes.util.find_library("c") or ""):
        pytest.skip("not glibc")
    assert _probe() == "True True"  # the second call reports the first's outcome


def test_handgrad_malloc_system_leaves_malloc_alone() -> None:
    assert _probe(HANDGRAD_MALLOC="system") == "False False"
