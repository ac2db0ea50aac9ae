"""Costs with hand-written derivatives: ``cost = loss(pred, target)``, then ``grad = loss.backward()``.

Shapes: N examples, K outputs (or classes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layer import Layer

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    return reduction


class Loss(Layer):
    """A cost C(pred, target) → 0-d tensor; ``backward(grad_output=1)`` returns ∂C/∂pred."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def _scale(self, n: int) -> float:
        """1/N for the mean over examples, 1 for the sum."""
        return 1.0 / n if self.reduction == "mean" else 1.0

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SquaredError(Loss):
    """C = (1/N) Σₙ Σₖ (ŷₙₖ − yₙₖ)² (``mean``: over examples; the usual MSE for one output) or the plain Σ.

    ``target`` has the shape of ``pred``; a 1-D target of N values is taken for a (N, 1) prediction.
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if target.shape != pred.shape:
            if pred.dim() == 2 and pred.shape[1] == 1 and target.shape == pred.shape[:1]:
                target = target.unsqueeze(1)
            else:
                raise ValueError(
                    f"SquaredError: target shape {tuple(target.shape)} does not match "
                    f"prediction shape {tuple(pred.shape)}"
                )
        diff = pred - target  # (N, K): ŷ − y
        self._save(diff)
        return (diff * diff).sum() * self._scale(pred.shape[0])

    # C = s Σ (ŷ − y)²  ⇒  ∂C/∂ŷ = 2 s (ŷ − y),   s = 1/N (mean) or 1 (sum)
    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        (diff,) = self._saved()
        return diff * (2.0 * self._scale(diff.shape[0]) * grad_output)


class SoftmaxCrossEntropy(Loss):
    """C = (1/N) Σₙ −log softmax(zₙ)[yₙ] (``mean``) or the plain Σ, for logits z (N, K) and class indices y (N,).

    Computed as logsumexp(z − max z) − (z[y] − max z), which is stable and precise for logits of any size.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"SoftmaxCrossEntropy: logits must be (N, K) and target (N,) class indices; got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        target = target.long()
        # C is unchanged by a shift of each row, so shift by its max (a constant: no gradient through it). Then
        # lse − z[y] subtracts small numbers, not two of size |z|, and keeps full precision even at |z| = 1e4.
        shifted = logits - logits.detach().amax(dim=1, keepdim=True)  # (N, K) z − max z, ≤ 0
        lse = torch.logsumexp(shifted, dim=1)  # (N,) in [0, log K]
        picked = shifted.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,) z[y] − max z
        self._save(shifted, lse, target)
        return (lse - picked).sum() * self._scale(logits.shape[0])

    # C = s Σₙ (logsumexp(zₙ) − zₙ[yₙ])  ⇒  ∂C/∂z = s (softmax(z) − onehot(y))
    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        shifted, lse, target = self._saved()
        grad = torch.exp(shifted - lse.unsqueeze(1))  # (N, K) softmax, stable: exponent ≤ 0
        grad.scatter_add_(1, target.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
        return grad.mul_(self._scale(shifted.shape[0]) * grad_output)


LOSSES: dict[str, type[Loss]] = {"squared_error": SquaredError, "cross_entropy": SoftmaxCrossEntropy}


def make_loss(name: str, reduction: str = "mean") -> Loss:
    """Build a loss by name: ``squared_error`` or ``cross_entropy``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name](reduction)
