"""Two oracles for every hand-written backward.

1. ``check_autograd``: autograd differentiates the very same forward, with a random upstream gradient; the
   manual gradients of the input and of every parameter are compared with autograd's.
2. ``check_finite_differences``: ``torch.autograd.gradcheck`` on an adapter whose backward *is* our
   manual backward, so central finite differences in float64 judge it.

Errors are reported per tensor as the max absolute error and the max relative error, where the relative
error is ``max|manual − autograd| / max|autograd|`` (relative to the tensor's scale, so that entries that are
zero do not divide by zero). ``python -m models.gradcheck`` runs both over every layer, every loss and a
few MLPs, prints a table and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from models.activations import Identity, ReLU, Sigmoid, Tanh
from models.layer import Layer
from models.linear import Linear
from models.losses import SoftmaxCrossEntropy, SquaredError
from models.mlp import MLP

# The max relative error a manual gradient may show against autograd, by dtype.
TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 1e-5}


def tolerance(dtype: torch.dtype) -> float:
    """The max relative error allowed for ``dtype`` (float16/bfloat16: 1e-2)."""
    return TOLERANCES.get(dtype, 1e-2)


@dataclass(frozen=True)
class Row:
    """One compared tensor: ``name`` is ``input`` or a parameter's name."""

    module: str
    name: str
    dtype: torch.dtype
    max_abs_error: float
    max_rel_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tol


def compare(name: str, module: str, manual: Tensor | None, reference: Tensor | None) -> Row:
    """Compare one manual gradient with its reference, as a ``Row``."""
    if manual is None or reference is None:
        missing = "manual" if manual is None else "autograd"
        raise AssertionError(f"{module}: {name} has no {missing} gradient")
    if manual.shape != reference.shape:
        raise AssertionError(
            f"{module}: {name} gradient has shape {tuple(manual.shape)}, autograd's {tuple(reference.shape)}"
        )
    err = (manual.detach() - reference.detach()).abs().max().item() if manual.numel() else 0.0
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    rel = err / scale if scale > 0 else err
    return Row(module, name, manual.dtype, err, rel, tolerance(manual.dtype))


def _manual_and_autograd(
    module: Layer, x: Tensor, target: Tensor | None, grad_output: Tensor
) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
    params = dict(module.named_parameters())
    x = x.detach().requires_grad_(x.is_floating_point())
    module.train()
    module.zero_grad(set_to_none=True)
    out = module(x) if target is None else module(x, target)
    wrt = [x, *params.values()]
    ref = torch.autograd.grad(out, wrt, grad_outputs=grad_output, allow_unused=True)
    reference = dict(zip(["input", *params], ref, strict=True))
    with torch.no_grad():
        grad_input = module.backward(grad_output)
    manual = {"input": grad_input, **{n: p.grad for n, p in params.items()}}
    module.zero_grad(set_to_none=True)
    return manual, reference


def check_autograd(
    module: Layer, x: Tensor, target: Tensor | None = None, *, generator: torch.Generator | None = None
) -> list[Row]:
    """Manual backward against autograd on the same forward, with a random upstream gradient.

    Args:
        module: a ``Layer`` (or a ``Loss``, then ``target`` is required), in the dtype/device of ``x``.
        x: the input (N, I); for a loss, the prediction.
        target: the loss target, or None for a layer.
        generator: for the random upstream gradient.

    Returns one ``Row`` for the input and one per parameter.
    """
    with torch.no_grad():
        module.train()
        probe = module(x) if target is None else module(x, target)
        module.release()
    grad_output = torch.randn(probe.shape, dtype=probe.dtype, device="cpu", generator=generator).to(probe.device)
    manual, reference = _manual_and_autograd(module, x, target, grad_output)
    label = type(module).__name__
    return [compare(name, label, manual[name], reference[name]) for name in reference]


class _ManualFunction(torch.autograd.Function):
    """Autograd sees our module as one op whose backward is the hand-written one."""

    @staticmethod
    def forward(ctx, module: Layer, target: Tensor | None, x: Tensor, *params: Tensor) -> Tensor:
        ctx.module, ctx.target = module, target
        ctx.save_for_backward(x)
        with torch.no_grad():
            module.train()
            out = module(x) if target is None else module(x, target)
            module.release()
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        module, target = ctx.module, ctx.target
        (x,) = ctx.saved_tensors
        params = list(module.parameters())
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        with torch.no_grad():
            # gradcheck calls backward once per output entry: each call runs its own forward
            module(x) if target is None else module(x, target)
            grad_input = module.backward(grad_output)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        return (None, None, grad_input, *grads)


