"""Callbacks that keep a run safe: stop on divergence.

They run at the end of a training batch, before Lightning's ``ModelCheckpoint`` (Lightning always calls
checkpoint callbacks last), so a step that diverged never reaches a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from trainer.errors import DivergenceError
from trainer.optimum import lr_bound


def _cost(outputs: Any) -> Tensor | None:
    cost = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return cost if isinstance(cost, Tensor) else None


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
    return path if path and Path(path).is_file() else None


def stable_lr(x: Tensor, reduction: str, momentum: float = 0.0, weight_decay: float = 0.0) -> float:
    """The lr below which full-batch gradient descent on a linear least-squares model converges.

    ``lr_bound`` is 2/λ_max of the cost's Hessian H. Weight decay adds λ_wd to every eigenvalue of H; with
    heavy-ball momentum μ the iteration is stable for lr·λ < 2(1 + μ). So lr < 2(1 + μ) / (λ_max + λ_wd).
    """
    lam_max = 2.0 / lr_bound(x, reduction)
    denominator = lam_max + weight_decay
    return 2.0 * (1.0 + momentum) / denominator if denominator > 0 else math.inf


class DivergenceGuard(L.Callback):
    """Stop at once, with a ``DivergenceError``, when the cost, a gradient or a parameter is not finite.

    Checked after every update, in one host sync: the step's cost, every gradient and every parameter.
    The message names the step, the lr and, for a linear least-squares model, the stable bound
    (``stable_lr``). Raised before ``ModelCheckpoint`` runs for that step, so nothing non-finite is saved;
    the last good checkpoint is named in the message.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cost = _cost(outputs)
        named = [(n, p) for n, p in pl_module.named_parameters()]
        tensors = [("the cost", cost)] if cost is not None else []
        tensors += [(f"the gradient of {n}", p.grad) for n, p in named if p.grad is not None]
        tensors += [(n, p) for n, p in named]
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
        ok = bool(finite.all())  # the one host sync
        if trainer.world_size > 1:  # all ranks stop together, or the others would wait in the next all-reduce
            ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        if ok:
            return
        bad = [name for (name, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]
        raise DivergenceError(self.message(trainer, pl_module, bad, cost))

    @staticmethod
    def message(trainer: L.Trainer, pl_module: L.LightningModule, bad: list[str], cost: Tensor | None) -> str:
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("lr", getattr(pl_module.hparams, "lr", float("nan")))
        parts = [f"the cost is {cost.item():g}"] if cost is not None and "the cost" in bad else []
        others = [name for name in bad if name != "the cost"]
        if not bad:
            parts.append("another process's cost or gradients are not finite")
        if others:
            listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            parts.append(f"{listed} {'is' if len(others) == 1 else 'are'} not finite")
        text = f"training diverged at step {trainer.global_step} with lr = {lr:g}: {'; '.join(parts)}"
        dm = trainer.datamodule
        if getattr(pl_module, "is_linear", False) and dm is not None and hasattr(dm, "x_train"):
            bound = stable_lr(
                dm.x_train, pl_module.hparams.reduction, group.get("momentum", 0.0), group.get("weight_decay", 0.0)
            )
            text += (
                f"; for this linear model full-batch gradient descent is stable only for lr < {bound:.6g} "
                f"(2/λ_max of the cost's Hessian): set model.lr below that"
            )
        else:
            text += "; lower model.lr (say tenfold), or model.momentum"
        last = _last_checkpoint(trainer)
        text += f". Nothing non-finite was saved; the last good checkpoint is {last}" if last else ""
        return text


def fault_callbacks() -> list[L.Callback]:
    """The callbacks every run of the ``trainer`` command gets, in the order they must run."""
    return [DivergenceGuard()]


__all__ = ["DivergenceGuard", "fault_callbacks", "stable_lr"]
