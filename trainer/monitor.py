"""What a run logs besides its cost: the update's scalars, histograms, the lr bound and hparams.

Every scalar is taken in ``on_before_optimizer_step``: the hand-written backward has filled ``.grad`` (and,
under DDP, the gradients are already averaged), but the parameters have not moved yet. So at step k the
parameters, the gradient, the step size and ``train/cost`` all describe the same point θₖ. The values are
gathered into one tensor on the device and read back once, after the update, when the step's own logging
reads the cost anyway: one host transfer per logged step.

Tags (``<name>`` is the parameter's state_dict name; the line's are ``slope`` and ``intercept``):

- ``train/lr``, ``train/grad_norm`` (‖∂C/∂θ‖ over every parameter);
- ``train/step_size/<name>``: lr × gradient, the seed's step size: the value for a one-number parameter,
  else the norm;
- ``params/<name>`` for models with at most ``SCALAR_LIMIT`` numbers (entries as ``<name>[i]``);
- ``train/optimum_gap`` and ``train/lr_bound`` for linear models under the squared error;
- ``weights/<name>`` and ``grads/<name>`` histograms (``Histograms``) for the larger models;
- hparams with the final costs, for TensorBoard's HParams tab.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from trainer.budget import TimeBudget
from trainer.callbacks import Summary, run_summary
from trainer.events import scalar_events
from trainer.module import ConfigError
from trainer.optimum import LeastSquares

SCALAR_LIMIT = 16  # models with at most this many numbers get one curve per number (params/<name>)


class LearningRateWarning(UserWarning):
    """The learning rate is at or above the bound beyond which gradient descent diverges."""


def display_names(pl_module: L.LightningModule) -> dict[str, str]:
    """Each parameter's state_dict name → the name it is logged under (``slope``/``intercept`` for the line)."""
    names = {name: name for name, _ in pl_module.model.named_parameters()}
    if pl_module.is_linear and pl_module.model.linears[0].weight.shape == (1, 1):
        names.update({"0.weight": "slope", "0.bias": "intercept"})
    return names


def scalar_names(pl_module: L.LightningModule) -> list[str]:
    """One name per number of the model, in ``torch.cat([p.reshape(-1) for p in parameters])`` order."""
    names = display_names(pl_module)
    out = []
    for name, p in pl_module.model.named_parameters():
        label = names[name]
        out.extend([label] if p.numel() == 1 else [f"{label}[{i}]" for i in range(p.numel())])
    return out


