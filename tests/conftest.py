"""Shared test setup: the devices and dtypes the model tests run on, and a fast hypothesis profile.

``device`` and ``dtype`` are parametrized fixtures: a test that takes them runs once per device (CPU, and
CUDA marked ``cuda``) and per float dtype. Tests marked ``cuda`` are skipped where no GPU is present.
Set ``HYPOTHESIS_PROFILE=thorough`` for many more examples per property.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

CUDA = torch.cuda.is_available()

# What this machine can run: "cuda" only when a GPU is present.
DEVICES: list[str] = ["cpu", "cuda"] if CUDA else ["cpu"]

# deadline=None: the first call of a torch op can take far longer than the rest (kernel loading, caches).
settings.register_profile("handgrad", deadline=None, max_examples=25, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "handgrad"))

# The figures' glyph cache (trainer.lettering) of this test session, and of every command it starts: the
# tests neither read a user's cache nor leave files in it.
_GLYPH_CACHE = None if os.environ.get("HANDGRAD_CACHE_DIR") else tempfile.mkdtemp(prefix="handgrad-glyphs-")
if _GLYPH_CACHE:
    os.environ["HANDGRAD_CACHE_DIR"] = _GLYPH_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _GLYPH_CACHE:
        shutil.rmtree(_GLYPH_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``cuda`` where there is no GPU."""
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Session scope: hypothesis refuses function-scoped fixtures in @given tests (they would not be reset per example).
@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Each device in turn: CPU, then CUDA (marked ``cuda``, skipped without a GPU)."""
    return request.param


@pytest.fixture(scope="session", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Each float dtype in turn: float64 (tolerance 1e-12), float32 (1e-5)."""
    return request.param


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """The devices this machine can run: ``["cpu"]``, plus ``"cuda"`` when a GPU is present."""
    return DEVICES


LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE")


@pytest.fixture(autouse=True)
def _fresh_launch_environment():
    """Each test starts with no launcher variables and ends with no process group.

    Lightning leaves a DDP run's MASTER_PORT, LOCAL_RANK, … and its process group behind in the process
    that ran it; the next spawned run would then reuse the port (or take itself for a child).
    """
    import torch.distributed as dist

    saved = {k: os.environ.pop(k) for k in LAUNCH_VARIABLES if k in os.environ}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k in LAUNCH_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update(saved)
