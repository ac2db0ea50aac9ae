"""Lightning's checkpoint writer with atomic saves: a checkpoint is never left half-written (see ``trainer.atomic``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from trainer.atomic import atomic_save, is_local


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with ``atomic_save`` for local paths (remote ones are left to fsspec).

    Args:
        fsync: as ``atomic_save``.
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path, fsync=self.fsync)


__all__ = ["AtomicCheckpointIO", "atomic_save"]
