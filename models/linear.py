"""Linear layer  y = x Wᵀ + b, with its backward written by hand.

Shapes: N batch, I in_features, O out_features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import gemm
from models.layer import Layer


class Linear(Layer):
    """``y = x Wᵀ + b`` with the parameter names, shapes and default init of ``torch.nn.Linear``.

    Args:
        in_features: I, the width of each input row.
        out_features: O, the width of each output row.
        bias: whether to learn the additive bias ``b``.

    ``weight`` is (O, I) and ``bias`` is (O,), so a state_dict moves between this and ``nn.Linear``.
    """

    holds_parameters = True
    returns_new = True  # forward's x Wᵀ + b and backward's g W are fresh tensors (a subclass must keep that)

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
        # (O,), or None registered as the parameter (as nn.Linear does), so _parameters always holds both names
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
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
        params = self._parameters  # self.weight would pass through nn.Module.__getattr__: 0.4 µs a look-up
        weight, bias = params["weight"], params["bias"]
        if torch.is_grad_enabled():
            return F.linear(x, weight, bias)  # under autograd (a gradient check): the reference kernel
        if self.in_features == self.out_features == 1 and bias is not None and x.dim() == 2 and gemm.shortcuts:
            # one input and one output, the seed's neuron m·x + c: one elementwise op (1.7 µs against 2.3)
            return torch.addcmul(bias, x, weight)  # (N, 1)
        if x.shape[0] * self.in_features * self.out_features < gemm.min_macs:  # small: no more checks
            return F.linear(x, weight, bias)  # (N, O): x Wᵀ + b, the bias folded into the product
        return gemm.linear(x, weight, bias)

    # y = x Wᵀ + b  ⇒  ∂C/∂x = g W,  ∂C/∂W = gᵀ x,  ∂C/∂b = Σₙ g
    def backward(self, grad_output: Tensor, *, accumulate: bool = True, input_grad: bool = True) -> Tensor | None:
        """∂C/∂W and ∂C/∂b into ``.grad`` (added, or written over with ``accumulate=False``); returns ∂C/∂x,
        or None with ``input_grad=False`` (see ``Layer``)."""
        (x,) = self._saved()  # (N, I)
        g = grad_output  # (N, O)
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        macs = g.shape[0] * self.in_features * self.out_features
        onednn = macs >= gemm.min_macs and gemm.onednn_for(macs, g, x)  # one choice for both products
        # oneDNN reads gᵀ fastest as a contiguous copy (models/gemm.py); made here, its row sums also give Σₙ g
        # in half the time of the column sums of g. torch's kernels take the view, whose row sums are g.sum(0)
        # to the bit.
        g_t = g.t().contiguous() if onednn else g.t()  # (O, N)
        if bias is not None:  # first, while g is still in cache from the layer above
            self._grad_of_sum(bias, g_t, accumulate)  # (O,)
        self._grad_of_product(weight, g_t, x, accumulate, onednn)  # (O, I)
        if not input_grad:
            return None
        if torch.is_grad_enabled():
            weight = weight.detach()  # a manual backward builds no autograd graph
        if self.in_features == self.out_features == 1:
            return g * weight  # (N, 1): g W for a one-by-one W, elementwise (1.1 µs against 1.5); the same numbers
        return gemm.mm(g, weight, onednn)  # (N, I)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
