"""The base of every hand-differentiated module.

A ``Layer`` is an ``nn.Module`` whose ``forward`` is plain torch ops (so autograd can differentiate the
very same code, which is how every backward is checked) and whose ``backward`` applies the chain rule by
hand. In training mode ``forward`` caches only what ``backward`` needs; ``backward`` consumes that cache,
accumulates ∂C/∂θ into each parameter's ``.grad`` exactly as autograd would, and returns ∂C/∂input.

Layers with parameters (``Linear``, and ``Sequential`` for its children) also take two keywords that a
training step uses to skip work autograd would skip too:

- ``accumulate=False`` writes ∂C/∂θ into the ``.grad`` buffers already there (``out=``) instead of adding
  to them: bit for bit what ``zero_grad(set_to_none=True)`` then ``backward()`` gives, with no zeroing,
  no fresh allocation and no extra pass over memory (a product on oneDNN, ``models/gemm.py``, has no
  ``out=``: its ``.grad`` is a fresh tensor each step, as after ``set_to_none``);
- ``input_grad=False`` skips ∂C/∂input (and returns None): the first layer's input is the data, and no
  one needs the gradient of the data.

Inside a ``Sequential`` an activation may also work in place (``forward_in_place``, ``backward_in_place``):
on the tensor the ``Linear`` before it has just made (``returns_new``), which nothing else holds. That
saves a fresh (N, O) buffer and a pass over new memory per activation, forward and backward, and gives
the very same numbers (the same kernel, writing over its input).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from models import gemm


def _hooks_on_every_module() -> bool:
    """Whether a global module hook (``torch.nn.modules.module.register_module_forward_hook`` and kin) is
    set, or the JIT is tracing: then every module call must take nn.Module's own path."""
    m = _nn_module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def _hooks_on(module: nn.Module) -> bool:
    """Whether ``module`` itself has a hook or a compiled forward (``module.compile()``)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module._compiled_call_impl is not None
    )


def _plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` only calls its forward: no hook, tracing or compilation is in play."""
    return not (_hooks_on(module) or _hooks_on_every_module())


class Layer(nn.Module):
    """A module with a hand-written backward pass.

    Subclasses implement ``forward`` (calling ``self._save(...)`` for what backward needs) and
    ``backward(grad_output) -> grad_input`` (calling ``self._saved()`` to take the cache).
    """

    # Whether backward takes the ``accumulate`` and ``input_grad`` keywords (a layer with parameters).
    holds_parameters = False
    # Whether forward and backward always return a tensor of their own that nothing else holds (Linear's
    # products), which the next layer of a Sequential may then overwrite (``forward_in_place``).
    returns_new = False
    # The forward and backward that this class's in-place forms were written beside (``__init_subclass__``)
    _forward_in_place_of = None
    _backward_in_place_of = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # An in-place form is written for the forward or backward beside it: remember which, so that a
        # subclass (or a patch) that replaces that method is never bypassed by it (``in_place_ok``).
        for name in ("forward", "backward"):
            if f"{name}_in_place" in cls.__dict__:
                setattr(cls, f"_{name}_in_place_of", cls.__dict__.get(name))

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Tensor, ...] | None = None

    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ reaches forward through two more Python frames, which for a tiny layer cost as
        # much as its math (0.7 µs a call). With no hook, tracing or compilation in play it only calls
        # forward, so do that here; anything else takes nn.Module's own path.
        if _plain_call(self):
            return self.forward(*args, **kwargs)
        return nn.Module.__call__(self, *args, **kwargs)

    def _save(self, *tensors: Tensor) -> None:
        # Only a training forward is followed by a backward; an eval pass keeps nothing (and drops a stale
        # cache an earlier training forward left). The cache holds references, never copies: Linear's input
        # is the activation's output below it, kept once. Under autograd (a gradient check) they are
        # detached, so backward can never build a graph.
        if not self.training:
            tensors = None
        elif torch.is_grad_enabled():
            tensors = tuple(t.detach() for t in tensors)
        # A plain attribute write: nn.Module.__setattr__ first checks whether the value is a parameter, a
        # buffer or a submodule, and for a tiny layer those checks cost more than its math.
        self.__dict__["_cache"] = tensors

    def _saved(self) -> tuple[Tensor, ...]:
        """Take the cache, releasing it; raise if there was no training forward since the last backward."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{self.__class__.__name__}.backward() called without a forward: run forward() in "
                "training mode (module.train()) before each backward()."
            )
        self.__dict__["_cache"] = None
        return cache

    def _set_cache(self, cache: tuple[Tensor, ...] | None) -> None:
        self.__dict__["_cache"] = cache

    def release(self) -> None:
        """Drop whatever the last forward cached (for a forward that will not be followed by backward)."""
        self._set_cache(None)
        for child in self.children():
            if isinstance(child, Layer):
                child.release()

    def backward(self, grad_output: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def in_place_ok(self, name: str) -> bool:
        """Whether ``<name>_in_place`` (``name``: forward or backward) is the in-place form of the ``name``
        this layer runs: false for the base class's, and where a subclass or a patch replaced ``name``.
        (``Sequential`` makes the same test inline: this is a small model's hot path.)"""
        cls = type(self)
        if name == "forward":
            return cls.forward is cls._forward_in_place_of
        return cls.backward is cls._backward_in_place_of

    def forward_in_place(self, x: Tensor) -> Tensor:
        """``forward``, free to overwrite ``x``: a tensor no one else holds (see ``returns_new``). An
        elementwise layer overrides it to work in place outside autograd; the numbers are those of forward."""
        return self.forward(x)

    def backward_in_place(self, grad_output: Tensor) -> Tensor:
        """``backward``, free to overwrite ``grad_output`` (no one else holds it), as ``forward_in_place``."""
        return self.backward(grad_output)

    @staticmethod
    def _accumulate(param: Tensor, grad: Tensor) -> None:
        """param.grad += grad, creating it when None, as autograd does."""
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)

    @staticmethod
    def _grad_of_product(param: Tensor, a: Tensor, b: Tensor, accumulate: bool = True, onednn: bool = False) -> None:
        """∂C/∂param = a @ b into ``param.grad``: added to it (``accumulate``), or written over it; with
        ``onednn``, the product on oneDNN (``models.gemm``)."""
        grad = param.grad
        if onednn:
            product = gemm.mm(a, b, onednn=True)  # a fresh tensor: oneDNN has no out=
            if grad is None or not accumulate:
                param.grad = product  # as zero_grad(set_to_none=True) then backward would give
            else:
                grad.add_(product)
        elif grad is None:
            param.grad = a @ b
        elif accumulate:
            grad.add_(a @ b)  # not addmm_: the sum must round exactly as autograd's does
        else:
            torch.mm(a, b, out=grad)  # no allocation, no zeroing

    @staticmethod
    def _grad_of_sum(param: Tensor, g_t: Tensor, accumulate: bool = True) -> None:
        """∂C/∂param = Σₙ g, the row sums of ``g_t`` = gᵀ (O, N), into ``param.grad``, as ``_grad_of_product``."""
        grad = param.grad
        if grad is None:
            param.grad = g_t.sum(1)
        elif accumulate:
            grad.add_(g_t.sum(1))
        else:
            torch.sum(g_t, 1, out=grad)
