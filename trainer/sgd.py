"""The hand-written update  p ← p − lr·(∂C/∂p + weight_decay·p), with optional heavy-ball momentum.

The gradient descent of the seed, in the seed's words: step size = learning rate × gradient, and
new value = old value − step size. With momentum μ the step follows a velocity v ← μ·v + g instead,
exactly as ``torch.optim.SGD`` does (dampening 0, no Nesterov), so the two can be compared step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _check(name: str, value: float, ok: bool, want: str) -> float:
    if not ok:
        raise ValueError(f"SGD: {name} = {value!r} is invalid: {want}")
    return float(value)


class SGD(torch.optim.Optimizer):
    """Gradient descent as a ``torch.optim.Optimizer``, so Lightning counts its steps and every
    ``torch.optim.lr_scheduler`` can drive its ``lr``.

    Args:
        params: the parameters (or parameter groups) to update; their ``.grad`` holds ∂C/∂p.
        lr: the learning rate, > 0.
        momentum: μ in [0, 1); 0 is plain gradient descent.
        weight_decay: λ ≥ 0, adding λ·p to every gradient (L2 regularisation).

    Raises:
        ValueError: for an lr that is not a finite positive number, a momentum outside [0, 1), or a
            negative weight decay.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        _check("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "use a finite number > 0")
        _check("momentum", momentum, 0.0 <= momentum < 1.0, "use a value in [0, 1)")
        _check("weight_decay", weight_decay, weight_decay >= 0.0, "use a value ≥ 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient; calls ``closure`` first, as Lightning needs."""
        cost = None
        if closure is not None:
            with torch.enable_grad():
                cost = closure()
        self.update()
        return cost

    def update(self) -> None:
        """The update itself, for every parameter that has a gradient: what ``step`` does after its closure.

        Called directly it skips what ``torch.optim.Optimizer`` wraps around ``step`` (profiler ranges and
        step hooks), which costs more than the whole update of a tiny model.
        """
        if torch.is_grad_enabled():  # the update is not differentiated; callers in no_grad skip this
            with torch.no_grad():
                return self.update()
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # a parameter that got no gradient is left as it is
                params = [p for p, g in zip(params, grads, strict=True) if g is not None]
                grads = [g for g in grads if g is not None]
                if not params:
                    continue
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            if weight_decay:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)  # g + λ·p
            if momentum:
                grads = self._velocity(params, grads, momentum)
            torch._foreach_add_(params, grads, alpha=-lr)  # p ← p − lr·g: the step size is lr·g

    def _velocity(self, params: list[Tensor], grads: list[Tensor], momentum: float) -> list[Tensor]:
        """v ← μ·v + g (v = g on the first step), kept per parameter in the optimizer state."""
        velocities = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            v = state.get("momentum_buffer")
            if v is None:
                v = state["momentum_buffer"] = g.clone()
            else:
                v.mul_(momentum).add_(g)
            velocities.append(v)
        return velocities
