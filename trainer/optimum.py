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
