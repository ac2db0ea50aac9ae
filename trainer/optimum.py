"""Closed forms for linear least squares: the optimum gradient descent should reach, and its lr bound.

For ŷ = x Wᵀ + b under C = s·Σ (ŷ − y)² (s = 1/N for the mean), the derivatives vanish at the least-squares
solution of [x 1]·θ = y, which ``torch.linalg.lstsq`` gives directly.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor


def design(x: Tensor) -> Tensor:
    """[x 1]: the inputs with a column of ones for the intercept. (N, I + 1)"""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)


def least_squares(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The (weight (K, I), bias (K,)) that minimise Σ (x Wᵀ + b − y)², solved in float64."""
    a = design(x.double())  # (N, I + 1)
    yy = y.double().reshape(x.shape[0], -1)  # (N, K)
    theta = torch.linalg.lstsq(a.cpu(), yy.cpu(), driver="gelsd").solution  # (I + 1, K)
    return theta[:-1].T.contiguous(), theta[-1].contiguous()


def squared_error(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, reduction: str = "mean") -> float:
    """The cost of the line (or plane) ``weight, bias`` on (x, y), in float64."""
    pred = x.double().cpu() @ weight.double().cpu().T + bias.double().cpu()
    diff = pred - y.double().cpu().reshape(pred.shape)
    total = (diff * diff).sum()
    return (total / x.shape[0] if reduction == "mean" else total).item()


