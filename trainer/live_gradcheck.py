"""The live gradient check: while training, on the current batch and device, hand-written against autograd.

Every ``every_n_steps`` updates, in ``on_before_optimizer_step`` (the hand-written backward has filled
``.grad``; the parameters have not moved yet), autograd differentiates the very same forward at the same
parameters on the same batch, and two comparisons are made for every parameter:

1. **the step's gradient**: the ``.grad`` the optimizer is about to apply (after the DDP all-reduce)
   against autograd's ∂C/∂θ of the real cost (averaged across ranks the same way);
2. **the backward itself**: the model's hand-written backward, run on the forward's own cache with a
   random upstream gradient G, against autograd's vector-Jacobian product with the same G.

A checked update runs on the kernels autograd runs (``models/gemm.py``: torch's, not oneDNN's, and no
one-neuron shortcut), so a disagreement is the math and not the rounding of another kernel; that the fast
kernels equal these is what ``tests/test_gemm.py`` checks.

Why both: near the optimum the true gradient is a sum of terms that nearly cancel, so it shrinks to the
size of its own rounding error and any two correct ways of computing it disagree in the leading digits.
Comparison 1 therefore measures its error against the larger of |autograd's gradient| and the gradient
a random upstream of the same norm produces (the size of the terms being summed), and comparison 2, which
has no cancellation, checks every layer's backward at full strength at any step.

The relative error of a comparison is ``max|manual − autograd| / scale`` per parameter; the worst over
both comparisons and every parameter is logged as ``gradcheck/max_rel_error``, and above the dtype's
tolerance (``models.gradcheck.tolerance``: 1e-5 for float32) training stops with ``GradientCheckError``
naming the parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from models import gemm
from models.gradcheck import tolerance
from models.layer import Layer
from trainer.module import ConfigError
from trainer.monitor import log_scalars
from trainer.steps import StepGroup


class GradientCheckError(RuntimeError):
    """A hand-written gradient disagrees with autograd beyond the dtype's tolerance."""


@dataclass(frozen=True)
class LiveRow:
    """One parameter's two relative errors: of the step's gradient and of the random-upstream backward."""

    name: str
    layer: str
    dtype: torch.dtype
    step_error: float
    backward_error: float

    @property
    def tol(self) -> float:
        return tolerance(self.dtype)

    @property
    def worst(self) -> float:
        return max(self.step_error, self.backward_error)

    @property
    def ok(self) -> bool:
        return self.worst <= self.tol


