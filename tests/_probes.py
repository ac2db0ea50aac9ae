"""Callbacks the tests add to a real ``trainer fit`` through ``--trainer.callbacks+=``."""

from __future__ import annotations

import gc
import json
import os
import sys

import lightning as L


def rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe(L.Callback):
    """Every ``every`` updates, record (step, resident bytes, Python's allocated blocks); write them as JSON.

    Before each sample the run's bounded buffers are emptied, so that a sample reads what the run keeps and
    not how full a buffer happened to be: the events still pending are written (the logger's flush waits for
    its writer thread), and the cyclic garbage is collected. Each pending update holds a few small objects
    until its hand-off, which alone moved the block count by thousands between samples."""

    def __init__(self, path: str, every: int = 500) -> None:
        self.path, self.every = path, every
        self.points: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "flush"):
                experiment.flush()
            gc.collect()
            self.points.append((trainer.global_step, rss_bytes(), sys.getallocatedblocks()))

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            json.dump(self.points, f)


class ModulesProbe(L.Callback):
    """At the end of fit, after every callback's ``on_train_end`` (the figures' end set), write which of
    ``modules`` this process has imported, as a JSON list."""

    def __init__(self, path: str, modules: list[str]) -> None:
        self.path, self.modules = path, modules

    def on_fit_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            json.dump(sorted(m for m in self.modules if m in sys.modules), f)