class LeastSquares:
    """The squared-error cost of a linear model on fixed data, written as the quadratic it is.

    With θₖ = [Wₖ bₖ] the k-th output's row and A = [x 1] (N, I + 1), the cost is
    C(θ) = s·Σₖ ‖A θₖᵀ − yₖ‖²  (s = 1/N for ``mean``, 1 for ``sum``), so every quantity the monitor and the
    figures need follows from the Gram matrix G = AᵀA and the least-squares optimum θ*:

    - the gap to the optimum  C(θ) − C(θ*) = s·Σₖ (θₖ − θₖ*) G (θₖ − θₖ*)ᵀ   (exact: no cancellation);
    - the Hessian  H = 2s·G for each output (the outputs do not interact), whose largest eigenvalue bounds
      the learning rate of gradient descent.

    Args:
        x: inputs (N, I); y: targets (N, K) or (N,); reduction: ``mean`` or ``sum``.

    Everything is kept in float64 on the CPU. ``LeastSquares.of`` solves each data set once: the monitor
    (the lr bound, the gap), the figures (the cost surface) and the summary ask for the same one.
    """

    _SOLVED: list[tuple[weakref.ref, int, weakref.ref, int, str, LeastSquares]] = []  # newest last
    _KEEP = 4

    @classmethod
    def of(cls, x: Tensor, y: Tensor, reduction: str = "mean") -> LeastSquares:
        """``LeastSquares(x, y, reduction)``, solved once for these very tensors while they are unchanged.

        A tensor changed in place since (its ``_version`` moved on), or a new tensor, gets a new solve; the
        cache holds the last few, and no tensor alive.
        """
        for entry in cls._SOLVED:
            xr, xv, yr, yv, red, solved = entry
            if xr() is x and yr() is y and xv == x._version and yv == y._version and red == reduction:
                return solved
        solved = cls(x, y, reduction)
        entry = (weakref.ref(x), x._version, weakref.ref(y), y._version, reduction, solved)
        cls._SOLVED = [*cls._SOLVED[-(cls._KEEP - 1) :], entry]
        return solved

    def __init__(self, x: Tensor, y: Tensor, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"unknown reduction {reduction!r}: choose mean or sum")
        a = design(x.double().cpu())  # (N, I + 1)
        self.num_examples = x.shape[0]
        self.reduction = reduction
        self.scale = 1.0 / self.num_examples if reduction == "mean" else 1.0  # s
        self.gram = a.T @ a  # (I + 1, I + 1)  G = AᵀA
        self.weight, self.bias = least_squares(x, y)  # (K, I), (K,)
        self.cost = squared_error(x, y, self.weight, self.bias, reduction)  # C(θ*)
        self.optimum = torch.cat([self.weight, self.bias.unsqueeze(1)], 1)  # (K, I + 1)  θ*

    def hessian_eigenvalues(self) -> Tensor:
        """The eigenvalues of one output's Hessian 2s·G, ascending (the K outputs share them)."""
        return hessian_eigenvalues(self.gram, self.scale)

    def lr_bound(self, momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int | None = None) -> float:
        """The learning rate above which gradient descent on this cost diverges: 2(1 + μ) / (λ_max + λ_wd).

        Along each eigenvector of H the error is multiplied by (1 − lr·λ) per step (plain gradient descent),
        so it shrinks only while lr·λ < 2; heavy-ball momentum μ widens that to lr·λ < 2(1 + μ). Weight decay
        adds λ_wd to every eigenvalue. For mini-batches of ``batch_size`` examples under the ``sum``
        reduction a step sees (on average) batch_size/N of the Hessian, so the bound grows by N/batch_size;
        under ``mean`` the average batch has the full Hessian.
        """
        lam = self.hessian_eigenvalues().max().item()
        if self.reduction == "sum" and batch_size is not None and batch_size < self.num_examples:
            lam *= batch_size / self.num_examples
        lam += weight_decay
        return math.inf if lam <= 0 else 2.0 * (1.0 + momentum) / lam

    def gap(self, weight: Tensor, bias: Tensor) -> float:
        """C(W, b) − C(θ*) on the data, exactly (float64 on the CPU)."""
        theta = torch.cat(
            [
                weight.detach().double().cpu().reshape(self.optimum.shape[0], -1),
                bias.detach().double().cpu().reshape(-1, 1),
            ],
            1,
        )
        diff = theta - self.optimum  # (K, I + 1)
        return (self.scale * ((diff @ self.gram) * diff).sum()).item()

    def costs(self, weights: Tensor, biases: Tensor) -> Tensor:
        """The cost at many (weight, bias) of a one-input, one-output line at once: C* + gap, elementwise.

        ``weights`` and ``biases`` have the same shape (e.g. a grid of slopes and intercepts); float64 CPU.
        """
        dm = weights.double() - self.optimum[0, 0]
        dc = biases.double() - self.optimum[0, 1]
        g = self.gram
        return self.cost + self.scale * (g[0, 0] * dm * dm + 2 * g[0, 1] * dm * dc + g[1, 1] * dc * dc)


def lr_bound(x: Tensor, reduction: str = "mean") -> float:
    """The largest learning rate at which full-batch gradient descent on a linear least-squares model converges.

    The cost C(θ) = s·‖Aθ − y‖² with A = [x 1] (s = 1/N for ``mean``, 1 for ``sum``) is quadratic with Hessian
    H = 2s·AᵀA, and the update θ ← θ − lr·∇C shrinks every error component iff |1 − lr·λ| < 1 for every
    eigenvalue λ of H: lr < 2/λ_max. (The same bound holds for each output of a multi-output model.)

    Args:
        x: the inputs (N, I) the model is trained on (after any standardization).
        reduction: ``mean`` or ``sum``, as the loss.

    Returns 2/λ_max(H), computed in float64; ``inf`` when H is zero.
    """
    a = design(x.detach().double().cpu())  # (N, I + 1)
    scale = 1.0 / a.shape[0] if reduction == "mean" else 1.0
    lam_max = hessian_eigenvalues(a.T @ a, scale).max().item()
    return 2.0 / lam_max if lam_max > 0 else float("inf")


def hessian_eigenvalues(gram: Tensor, scale: float) -> Tensor:
    """The eigenvalues of H = 2s·G, ascending: one output's Hessian of the squared-error cost, G = AᵀA."""
    return torch.linalg.eigvalsh(2.0 * scale * gram)
