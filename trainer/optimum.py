"""Closed forms for linear least squares: the optimum gradient descent should reach, and its lr bound.

For ŷ = x Wᵀ + b under C = s·Σ (ŷ − y)² (s = 1/N for the mean), the derivatives vanish at the least-squares
solution of [x 1]·θ = y, which ``torch.linalg.lstsq`` gives directly.
"""

from __future__ import annotations

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
    hessian = 2.0 * scale * (a.T @ a)  # (I + 1, I + 1)
    lam_max = torch.linalg.eigvalsh(hessian).max().item()
    return 2.0 / lam_max if lam_max > 0 else float("inf")
