"""Where the layers' large matrix products run: torch's own kernel, or oneDNN's float32 GEMM on the CPU.

On the CPU torch hands every float32 matrix product to MKL's sgemm. Every x86 build of torch also carries
oneDNN, whose float32 GEMM keeps full IEEE float32 precision (no bf16 or tf32 inside; the test suite
checks it against float64) and, on some CPUs, runs far faster: on an AMD EPYC with AVX-512 it takes 0.47 of
MKL's time for a (512, 1024) × (1024, 1024) product. torch.nn + autograd cannot choose it; a hand-written
backward can, for the forward product and both backward ones.

The backend is ``auto`` unless ``HANDGRAD_GEMM`` (``auto``, ``torch`` or ``onednn``) or ``use(name)`` says
otherwise. ``auto`` sends a product to oneDNN when all of these hold, and to torch otherwise:

- it is float32 on the CPU, 2-D, and at least ``MIN_MACS`` multiply-adds: below that oneDNN's fixed cost
  (about 10 µs a call) outweighs its speed (on the machine above both take 3 µs for 64 × 64 × 64; at
  128 × 128 × 128 oneDNN takes 0.72 of MKL's time);
- autograd is not recording it (oneDNN's op has no derivative): a forward under autograd, as the gradient
  checks run it, is torch's ``F.linear``, the very same math;
- oneDNN passed a one-time self-test on this machine (a product checked against float64).

``torch`` always uses torch's kernels, and the layers skip their shortcuts too (``shortcuts``): the forward
and backward then run exactly the kernels torch.nn + autograd run, which is what the live gradient check
uses on the updates it checks (``trainer/live_gradcheck.py``). ``onednn`` is ``auto`` without the size limit
(for tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "onednn")
MIN_MACS = 1 << 20  # m·k·n: 128 × 128 × 64 and up; see the module docstring for the measurements


def _from_env() -> str:
    name = os.environ.get("HANDGRAD_GEMM", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"HANDGRAD_GEMM = {name!r} is unknown: choose one of {', '.join(BACKENDS)}")
    return name


_backend = "auto"
# Derived from the backend by set_backend, kept as plain attributes because a layer reads them on every call:
# the smallest product that may go to oneDNN (0 for ``onednn``; never reached for ``torch``), compared with a
# layer's m·k·n before anything else, so a small model pays one comparison; and whether the layers may take
# their own shortcuts (Linear's one-neuron form): not on ``torch``, where every kernel is autograd's.
min_macs = MIN_MACS
shortcuts = True
_onednn_ok: bool | None = None  # the self-test's verdict, once run


def backend() -> str:
    """The backend in use: ``auto``, ``torch`` or ``onednn``."""
    return _backend


def set_backend(name: str) -> None:
    """Choose the backend for every later product (see the module docstring)."""
    global _backend, min_macs, shortcuts
    if name not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _backend = name
    min_macs = {"auto": MIN_MACS, "onednn": 0, "torch": 1 << 62}[name]
    shortcuts = name != "torch"


set_backend(_from_env())


@contextmanager
def use(name: str) -> Iterator[None]:
    """``with use("torch"): ...`` runs the block on that backend, then restores the one before."""
    before = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def onednn_available() -> bool:
    """Whether oneDNN's float32 GEMM exists in this torch and agrees with float64 on this machine."""
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = _self_test()
    return _onednn_ok


def _self_test() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    a, w, b = (torch.randn(*shape, generator=gen) for shape in ((96, 80), (72, 80), (72,)))
    try:
        got = torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
    except RuntimeError:
        return False
    want = F.linear(a.double(), w.double(), b.double())
    # float32 rounding of an 80-term sum is ~1e-6 of its size; bf16 inside would be ~1e-2
    return bool(((got.double() - want).abs().max() <= 1e-5 * want.abs().max()).item())


def onednn_for(macs: int, first: Tensor, second: Tensor) -> bool:
    """Whether a product of ``macs`` multiply-adds (m·k·n) of ``first`` and ``second`` goes to oneDNN.

    A layer decides once for its products of one step: forward, ∂C/∂W and ∂C/∂x all have m·k·n = N·I·O.
    """
    if macs < min_macs:  # the common case for a small model, and always for the torch backend
        return False
    if first.device.type != "cpu" or first.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (first.requires_grad or second.requires_grad):
        return False
    return onednn_available()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b: x (N, I), weight (O, I), bias (O,) or None → (N, O)."""
    if onednn_for(x.shape[0] * weight.shape[0] * weight.shape[1], x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor, onednn: bool | None = None) -> Tensor:
    """a b: a (M, K), b (K, N) → (M, N), on oneDNN if ``onednn`` (None: decide by ``onednn_for``)."""
    if onednn is None:
        onednn = onednn_for(a.shape[0] * a.shape[1] * b.shape[1], a, b)
    if onednn:
        # oneDNN computes input · weightᵀ, so b goes in as bᵀ (a view). It reads a transposed ``a`` (gᵀ in
        # ∂C/∂W = gᵀ x) slowly: a contiguous copy first is faster overall (measured 4.3 ms against 5.9).
        return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.t(), None, "none", [], "")
    return a @ b
