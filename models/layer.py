"""The base of every hand-differentiated module.

A ``Layer`` is an ``nn.Module`` whose ``forward`` is plain torch ops (so autograd can differentiate the
very same code, which is how every backward is checked) and whose ``backward`` applies the chain rule by
hand. In training mode ``forward`` caches only what ``backward`` needs; ``backward`` consumes that cache,
accumulates ∂C/∂θ into each parameter's ``.grad`` exactly as autograd would, and returns ∂C/∂input.
"""

from __future__ import annotations

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
        # Only a training forward is followed by a backward; an eval pass keeps nothing (and drops any
        # cache an earlier training forward left, so that a stale one cannot be consumed).
        self._cache = tuple(t.detach() for t in tensors) if self.training else None

    def _saved(self) -> tuple[Tensor, ...]:
        """Take the cache, releasing it; raise if there was no training forward since the last backward."""
        if self._cache is None:
            raise RuntimeError(
                f"{self.__class__.__name__}.backward() called without a forward: run forward() in "
                "training mode (module.train()) before each backward()."
            )
        cache, self._cache = self._cache, None
        return cache

    def release(self) -> None:
        """Drop whatever the last forward cached (for a forward that will not be followed by backward)."""
        self._cache = None
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