def live_check(
    model: Layer,
    loss: Layer,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduce_grads: Callable[[list[Tensor]], list[Tensor]] | None = None,
    reduce_max: Callable[[Tensor], Tensor] | None = None,
) -> list[LiveRow]:
    """Compare the ``.grad`` already in ``model``'s parameters, and its backward, with autograd on (x, y).

    Args:
        model: the model whose parameters hold the hand-written ∂C/∂θ of ``loss(model(x), y)``.
        loss: the cost.
        x, y: the batch those gradients were computed on, on the model's device.
        generator: a CPU generator for the random upstream gradient.
        reduce_grads: combines per-parameter gradients across processes (DDP) exactly as the training step
            combined ``.grad``; applied to autograd's gradient of this process's cost.
        reduce_max: the max of a flat tensor across processes, so that every rank reaches the same verdict.

    An empty batch (a DDP rank's empty shard) contributes zero gradients and has no backward to check.

    Returns one ``LiveRow`` per parameter. The parameters' ``.grad`` and the model's mode are left as they
    were; autograd's graph and the layers' caches are released.
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if x.shape[0] == 0:
        zeros = [torch.zeros_like(p) for p in params]
        step_ref, backward_manual, backward_ref = zeros, zeros, zeros
    else:
        step_ref, backward_manual, backward_ref = _autograd_and_manual(model, loss, x, y, params, generator)
    if reduce_grads is not None:
        step_ref = reduce_grads(step_ref)
    with torch.no_grad():
        stats = []
        for grad, sref, bman, bref in zip(grads, step_ref, backward_manual, backward_ref, strict=True):
            stats += [(grad - sref).abs().max(), sref.abs().max(), (bman - bref).abs().max(), bref.abs().max()]
        stats = torch.stack(stats).to(torch.float64).view(-1, 4)  # per parameter: err, scale, err, scale
        if reduce_max is not None:
            stats = reduce_max(stats.reshape(-1)).view(-1, 4)
        values = stats.tolist()  # the one host transfer
    rows = []
    for name, p, (step_err, step_scale, back_err, back_scale) in zip(names, params, values, strict=True):
        step_scale = max(step_scale, back_scale)  # the size of the summed terms: see the module docstring
        layer = type(model.get_submodule(name.rpartition(".")[0])).__name__ if "." in name else type(model).__name__
        rows.append(
            LiveRow(
                name,
                layer,
                p.dtype,
                step_err / step_scale if step_scale > 0 else step_err,
                back_err / back_scale if back_scale > 0 else back_err,
            )
        )
    return rows


def _autograd_and_manual(model, loss, x, y, params, generator):
    """(autograd's ∂C/∂θ of the real cost, the manual backward of a random upstream G, autograd's of G)."""
    was_training = model.training
    model.train()
    loss.train()
    try:
        with torch.enable_grad():
            pred = model(x)  # (N, K): autograd's graph, and the layers' caches for the manual backward below
            cost = loss(pred, y)
            upstream, *step_ref = torch.autograd.grad(cost, [pred, *params], retain_graph=True)
            g = torch.randn(pred.shape, generator=generator, dtype=pred.dtype).to(pred.device)
            norm = torch.linalg.vector_norm(upstream)
            g = g * torch.where(norm > 0, norm / torch.linalg.vector_norm(g), torch.ones_like(norm))
            backward_ref = torch.autograd.grad(pred, params, grad_outputs=g)
        loss.release()
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.no_grad(), gemm.use("torch"):  # the kernels autograd used, as in the checked update
                model.backward(g)  # consumes the cache of the forward above
                backward_manual = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        finally:
            for p, s in zip(params, saved, strict=True):
                p.grad = s
    finally:
        model.release()
        loss.release()
        model.train(was_training)
    return list(step_ref), backward_manual, list(backward_ref)


class GradientCheck(L.Callback):
    """Check the hand-written gradients against autograd every ``every_n_steps`` updates (0: never).

    Logs ``gradcheck/max_rel_error`` and raises ``GradientCheckError``, which stops training, when a
    parameter's gradient is off by more than its dtype's tolerance. The first check is at step 0.

    Args:
        every_n_steps: check at every update whose index is a multiple of this; 0 turns the check off.
        seed: the seed of the random upstream gradients (drawn from their own generator, so the check
            does not change what training draws).
    """

    def __init__(self, every_n_steps: int = 100, seed: int = 0) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(
                f"gradcheck.every_n_steps = {every_n_steps!r} is invalid: use an integer ≥ 0 (0 turns it off)"
            )
        self.every_n_steps, self.seed = every_n_steps, seed
        self._batch: tuple[Tensor, Tensor] | None = None
        # What the fit's checks found, in constant memory (a record per check would grow with the run):
        # how many ran, and the largest max_rel_error logged with the step it was logged at.
        self.checks = 0
        self.worst: tuple[int, float] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checks, self.worst = 0, None

    def summary_items(self) -> dict[str, Any]:
        """For the run's summary (``run_summary``): the checks this fit made and the worst error found."""
        if self.worst is None:
            return {}
        step, error = self.worst
        return {"gradcheck": {"checks": self.checks, "max_rel_error": error, "at_step": step}}

    def _due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first = trainer.global_step
        if not isinstance(batch, StepGroup):
            self._batch = batch if self._due(first) else None
            self._reference_kernels(pl_module)
            return
        # Several updates a call (model.steps_per_call): the hooks see only the call's last update, so
        # check that one whenever a check falls due within the call.
        used = len(batch)
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            used = min(used, trainer.max_steps - first)
        due = used > 0 and any(self._due(step) for step in range(first, first + used))
        self._batch = batch.batches[used - 1] if due else None
        self._reference_kernels(pl_module)

    def _reference_kernels(self, pl_module: L.LightningModule) -> None:
        # A checked update runs on the kernels autograd runs (BackpropModule.reference_kernels): on others a
        # faster kernel rounds differently, and near the optimum, where the gradient is a sum that nearly
        # cancels, a one-ulp change of the forward shows as a relative error of 1e-5 in float32.
        if hasattr(pl_module, "reference_kernels"):
            pl_module.reference_kernels = self._batch is not None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._batch is None:
            return
        x, y = self._batch
        self._batch = None
        step = trainer.global_step
        distributed = trainer.world_size > 1
        strategy = trainer.strategy
        rows = live_check(
            pl_module.model,
            pl_module.loss,
            x,
            y,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step),
            reduce_grads=(lambda grads: _synced(pl_module, grads, x.shape[0])) if distributed else None,
            reduce_max=(lambda t: strategy.reduce(t, reduce_op="max")) if distributed else None,
        )
        worst = max(rows, key=lambda r: r.worst / r.tol)
        error = max(r.worst for r in rows)
        self.checks += 1
        if self.worst is None or error > self.worst[1]:
            self.worst = (step, error)
        if trainer.is_global_zero:
            log_scalars(trainer, {"gradcheck/max_rel_error": error}, step)
        if not worst.ok:
            raise GradientCheckError(failure_message(rows, step))


@torch.no_grad()
def _synced(pl_module: L.LightningModule, grads: list[Tensor], num_examples: int) -> list[Tensor]:
    """``grads`` combined across ranks by the training step's own all-reduce (``sync_gradients``).

    The same code that combined ``.grad`` (a weighted mean for uneven shards, a sum for ``reduction: sum``)
    combines the reference, so the comparison judges the hand-written gradients and not the reduction.
    """
    params = list(pl_module.model.parameters())
    saved = [p.grad for p in params]
    try:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.detach().clone()
        pl_module.sync_gradients(grads[0].new_zeros(()), num_examples)
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def failure_message(rows: list[LiveRow], step: int) -> str:
    """One line naming every parameter whose gradient failed, worst first."""
    failed = sorted((r for r in rows if not r.ok), key=lambda r: -r.worst / r.tol)
    parts = []
    for r in failed:
        which = "the step's gradient" if r.step_error >= r.backward_error else "the backward with a random upstream"
        parts.append(f"{r.name} ({r.layer}): relative error {r.worst:.3e} in {which}")
    dtype = str(failed[0].dtype).removeprefix("torch.")
    return (
        f"live gradient check failed at step {step}: the hand-written gradient differs from autograd's beyond the "
        f"{dtype} tolerance {failed[0].tol:.0e} for {'; '.join(parts)}. A backward is wrong: run "
        "`trainer check --config <your config>` for the table, or turn the check off with --gradcheck.every_n_steps 0"
    )
