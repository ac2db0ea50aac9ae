"""The gradient check itself: it passes the real layers, and it must be able to fail.

Deliberately broken layers (a σ whose backward is off by a factor, a Linear that gets ∂C/∂b wrong or forgets
it) must be flagged by both oracles; ``python -m models.gradcheck`` prints its table and exits 0, and
exits 1 when a case is broken.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

import models.gradcheck as gradcheck
from models import Linear, Sigmoid, SquaredError
from models.gradcheck import Case, check_autograd, check_finite_differences, compare, tolerance

ROOT = Path(__file__).resolve().parents[1]
SIZES = st.integers(1, 5)
SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------------------
# Broken layers: each gets one thing wrong


class ScaledSigmoid(Sigmoid):
    """σ whose backward is off by ``factor``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def backward(self, grad_output: Tensor) -> Tensor:
        return super().backward(grad_output) * self.factor


class LinearMeanBias(Linear):
    """∂C/∂b as the mean over the batch instead of the sum: right only for a batch of one."""

    def backward(self, grad_output: Tensor) -> Tensor:
        (x,) = self._saved()
        self._accumulate(self.weight, grad_output.t() @ x)
        self._accumulate(self.bias, grad_output.mean(0))
        return grad_output @ self.weight.detach()


class LinearForgetsBias(Linear):
    """Never accumulates ∂C/∂b."""

    def backward(self, grad_output: Tensor) -> Tensor:
        (x,) = self._saved()
        self._accumulate(self.weight, grad_output.t() @ x)
        return grad_output @ self.weight.detach()


class SquaredErrorWithoutTheTwo(SquaredError):
    """∂C/∂ŷ = s(ŷ − y): the 2 of the square forgotten."""

    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        return super().backward(grad_output) / 2


def inputs(seed: int, n: int, k: int, dtype: torch.dtype, device: str) -> Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


# ---------------------------------------------------------------------------------------------------------
# check_autograd flags them


@pytest.mark.parametrize("sign", [1, -1])
@settings(max_examples=8)
@given(n=SIZES, k=SIZES, seed=SEEDS)
def test_check_autograd_flags_an_error_of_100_tolerances_and_passes_one_of_a_hundredth(
    sign: int, device: str, dtype: torch.dtype, n: int, k: int, seed: int
) -> None:
    x = inputs(seed, n, k, dtype, device)
    tol = tolerance(dtype)
    (wrong,) = check_autograd(ScaledSigmoid(1 + sign * 100 * tol), x, generator=torch.Generator().manual_seed(seed))
    assert not wrong.ok and wrong.max_rel_error > tol
    (close,) = check_autograd(ScaledSigmoid(1 + sign * tol / 100), x, generator=torch.Generator().manual_seed(seed))
    assert close.ok
    (right,) = check_autograd(Sigmoid(), x, generator=torch.Generator().manual_seed(seed))
    assert right.ok


