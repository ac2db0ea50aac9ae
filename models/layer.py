"""The base of every hand-differentiated module.

A ``Layer`` is an ``nn.Module`` whose ``forward`` is plain torch ops (so autograd can differentiate the
very same code, which is how every backward is checked) and whose ``backward`` applies the chain rule by
hand. In training mode ``forward`` caches only what ``backward`` needs; ``backward`` consumes that cache,
accumulates ∂C/∂θ into each parameter's ``.grad`` exactly as autograd would, and returns ∂C/∂input.

Layers with parameters (``Linear``, and ``Sequential`` for its children) also take two keywords that a
training step uses to skip work autograd would skip too:

- ``accumulate=False`` writes ∂C/∂θ into the ``.grad`` buffers already there (``out=``) instead of adding
  to them: bit for bit what ``zero_grad(set_to_none=True)`` then ``backward()`` gives, with no zeroing,
  no fresh allocation and no extra pass over memory;
- ``input_grad=False`` skips ∂C/∂input (and returns None): the first layer's input is the data, and no
  one needs the gradient of the data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Layer(nn.Module):
    """A module with a hand-written backward pass.

    Subclasses implement ``forward`` (calling ``self._save(...)`` for what backward needs) and
    ``backward(grad_output) -> grad_input`` (calling ``self._saved()`` to take the cache).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Tensor, ...] | None = None

    def _save(self, *tensors: Tensor) -> None:
        # Only a training forward is followed by a backward; an eval pass keeps nothing. The cache holds
        # references, never copies: Linear's input is the activation's output below it, kept once.
        # Detached only when needed (a forward under autograd), so backward can never build a graph.
        if not self.training:
            self._set_cache(None)  # and drop a stale cache an earlier training forward left
            return
        for t in tensors:
            if t.requires_grad:
                tensors = tuple(t.detach() for t in tensors)
                break
        self._set_cache(tensors)

    def _saved(self) -> tuple[Tensor, ...]:
        """Take the cache, releasing it; raise if there was no training forward since the last backward."""
        if self._cache is None:
            raise RuntimeError(
                f"{self.__class__.__name__}.backward() called without a forward: run forward() in "
                "training mode (module.train()) before each backward()."
            )
        cache = self._cache
        self._set_cache(None)
        return cache

    def _set_cache(self, cache: tuple[Tensor, ...] | None) -> None:
        # A plain attribute write: nn.Module.__setattr__ first checks whether the value is a parameter,
        # a buffer or a submodule, and for a tiny layer those checks cost more than its math.
        object.__setattr__(self, "_cache", cache)

    def release(self) -> None:
        """Drop whatever the last forward cached (for a forward that will not be followed by backward)."""
        self._set_cache(None)
        for child in self.children():
            if isinstance(child, Layer):
                child.release()

    def backward(self, grad_output: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _accumulate(param: Tensor, grad: Tensor) -> None:
        """param.grad += grad, creating it when None, as autograd does."""
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)

    @staticmethod
    def _grad_of_product(param: Tensor, a: Tensor, b: Tensor, accumulate: bool = True) -> None:
        """∂C/∂param = a @ b into ``param.grad``: added to it (``accumulate``), or written over it in place."""
        grad = param.grad
        if grad is None:
            param.grad = a @ b
        elif accumulate:
            grad.add_(a @ b)  # not addmm_: the sum must round exactly as autograd's does
        else:
            torch.mm(a, b, out=grad)  # no allocation, no zeroing

    @staticmethod
    def _grad_of_sum(param: Tensor, g: Tensor, accumulate: bool = True) -> None:
        """∂C/∂param = Σₙ g (over the batch, dim 0) into ``param.grad``, as ``_grad_of_product``."""
        grad = param.grad
        if grad is None:
            param.grad = g.sum(0)
        elif accumulate:
            grad.add_(g.sum(0))
        else:
            torch.sum(g, 0, out=grad)
