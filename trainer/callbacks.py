"""Callbacks: stop when the improvement becomes negligible, and say what the run reached."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from trainer.optimum import LeastSquares


class Convergence(L.Callback):
    """ "Once the improvement becomes negligible, the gradient descent algorithm stops."

    Stops when the relative improvement of the training cost, (C_prev − C) / C_prev, stays below ``tol``
    for ``patience`` checks in a row. Under DDP the cost it reads is what ``training_step`` returns: the
    cost over all ranks, from the same all-reduce as the gradients and identical on every rank, so every
    rank stops at the same step.

    Args:
        tol: the relative improvement below which a check counts as negligible; 0 turns the stop off.
        patience: how many negligible checks in a row stop the run.
        min_steps: never stop before this many updates.
        check: ``step`` checks the cost of every update; ``epoch`` checks each epoch's mean cost; ``auto``
            (the default) is ``step`` when an epoch is one update (the whole dataset a step, plain gradient
            descent) and ``epoch`` with mini-batches, whose per-batch cost is too noisy to compare update
            to update (half the updates of a converging SGD run look like no improvement).
    """

    CHECKS = ("auto", "step", "epoch")

    def __init__(self, tol: float = 1e-7, patience: int = 10, min_steps: int = 0, check: str = "auto") -> None:
        if not tol >= 0:
            raise ValueError(f"convergence.tol = {tol!r} is invalid: use a value ≥ 0 (0 turns the stop off)")
        if patience < 1:
            raise ValueError(f"convergence.patience = {patience!r} is invalid: use an integer ≥ 1")
        if check not in self.CHECKS:
            raise ValueError(f"convergence.check = {check!r} is unknown: choose one of {', '.join(self.CHECKS)}")
        self.tol, self.patience, self.min_steps, self.check = tol, patience, min_steps, check
        self.best: float | None = None
        self.previous: float | None = None
        self.negligible = 0
        self.rising = 0  # checks in a row at which the cost went up
        self._epoch_sum = 0.0
        self._epoch_count = 0

    def _per_step(self, trainer: L.Trainer) -> bool:
        if self.check != "auto":
            return self.check == "step"
        # One batch an epoch is the whole set: check every update. With several updates a call
        # (trainer/steps.py) one call can also hold a short epoch of mini-batches, so ask the loader.
        full_batch = getattr(trainer.train_dataloader, "full_batch", None)
        return full_batch if full_batch is not None else trainer.num_training_batches == 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:
            return
        # With several updates per call (model.steps_per_call) the step returns every update's cost.
        if isinstance(outputs, dict) and "cost_values" in outputs:
            values = outputs["cost_values"]  # read from the device once already, by the training step
        else:
            costs = outputs.get("costs", outputs["loss"]) if isinstance(outputs, dict) else outputs
            values = costs.reshape(-1).tolist()
        for value in values:
            if self._per_step(trainer):
                self._check(trainer, pl_module, value)
            else:
                self._epoch_sum += value
                self._epoch_count += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._per_step(trainer) and self._epoch_count:
            self._check(trainer, pl_module, self._epoch_sum / self._epoch_count)
        self._epoch_sum, self._epoch_count = 0.0, 0

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, cost: float) -> None:
        if self.tol <= 0 or not math.isfinite(cost):
            self.previous = cost
            return
        if self.previous is not None and math.isfinite(self.previous):
            improvement = (self.previous - cost) / max(abs(self.previous), 1e-300)
            self.negligible = self.negligible + 1 if improvement < self.tol else 0
            # A cost that rose at every check of the streak is diverging, not converging: let it run on
            # until the divergence guard (or max_steps) stops it, instead of calling it converged.
            self.rising = self.rising + 1 if cost > self.previous else 0
        self.previous = cost
        diverging = self.rising >= self.negligible
        if self.negligible >= self.patience and not diverging and trainer.global_step >= self.min_steps:
            reason = (
                f"converged: the relative improvement of the cost stayed below tol={self.tol:g} "
                f"for {self.patience} checks"
            )
            pl_module.stop_reason = reason
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous,
            "negligible": self.negligible,
            "rising": self.rising,
            "epoch_sum": self._epoch_sum,
            "epoch_count": self._epoch_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["previous"]
        self.negligible = state["negligible"]
        self.rising = state.get("rising", 0)
        self._epoch_sum = state.get("epoch_sum", 0.0)
        self._epoch_count = state.get("epoch_count", 0)


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, saving every 500 updates unless ``every_n_train_steps``,
    ``every_n_epochs`` or ``train_time_interval`` says otherwise, and always saving ``last.ckpt`` at the end
    of training.

    With the whole dataset a step an epoch is one update, so the usual every-epoch save wrote two files per
    update and took most of a small run's time. Every option of ``ModelCheckpoint`` is still a
    ``--checkpoint.*`` key (``every_n_epochs: 1`` brings the per-epoch save back).
    """

    DEFAULT_EVERY_N_TRAIN_STEPS = 500

    def __init__(
        self,
        *args: Any,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: Any = None,
        **kwargs: Any,
    ) -> None:
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_train_steps = self.DEFAULT_EVERY_N_TRAIN_STEPS  # none asked for: by updates, not epochs
        super().__init__(
            *args,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval,
            **kwargs,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last update need not fall on a multiple of every_n_train_steps: keep it, so that
        # `--ckpt_path last` continues from where the run stopped.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def stop_reason(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """Why fitting ended: the reason a callback set, else the trainer's limit that was reached."""
    if getattr(pl_module, "stop_reason", None):
        return pl_module.stop_reason
    if trainer.interrupted:
        return "interrupted"
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            return f"early stopping: {cb.monitor} stopped improving by {cb.min_delta:g} for {cb.patience} checks"
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"max_steps: reached trainer.max_steps={trainer.max_steps}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs:
        return f"max_epochs: reached trainer.max_epochs={trainer.max_epochs}"
    return "stopped"


def run_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """What the run reached: stop reason, steps, epochs, final costs, small models' parameters and, for a
    linear model, the closed-form least-squares optimum and the gap to it."""
    dm = trainer.datamodule
    hp = pl_module.hparams
    summary: dict[str, Any] = {
        "stop_reason": stop_reason(trainer, pl_module),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "final_train_cost": None,
        "final_val_cost": None,
    }
    if dm is not None and hasattr(dm, "x_train"):
        summary["final_train_cost"] = pl_module.full_cost(dm.x_train, dm.y_train)
        if dm.x_val.shape[0]:
            summary["final_val_cost"] = pl_module.full_cost(dm.x_val, dm.y_val)
    if pl_module.classification and dm is not None and hasattr(dm, "x_train"):
        summary["final_train_accuracy"] = _accuracy(pl_module, dm.x_train, dm.y_train)
        if dm.x_val.shape[0]:
            summary["final_val_accuracy"] = _accuracy(pl_module, dm.x_val, dm.y_val)
    scalars = pl_module.named_scalars()
    if scalars is not None:
        summary["parameters"] = scalars
    for callback in trainer.callbacks:  # what callbacks add of their own (the live gradient check's worst)
        items = getattr(callback, "summary_items", None)
        if callable(items):
            summary.update(items())
    if pl_module.is_linear and dm is not None and hasattr(dm, "x_train"):
        solved = LeastSquares.of(dm.x_train, dm.y_train, hp.reduction)  # the monitor's solve, if still valid
        weight, bias, optimum_cost = solved.weight, solved.bias, solved.cost
        lin = pl_module.model.linears[0]
        optimum: dict[str, Any] = {"cost": optimum_cost}
        if weight.shape == (1, 1):
            optimum.update(slope=weight.item(), intercept=bias.item())
        else:
            optimum.update(weight=weight.tolist(), bias=bias.tolist())
        summary["optimum"] = optimum
        w_gap = (lin.weight.detach().double().cpu() - weight).abs().max().item()
        b_gap = (lin.bias.detach().double().cpu() - bias).abs().max().item()
        summary["gap"] = {
            "cost": (summary["final_train_cost"] - optimum_cost) if summary["final_train_cost"] is not None else None,
            "max_abs_parameter": max(w_gap, b_gap),
        }
    return summary


@torch.no_grad()
def _accuracy(pl_module: L.LightningModule, x, y) -> float:
    """The share of examples whose most likely class is the target, in eval mode (no cache kept)."""
    model = pl_module.model
    was_training = model.training
    model.eval()
    accuracy = (model(x).argmax(1) == y).double().mean().item()
    model.train(was_training)
    return accuracy


class Summary(L.Callback):
    """At the end of fit: print a few lines and write ``summary.json`` beside the TensorBoard events."""

    def __init__(self, filename: str = "summary.json", verbose: bool = True) -> None:
        self.filename, self.verbose = filename, verbose
        self.summary: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Measured here, while the model is still on its device: by on_fit_end Lightning has moved it to
        # the CPU, and the data module's tensors are still on the device.
        self.summary = run_summary(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.summary is None:
            self.summary = run_summary(trainer, pl_module)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone
        if not trainer.is_global_zero:
            return
        if log_dir is not None:
            path = Path(log_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
            tmp.replace(path)
            self.summary["path"] = str(path)
        text = format_summary(self.summary)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard's Text tab: the stop reason and what was reached
            experiment.add_text("summary", "    " + text.replace("\n", "\n    "), trainer.global_step)
        if self.verbose:
            print(text)


def format_summary(summary: dict[str, Any]) -> str:
    """A short table of what the run reached."""
    lines = [
        f"stop reason   {summary['stop_reason']}",
        f"steps         {summary['steps']}  (epochs {summary['epochs']})",
    ]
    for key in ("final_train_cost", "final_val_cost"):
        if summary.get(key) is not None:
            lines.append(f"{key.removeprefix('final_').replace('_', ' '):<13} {summary[key]:.6g}")
    if summary.get("final_train_accuracy") is not None:
        val = summary.get("final_val_accuracy")
        tail = f"   val {val:.4f}" if val is not None else ""
        lines.append(f"accuracy      train {summary['final_train_accuracy']:.4f}{tail}")
    optimum = summary.get("optimum", {})
    params = summary.get("parameters")
    if params:
        width = max(len(k) for k in params)
        for name, value in params.items():
            target = optimum.get(name)
            against = f"   closed form {target:.6g}" if isinstance(target, float) else ""
            lines.append(f"  {name:<{width}} {value:.6g}{against}")
    if "optimum" in summary:
        lines.append(f"optimum cost  {optimum['cost']:.6g}  (gap {summary['gap']['cost']:.3g})")
    check = summary.get("gradcheck")
    if check:
        checks = f"{check['checks']} check" + ("" if check["checks"] == 1 else "s")
        at = f" at step {check['at_step']}" if check["max_rel_error"] > 0 else ""  # 0: every check agreed exactly
        lines.append(f"gradcheck     max rel error {check['max_rel_error']:.3g}{at}  ({checks})")
    if "path" in summary:
        lines.append(f"summary       {summary['path']}")
    return "\n".join(lines)


__all__ = ["Convergence", "Summary", "format_summary", "run_summary", "stop_reason"]
