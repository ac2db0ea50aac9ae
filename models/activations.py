"""Elementwise activations with hand-written backward passes.

Each caches the one tensor its derivative needs: σ and tanh their output y (σ' = y(1 − y),
tanh' = 1 − y²), ReLU the sign mask of its input. All are stable at any |x|: torch's sigmoid and tanh
saturate to exactly 0/1 and ±1 without overflow, so neither forward nor backward makes inf or NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layer import Layer


class Sigmoid(Layer):
    """σ(x) = 1 / (1 + e^(−x))."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(x)
        self._save(y)
        return y

    # y = σ(x)  ⇒  ∂C/∂x = g · y(1 − y)
    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self._saved()
        return grad_output * y * (1 - y)


class Tanh(Layer):
    """tanh(x)."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        self._save(y)
        return y

    # y = tanh(x)  ⇒  ∂C/∂x = g · (1 − y²)
    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self._saved()
        # (1 − y)(1 + y), not 1 − y·y: near |y| = 1 the subtraction 1 − y is exact, 1 − y·y cancels y·y's rounding.
        return grad_output * ((1 - y) * (1 + y))


class ReLU(Layer):
    """max(x, 0). At x = 0 the derivative is taken as 0, as autograd does."""

    def forward(self, x: Tensor) -> Tensor:
        self._save(x > 0)  # a bool mask: a quarter of the bytes of float32 x
        return torch.relu(x)

    # y = max(x, 0)  ⇒  ∂C/∂x = g · 1[x > 0]
    def backward(self, grad_output: Tensor) -> Tensor:
        (positive,) = self._saved()
        return grad_output * positive


class Identity(Layer):
    """y = x: the linear output of a regression model."""

    def forward(self, x: Tensor) -> Tensor:
        self._save()  # nothing to keep, but mark that a forward happened
        return x

    # y = x  ⇒  ∂C/∂x = g
    def backward(self, grad_output: Tensor) -> Tensor:
        self._saved()
        return grad_output


ACTIVATIONS: dict[str, type[Layer]] = {"sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU, "identity": Identity}


def activation(name: str) -> Layer:
    """Build an activation by name: one of ``sigmoid``, ``tanh``, ``relu``, ``identity``."""
    try:
        return ACTIVATIONS[name.lower()]()
    except (KeyError, AttributeError):
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(sorted(ACTIVATIONS))}") from None
