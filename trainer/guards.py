"""Callbacks that keep a run safe: stop on divergence, resume the RNG exactly, save on Ctrl-C.

All three run at the end of a training batch, before Lightning's ``ModelCheckpoint`` (Lightning always
calls checkpoint callbacks last), so a step that diverged never reaches a checkpoint, and a checkpoint
saved on Ctrl-C is one ``ModelCheckpoint`` could have written at that step.
"""

from __future__ import annotations

import math
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from trainer.errors import DivergenceError, Interrupted
from trainer.optimum import lr_bound

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with Lightning
    np = None


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


def _numpy_state() -> dict[str, Any] | None:
    if np is None:
        return None
    state = np.random.get_state(legacy=False)
    inner = state["state"]
    # as a tensor and ints, so the checkpoint still loads with weights_only=True (no numpy arrays in it)
    return {
        "bit_generator": state["bit_generator"],
        "key": torch.from_numpy(inner["key"].astype(np.int64)),
        "pos": int(inner["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    key = state["key"].numpy().astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": state["bit_generator"],
            "state": {"key": key, "pos": state["pos"]},
            "has_gauss": state["has_gauss"],
            "gauss": state["gauss"],
        }
    )


class RNGState(L.Callback):
    """Every global random number generator in the checkpoint: torch (CPU and CUDA), Python's, NumPy's.

    Restored when training starts (``on_train_start``), the last moment before the first resumed step, so
    the generators continue exactly as in a run that was never stopped.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state = {"torch": torch.get_rng_state(), "python": {"version": version, "state": list(internal)}}
        state["python"]["gauss"] = gauss
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        numpy_state = _numpy_state()
        if numpy_state is not None:
            state["numpy"] = numpy_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state and np is not None:
            _set_numpy_state(state["numpy"])


class GracefulInterrupt(L.Callback):
    """Ctrl-C (SIGINT) during training finishes the current step, saves ``last.ckpt`` and stops.

    The checkpoint is the one ``ModelCheckpoint`` writes at a step's end, so ``--ckpt_path last`` resumes
    exactly. The run stops with ``Interrupted`` when the next step would begin — after Lightning has logged
    the saved step's cost (and validated, at an epoch's end), so the cost curve has no gap — and the command
    prints where it saved and exits 130. A second Ctrl-C stops at once, as Python's default would.
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved: str | None = None
        self.saved_step = 0
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested, self.saved = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # every rank stops at the same step, or the others would wait forever
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and self.saved is None:
            self.saved, self.saved_step = self.save(trainer), trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved is not None:
            self._restore()
            raise Interrupted(
                f"interrupted at step {self.saved_step}: saved {self.saved}; resume with the same command "
                "and --ckpt_path last (or --ckpt_path of that file)"
            )

    @staticmethod
    def save(trainer: L.Trainer) -> str:
        """Save the state at this step's end as the checkpoint callback's ``last.ckpt``; return its path."""
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.save_last:
            if cb._last_global_step_saved != trainer.global_step or not _last_checkpoint(trainer):
                # ModelCheckpoint's own save of last.ckpt, so it records the step and does not save again
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            return cb.last_model_path
        folder = Path(cb.dirpath) if isinstance(cb, ModelCheckpoint) and cb.dirpath else None
        folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = str(folder / "last.ckpt")
        trainer.save_checkpoint(path)
        return path

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()


def fault_callbacks() -> list[L.Callback]:
    """The callbacks every run of the ``trainer`` command gets, in the order they must run."""
    return [DivergenceGuard(), RNGState(), GracefulInterrupt()]


__all__ = ["DivergenceGuard", "GracefulInterrupt", "RNGState", "fault_callbacks", "stable_lr"]