@settings(max_examples=10)
@given(n=SIZES, fan_in=SIZES, fan_out=SIZES, seed=SEEDS)
def test_check_autograd_flags_a_mean_bias_gradient_beyond_a_batch_of_one(
    device: str, dtype: torch.dtype, n: int, fan_in: int, fan_out: int, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = LinearMeanBias(fan_in, fan_out, device=device, dtype=dtype)
    rows = {r.name: r for r in check_autograd(layer, inputs(seed, n, fan_in, dtype, device))}
    assert rows["input"].ok and rows["weight"].ok  # only the bias is wrong ...
    assert rows["bias"].ok == (n == 1)  # ... and only when there is more than one example


@settings(max_examples=5)
@given(n=SIZES, fan_in=SIZES, fan_out=SIZES, seed=SEEDS)
def test_check_autograd_flags_a_forgotten_bias_gradient(n: int, fan_in: int, fan_out: int, seed: int) -> None:
    layer = LinearForgetsBias(fan_in, fan_out).double()
    with pytest.raises(AssertionError, match="bias has no manual gradient"):
        check_autograd(layer, inputs(seed, n, fan_in, torch.float64, "cpu"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@settings(max_examples=5)
@given(n=SIZES, k=SIZES, seed=SEEDS)
def test_check_autograd_flags_a_loss_without_the_two(
    reduction: str, dtype: torch.dtype, n: int, k: int, seed: int
) -> None:
    pred, target = inputs(seed, n, k, dtype, "cpu"), inputs(seed + 1, n, k, dtype, "cpu")
    (wrong,) = check_autograd(SquaredErrorWithoutTheTwo(reduction), pred, target)
    assert not wrong.ok
    (right,) = check_autograd(SquaredError(reduction), pred, target)
    assert right.ok


# ---------------------------------------------------------------------------------------------------------
# Finite differences flag them


def broken_cases(seed: int, n: int) -> list[tuple[str, object, Tensor, Tensor | None]]:
    torch.manual_seed(seed)
    x = inputs(seed, n + 1, 3, torch.float64, "cpu")  # n + 1 ≥ 2 examples: a mean bias gradient is wrong
    return [
        ("sigmoid off by 1%", ScaledSigmoid(1.01), x, None),
        ("mean bias gradient", LinearMeanBias(3, 2).double(), x, None),
        ("forgotten bias gradient", LinearForgetsBias(3, 2).double(), x, None),
        (
            "squared error without the 2",
            SquaredErrorWithoutTheTwo(),
            x,
            inputs(seed + 1, n + 1, 3, torch.float64, "cpu"),
        ),
    ]


@pytest.mark.parametrize("which", range(4))
@settings(max_examples=3)
@given(n=SIZES, seed=SEEDS)
def test_finite_differences_flag_every_broken_layer(which: int, n: int, seed: int) -> None:
    _, module, x, target = broken_cases(seed, n)[which]
    with pytest.raises(GradcheckError):
        check_finite_differences(module, x, target)


def test_finite_differences_need_float64() -> None:
    with pytest.raises(ValueError, match="float64"):
        check_finite_differences(Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="float64"):
        check_finite_differences(Linear(2, 2), torch.randn(3, 2, dtype=torch.float64))  # float32 parameters


# ---------------------------------------------------------------------------------------------------------
# The oracles leave the module as they found it


@settings(max_examples=5)
@given(n=SIZES, seed=SEEDS)
def test_finite_differences_keep_existing_grads(n: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = Linear(3, 2).double()
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in layer.parameters()]
    check_finite_differences(layer, inputs(seed, n, 3, torch.float64, "cpu"))
    assert all(torch.equal(p.grad, b) for p, b in zip(layer.parameters(), before, strict=True))
    assert layer._cache is None


def test_check_autograd_leaves_no_grads_and_no_cache() -> None:
    layer = Linear(3, 2).double()
    check_autograd(layer, torch.randn(4, 3, dtype=torch.float64))
    assert all(p.grad is None for p in layer.parameters())
    assert layer._cache is None


def test_compare() -> None:
    reference = torch.randn(3, 2, dtype=torch.float64)
    assert compare("w", "m", reference.clone(), reference).max_rel_error == 0.0
    row = compare("w", "m", 2 * reference, reference)
    assert row.max_rel_error == 1.0 and not row.ok  # |2r − r| / max|r| = 1 exactly: 2r − r is exact
    zero = torch.zeros(3, dtype=torch.float64)
    assert compare("b", "m", zero, zero).ok  # a zero gradient against a zero reference: no 0/0
    with pytest.raises(AssertionError, match="shape"):
        compare("w", "m", reference.t(), reference)
    with pytest.raises(AssertionError, match="no manual gradient"):
        compare("w", "m", None, reference)


def test_tolerances_tighten_with_precision() -> None:
    assert tolerance(torch.float64) <= 1e-12 and tolerance(torch.float32) <= 1e-5  # the bounds
    assert tolerance(torch.float64) < tolerance(torch.float32) < tolerance(torch.float16)
    assert tolerance(torch.bfloat16) == tolerance(torch.float16)


# ---------------------------------------------------------------------------------------------------------
# The command


def test_main_passes_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert gradcheck.main([]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "finite differences" in out
    assert all(case.name in out for case in gradcheck.CASES)
    assert " NO" not in out and "FAIL" not in out


def test_main_fails_on_a_broken_case(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def x(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, None]:
        return torch.randn(4, 3, generator=gen, dtype=dtype), None

    broken = Case("sigmoid off by 1%", lambda: ScaledSigmoid(1.01), x)
    monkeypatch.setattr(gradcheck, "CASES", [gradcheck.CASES[0], broken])
    assert gradcheck.main([]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "sigmoid off by 1%" in captured.err
    assert "NO" in captured.out and "FAIL" in captured.out


def test_python_m_models_gradcheck() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "models.gradcheck"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "max rel err" in result.stdout and "finite differences" in result.stdout
    assert all(case.name in result.stdout for case in gradcheck.CASES)