def num_scalars(pl_module: L.LightningModule) -> int:
    return sum(p.numel() for p in pl_module.model.parameters())


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram") and hasattr(experiment, "add_image"):
            return experiment
    return None


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` to every logger; to TensorBoard as one event rather than one per scalar
    (``add_scalar`` writes an event per value, about 29 µs each; see ``trainer/events.py``)."""
    for logger in trainer.loggers:
        events = scalar_events(logger)
        if events is not None:
            events.write([(step, metrics)])
        else:
            logger.log_metrics(metrics, step=step)


class Monitor(L.Callback):
    """Scalars of every logged update, the learning-rate bound of linear models, and hparams at the end.

    Args:
        every_n_steps: log the scalars every this many updates; None follows ``trainer.log_every_n_steps``,
            0 turns them off.
        warn_lr: warn before training when the learning rate is at or above the bound (linear models).
    """

    def __init__(self, every_n_steps: int | None = None, warn_lr: bool = True) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 0):
            raise ConfigError(
                f"monitor.every_n_steps = {every_n_steps!r} is invalid: use an integer ≥ 0 (0 turns it off), "
                "or null for trainer.log_every_n_steps"
            )
        self.every_n_steps, self.warn_lr = every_n_steps, warn_lr
        self.quadratic: LeastSquares | None = None
        self.lr_bound: float | None = None
        self._pending: tuple[int, float, Tensor] | None = None  # (step, lr, the values to read back)

    # ------------------------------------------------------------------ before training

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = display_names(pl_module)
        self._small = num_scalars(pl_module) <= SCALAR_LIMIT
        self._scalar_names = scalar_names(pl_module) if self._small else []
        self._shapes = [(name, p.shape, p.numel()) for name, p in pl_module.model.named_parameters()]
        self._params = [p for p in pl_module.model.parameters()]
        dm = trainer.datamodule
        self.quadratic = self.lr_bound = None
        if pl_module.is_linear and dm is not None and hasattr(dm, "x_train"):
            self.quadratic = LeastSquares.of(dm.x_train, dm.y_train, pl_module.hparams.reduction)
            group = trainer.optimizers[0].param_groups[0]
            self.lr_bound = self.quadratic.lr_bound(
                momentum=group.get("momentum", 0.0),
                weight_decay=group.get("weight_decay", 0.0),
                batch_size=getattr(dm, "batch_size", None),
            )
            if trainer.is_global_zero:
                log_scalars(trainer, {"train/lr_bound": self.lr_bound}, trainer.global_step)
            if self.warn_lr and group["lr"] >= self.lr_bound:
                rank_zero_warn(self._lr_message(group["lr"]), category=LearningRateWarning)

    def _lr_message(self, lr: float) -> str:
        bound = self.lr_bound
        lam = self.quadratic.hessian_eigenvalues().max().item()
        return (
            f"model.lr = {lr:g} is at or above {bound:.4g}, the learning rate from which gradient descent diverges "
            f"on this data: 2(1 + momentum)/(λ_max + weight_decay), λ_max = {lam:.4g} the largest eigenvalue of the "
            f"cost's Hessian. The cost will grow instead of shrinking. Use a learning rate below {bound:.4g}, "
            f"e.g. --model.lr {bound / 2:.3g}"
        )

    # ------------------------------------------------------------------ every update

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        n = trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps
        # the steps Lightning logs train/cost at (label k when (k + 1) % n == 0), so the curves line up
        return bool(n) and (step + 1) % n == 0 and trainer.is_global_zero and bool(trainer.loggers)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step
        if not self._due(trainer, step):
            return
        params = self._params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # One flat tensor, read back after the update: every parameter's gradient norm, the gradient of each
        # one-number parameter (its step size keeps its sign), and for small or linear models the parameters.
        pieces = [torch.stack(torch._foreach_norm(grads))]
        pieces += [g.reshape(1) for g in grads if g.numel() == 1]
        if self._small or self.quadratic is not None:
            pieces += [p.detach().reshape(-1) for p in params]
        self._pending = (step, float(optimizer.param_groups[0]["lr"]), torch.cat(pieces))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is None:
            return
        step, lr, flat = self._pending
        self._pending = None
        values = flat.tolist()  # the one host transfer
        shapes = self._shapes
        norms, values = values[: len(shapes)], values[len(shapes) :]
        singles = iter(values[: sum(n == 1 for _, _, n in shapes)])
        values = values[sum(n == 1 for _, _, n in shapes) :]
        metrics = {"train/lr": lr, "train/grad_norm": math.sqrt(sum(n * n for n in norms))}
        for (name, _, numel), norm in zip(shapes, norms, strict=True):
            metrics[f"train/step_size/{self._names[name]}"] = lr * (next(singles) if numel == 1 else norm)
        if self._small:
            metrics.update(zip((f"params/{n}" for n in self._scalar_names), values, strict=True))
        if self.quadratic is not None:
            (_, w_shape, w_numel), (_, b_shape, _) = shapes
            weight = torch.tensor(values[:w_numel], dtype=torch.float64).reshape(w_shape)
            bias = torch.tensor(values[w_numel:], dtype=torch.float64).reshape(b_shape)
            metrics["train/optimum_gap"] = self.quadratic.gap(weight, bias)
        log_scalars(trainer, metrics, step)

    # ------------------------------------------------------------------ at the end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        # the summary callback's, when it has already measured this fit's end (it comes first among the CLI's
        # callbacks): the final costs and accuracies are a pass over the whole data set each
        made = (cb.summary for cb in trainer.callbacks if isinstance(cb, Summary) and cb.summary is not None)
        summary = next(made, None) or run_summary(trainer, pl_module)
        gap = (summary.get("gap") or {}).get("cost")
        if self.quadratic is not None:  # exact, where the difference of two costs rounds
            lin = pl_module.model.linears[0]
            gap = self.quadratic.gap(lin.weight, lin.bias)
        metrics = {
            "hp/train_cost": summary.get("final_train_cost"),
            "hp/val_cost": summary.get("final_val_cost"),
            "hp/train_accuracy": summary.get("final_train_accuracy"),
            "hp/val_accuracy": summary.get("final_val_accuracy"),
            "hp/optimum_gap": gap,
            "hp/lr_bound": self.lr_bound,
            "hp/steps": summary["steps"],
            "hp/gradcheck_max_rel_error": (summary.get("gradcheck") or {}).get("max_rel_error"),
        }
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        params = hparams(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)


def hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The run's settings as TensorBoard's HParams tab takes them: numbers, strings and booleans."""
    out: dict[str, Any] = {}
    for key, value in pl_module.hparams.items():
        out[f"model.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    dm = trainer.datamodule
    if dm is not None:
        out["data"] = type(dm).__name__
        batch = getattr(dm, "batch_size", None)
        out["data.batch_size"] = "full" if batch is None else int(batch)
        if hasattr(dm, "x_train"):
            out["data.train_examples"] = int(dm.x_train.shape[0])
    out["trainer.max_steps"] = int(trainer.max_steps)
    return out


class Histograms(L.Callback):
    """``weights/<name>`` and ``grads/<name>`` histograms for models too large for one curve per number.

    Taken in ``on_before_optimizer_step`` (the weights of step k and their gradient), at most every
    ``every_n_steps`` updates and within ``max_overhead`` of the training time (see ``TimeBudget``). Each
    set is one event of ``HISTOGRAM_BINS`` equal buckets per histogram (``histogram_value``).

    Args:
        every_n_steps: at most once per this many updates; 0 turns them off.
        max_overhead: the share of training time they may take, in (0, 1].
    """

    def __init__(self, every_n_steps: int = 100, max_overhead: float = 0.005) -> None:
        self.budget = TimeBudget(every_n_steps, max_overhead, key="histograms")
        self._writer = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budget.start()
        big = num_scalars(pl_module) > SCALAR_LIMIT
        self._writer = tensorboard_writer(trainer) if trainer.is_global_zero and big else None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._writer is None:  # a small model, or not rank 0: nothing to do, so no step to look up
            return
        step = trainer.global_step
        if not self.budget.due(step):
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        with self.budget.timed(step):
            values = []
            for name, p in pl_module.model.named_parameters():
                values.append(histogram_value(f"weights/{name}", p))
                if p.grad is not None:
                    values.append(histogram_value(f"grads/{name}", p.grad))
            self._writer._get_file_writer().add_summary(Summary(value=[v for v in values if v is not None]), step)


HISTOGRAM_BINS = 30  # equal buckets from the smallest value to the largest, as TensorBoard's own summaries


def histogram_value(tag: str, values: Tensor) -> Any:
    """A TensorBoard histogram of the finite entries of ``values`` (None if there are none): their count,
    min, max, sum and sum of squares, and ``HISTOGRAM_BINS`` equal buckets between min and max (float64).

    ``SummaryWriter.add_histogram`` uses about 1500 exponential buckets, of which it keeps those between the
    extremes: events 15 times larger, and TensorBoard's writer checksums every byte in Python.
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    v = values.detach().double().reshape(-1).cpu().numpy()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    counts, edges = np.histogram(v, bins=HISTOGRAM_BINS)
    histo = HistogramProto(
        min=float(v.min()),
        max=float(v.max()),
        num=float(v.size),
        sum=float(v.sum()),
        sum_squares=float(v @ v),
        bucket_limit=edges[1:].tolist(),  # each bucket's right edge; TensorBoard takes min as the first left edge
        bucket=counts.tolist(),
    )
    return Summary.Value(tag=tag, histo=histo)
