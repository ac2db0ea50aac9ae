"""Elementwise activations with hand-written backward passes.

Each caches the one tensor its derivative needs: σ and tanh their output y (σ' = y(1 − y),
tanh' = 1 − y²), ReLU the sign mask of its input. Inside a Sequential, right after a Linear, they run in
place (``forward_in_place``, ``backward_in_place``; see ``models/layer.py``) with the same kernels.

All are stable at any |x|: torch's sigmoid and tanh saturate to exactly 0/1 and ±1 without overflow, so
neither forward nor backward makes inf or NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layer import Layer

# torch's fused kernel for g · y(1 − y), bound once (torch.ops resolves the name anew on every look-up);
# its out= form writes the result where it is told, here over g itself
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default
_sigmoid_backward_into = torch.ops.aten.sigmoid_backward.grad_input


class Sigmoid(Layer):
    """σ(x) = 1 / (1 + e^(−x))."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(x)
        self._save(y)
        return y

    # y = σ(x)  ⇒  ∂C/∂x = g · y(1 − y)
    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self._saved()
        # g · y(1 − y) in one pass over memory (torch's fused kernel for this very formula), where
        # grad_output * y * (1 - y) would make three passes and two temporaries.
        return _sigmoid_backward(grad_output, y)

    def forward_in_place(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # autograd must see the out-of-place op (and x may be in its graph)
            return self.forward(x)
        y = torch.sigmoid_(x)  # σ over the product just made: the same kernel, no new (N, O) buffer
        self._save(y)
        return y

    def backward_in_place(self, grad_output: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.backward(grad_output)
        (y,) = self._saved()
        return _sigmoid_backward_into(grad_output, y, grad_input=grad_output)  # g ← g · y(1 − y)


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
        # In place on the fresh 1 − y: the same products as g · ((1 − y)(1 + y)), two temporaries fewer.
        return (1 - y).mul_(1 + y).mul_(grad_output)

    def forward_in_place(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.forward(x)
        y = torch.tanh_(x)
        self._save(y)
        return y

    # backward stays out of place: it makes its (1 − y)(1 + y) temporary anyway, so writing over g saves no buffer


class ReLU(Layer):
    """max(x, 0). At x = 0 the derivative is taken as 0, as autograd does."""

    def forward(self, x: Tensor) -> Tensor:
        self._save(x > 0)  # a bool mask: a quarter of the bytes of float32 x
        return torch.relu(x)

    # y = max(x, 0)  ⇒  ∂C/∂x = g · 1[x > 0]
    def backward(self, grad_output: Tensor) -> Tensor:
        (positive,) = self._saved()
        return grad_output * positive

    def forward_in_place(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.forward(x)
        self._save(x > 0)  # taken before x is overwritten
        return torch.relu_(x)

    def backward_in_place(self, grad_output: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.backward(grad_output)
        (positive,) = self._saved()
        return grad_output.mul_(positive)


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
