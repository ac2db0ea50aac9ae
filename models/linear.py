"""Linear layer  y = x Wᵀ + b, with its backward written by hand.

Shapes: N batch, I in_features, O out_features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.layer import Layer


class Linear(Layer):
    """``y = x Wᵀ + b`` with the parameter names, shapes and default init of ``torch.nn.Linear``.

    Args:
        in_features: I, the width of each input row.
        out_features: O, the width of each output row.
        bias: whether to learn the additive bias ``b``.

    ``weight`` is (O, I) and ``bias`` is (O,), so a state_dict moves between this and ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"Linear widths must be positive, got in_features={in_features}, out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # (O, I)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None  # (O,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The init of ``nn.Linear``: U(-1/√I, 1/√I) for both W and b (kaiming_uniform with a=√5)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_values(cls, weight: Tensor | float | list, bias: Tensor | float | list | None = None) -> Linear:
        """Start from given values, e.g. the seed line's slope and intercept: ``Linear.from_values(m, c)``.

        ``weight`` is broadcast to (O, I) — a scalar gives a 1 → 1 layer — and ``bias`` to (O,).
        """
        w = torch.as_tensor(weight, dtype=torch.get_default_dtype())
        if w.dim() < 2:
            w = w.reshape(1, -1)  # a scalar or a row: one output
        layer = cls(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias is not None:
                layer.bias.copy_(torch.as_tensor(bias, dtype=w.dtype).reshape(w.shape[0]))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        self._save(x)  # ∂C/∂W needs x
        if self.bias is None:
            return x @ self.weight.t()  # (N, O)
        return torch.addmm(self.bias, x, self.weight.t())  # (N, O), bias folded into the product

    # y = x Wᵀ + b  ⇒  ∂C/∂x = g W,  ∂C/∂W = gᵀ x,  ∂C/∂b = Σₙ g
    def backward(self, grad_output: Tensor) -> Tensor:
        (x,) = self._saved()  # (N, I)
        g = grad_output  # (N, O)
        self._accumulate(self.weight, g.t() @ x)  # (O, I)
        if self.bias is not None:
            self._accumulate(self.bias, g.sum(0))  # (O,)
        return g @ self.weight.detach()  # (N, I); detached: a manual backward builds no autograd graph

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
