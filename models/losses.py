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
        self._scales: dict[tuple, Tensor] = {}  # see _scale_tensor

    def _scale(self, n: int) -> float:
        """1/N for the mean over examples, 1 for the sum."""
        return 1.0 / n if self.reduction == "mean" else 1.0

    def _scale_tensor(self, n: int, factor: float, like: Tensor) -> Tensor:
        """factor · ``_scale(n)`` as a 0-d CPU tensor of ``like``'s dtype, made once per batch size.

        Multiplying by a Python number makes torch wrap it in a fresh tensor each time (1 µs, as much as the
        product itself on a small batch); the values are the same as with the number. A 0-d CPU tensor
        multiplies tensors on any device, as a Python number does.
        """
        key = (n, factor, like.dtype)
        scale = self._scales.get(key)
        if scale is None:
            scale = self._scales[key] = torch.tensor(factor * self._scale(n), dtype=like.dtype)
        return scale

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
        flat = diff.view(-1)  # diff is fresh, so contiguous
        return torch.dot(flat, flat) * self._scale_tensor(pred.shape[0], 1.0, diff)  # Σ (ŷ − y)² in one pass

    # C = s Σ (ŷ − y)²  ⇒  ∂C/∂ŷ = 2 s (ŷ − y),   s = 1/N (mean) or 1 (sum)
    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        (diff,) = self._saved()
        if isinstance(grad_output, float) and grad_output == 1.0:  # the usual call: C is the final cost
            return diff * self._scale_tensor(diff.shape[0], 2.0, diff)
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
        index = target.unsqueeze(1)  # (N, 1)
        # C is unchanged by a shift of each row, so shift by its max (a constant: no gradient through it). Then
        # lse − z[y] subtracts small numbers, not two of size |z|, and keeps full precision even at |z| = 1e4.
        shifted = logits - logits.detach().amax(dim=1, keepdim=True)  # (N, K) z − max z, ≤ 0
        exps = shifted.exp()  # (N, K) in (0, 1], each row's largest exactly 1
        sums = exps.sum(dim=1, keepdim=True)  # (N, 1) in [1, K]
        lse = sums.log().squeeze(1)  # (N,) logsumexp of the shifted row, in [0, log K]
        picked = shifted.gather(1, index).squeeze(1)  # (N,) z[y] − max z
        # Backward needs softmax(z) − onehot(y) only: made here from the exponentials already at hand (one
        # division), and kept instead of the logits, lse and targets.
        if self.training:
            # softmax in place, unless autograd is recording (a gradient check): then exps is in its graph
            grad = exps.detach() / sums.detach() if exps.requires_grad else exps.div_(sums)
            grad.scatter_add_(1, index, torch.full_like(picked, -1.0).unsqueeze(1))  # (N, K) softmax − onehot
            self._save(grad)
        else:
            self._save()  # an eval pass keeps nothing
        return (lse - picked).sum() * self._scale_tensor(logits.shape[0], 1.0, lse)

    # C = s Σₙ (logsumexp(zₙ) − zₙ[yₙ])  ⇒  ∂C/∂z = s (softmax(z) − onehot(y))
    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        (grad,) = self._saved()  # (N, K) softmax(z) − onehot(y), ours alone: scaled in place
        if isinstance(grad_output, float) and grad_output == 1.0:  # the usual call: C is the final cost
            return grad.mul_(self._scale_tensor(grad.shape[0], 1.0, grad))
        return grad.mul_(self._scale(grad.shape[0]) * grad_output)


LOSSES: dict[str, type[Loss]] = {"squared_error": SquaredError, "cross_entropy": SoftmaxCrossEntropy}


def make_loss(name: str, reduction: str = "mean") -> Loss:
    """Build a loss by name: ``squared_error`` or ``cross_entropy``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name](reduction)