def check_finite_differences(module: Layer, x: Tensor, target: Tensor | None = None) -> bool:
    """``torch.autograd.gradcheck`` (central differences, float64) of the manual backward.

    The module and ``x`` must be float64. Raises ``torch.autograd.gradcheck.GradcheckError`` on a mismatch.
    """
    if x.dtype != torch.float64 or any(p.dtype != torch.float64 for p in module.parameters()):
        raise ValueError("finite differences need float64: call module.double() and pass a float64 input")
    params = list(module.parameters())
    x = x.detach().requires_grad_(True)

    def adapter(x: Tensor, *params: Tensor) -> Tensor:
        return _ManualFunction.apply(module, target, x, *params)

    return torch.autograd.gradcheck(adapter, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The command: every layer, every loss and a few MLPs, in float32 and float64.


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Layer]
    inputs: Callable[[torch.Generator, torch.dtype], tuple[Tensor, Tensor | None]]


def _x(n: int, i: int, scale: float = 1.0):
    return lambda gen, dtype: (torch.randn(n, i, generator=gen, dtype=dtype) * scale, None)


def _regression(n: int, k: int):
    def make(gen, dtype):
        return torch.randn(n, k, generator=gen, dtype=dtype), torch.randn(n, k, generator=gen, dtype=dtype)

    return make


def _classes(n: int, k: int, scale: float = 1.0):
    def make(gen, dtype):
        logits = torch.randn(n, k, generator=gen, dtype=dtype) * scale
        return logits, torch.randint(0, k, (n,), generator=gen)

    return make


CASES: list[Case] = [
    Case("Linear(3→4)", lambda: Linear(3, 4), _x(5, 3)),
    Case("Linear(1→1), the line", lambda: Linear(1, 1), _x(7, 1)),
    Case("Linear(3→2, no bias)", lambda: Linear(3, 2, bias=False), _x(4, 3)),
    Case("Sigmoid", Sigmoid, _x(6, 3, 3.0)),
    Case("Tanh", Tanh, _x(6, 3, 3.0)),
    Case("ReLU", ReLU, _x(6, 3)),
    Case("Identity", Identity, _x(6, 3)),
    Case("SquaredError(mean)", lambda: SquaredError("mean"), _regression(6, 2)),
    Case("SquaredError(sum)", lambda: SquaredError("sum"), _regression(6, 2)),
    Case("SoftmaxCrossEntropy(mean)", lambda: SoftmaxCrossEntropy("mean"), _classes(6, 4)),
    Case("SoftmaxCrossEntropy(sum)", lambda: SoftmaxCrossEntropy("sum"), _classes(6, 4)),
    Case("MLP[1,1,1] sigmoid, the chain", lambda: MLP([1, 1, 1], "sigmoid"), _x(5, 1)),
    Case("MLP[2,16,16,1] tanh", lambda: MLP([2, 16, 16, 1], "tanh"), _x(8, 2)),
    Case("MLP[4,8,3] relu→sigmoid", lambda: MLP([4, 8, 3], "relu", "sigmoid"), _x(5, 4)),
]


def run_all(seed: int = 0, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)):
    """Run both oracles over ``CASES``; returns (rows, finite-difference results by case name)."""
    rows: list[tuple[str, Row]] = []
    fd: dict[str, str] = {}
    for case in CASES:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            module = case.build().to(dtype)
            x, target = case.inputs(gen, dtype)
            rows.extend((case.name, row) for row in check_autograd(module, x, target, generator=gen))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        module = case.build().to(torch.float64)
        x, target = case.inputs(gen, torch.float64)
        try:
            check_finite_differences(module, x, target)
            fd[case.name] = "pass"
        except Exception as exc:  # report, then fail the command
            fd[case.name] = f"FAIL: {str(exc).splitlines()[0]}"
    return rows, fd


def format_table(rows: list[tuple[str, Row]], fd: dict[str, str]) -> str:
    """The per-tensor table, then one finite-difference line per case."""
    head = f"{'module':<32} {'tensor':<10} {'dtype':<8} {'max abs err':>12} {'max rel err':>12} {'tol':>8}  ok"
    lines = [head, "-" * len(head)]
    for case, r in rows:
        dtype = str(r.dtype).removeprefix("torch.")
        lines.append(
            f"{case:<32} {r.name:<10} {dtype:<8} {r.max_abs_error:12.3e} {r.max_rel_error:12.3e} "
            f"{r.tol:8.0e}  {'yes' if r.ok else 'NO'}"
        )
    lines.append("")
    lines.append("finite differences (torch.autograd.gradcheck, float64):")
    lines.extend(f"  {name:<32} {result}" for name, result in fd.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.gradcheck", description="Check every hand-written backward against autograd"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, fd = run_all(args.seed)
    print(format_table(rows, fd))
    failed = [f"{case}/{r.name}/{r.dtype}" for case, r in rows if not r.ok]
    failed += [name for name, result in fd.items() if result != "pass"]
    worst = {}
    for _, r in rows:
        worst[r.dtype] = max(worst.get(r.dtype, 0.0), r.max_rel_error)
    print()
    for dtype, err in worst.items():
        print(
            f"worst relative error, {str(dtype).removeprefix('torch.')}: {err:.3e} (tolerance {tolerance(dtype):.0e})"
        )
    if failed:
        print(f"FAILED: {len(failed)} check(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} gradients and {len(fd)} finite-difference checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
