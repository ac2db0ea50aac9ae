"""TF32 matmuls as an explicit opt-in, from the config.

On Ampere and newer GPUs, ``torch.set_float32_matmul_precision("high")`` lets float32 matmuls run on
TensorFloat-32 tensor cores: much faster, with a 10-bit mantissa in the products (about 1e-3 relative
error where float32 has 1e-7). Our gradients are checked against autograd to float32 rounding, so the
default stays ``"highest"`` (true float32); turn it on per run with::

    trainer:
      callbacks:
        - class_path: trainer.tf32.Float32MatmulPrecision
          init_args: {precision: high}

(or, without touching the config, set the environment variable ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``).
The callback acts in every process, including each DDP rank, and restores the previous setting at the end.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

PRECISIONS = ("highest", "high", "medium")


class Float32MatmulPrecision(L.Callback):
    """Set ``torch.set_float32_matmul_precision`` for the run.

    Args:
        precision: ``highest`` (true float32, the default of torch), ``high`` (TF32 products) or
            ``medium`` (bfloat16-class products, where the GPU has them).

    Raises:
        ValueError: for any other value, naming the valid ones.
    """

    def __init__(self, precision: str = "high") -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"Float32MatmulPrecision: precision = {precision!r} is unknown: choose one of {', '.join(PRECISIONS)}"
            )
        self.precision = precision
        self._previous: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)
        tf32 = "off" if self.precision == "highest" else "on"
        rank_zero_info(f"float32 matmul precision: {self.precision} (TF32 {tf32})")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            torch.set_float32_matmul_precision(self._previous)
            self._previous = None


__all__ = ["PRECISIONS", "Float32MatmulPrecision"]
