"""The oneDNN matrix products (models/gemm.py) equal torch's, and the layers choose between them as documented.

oneDNN runs only for float32 CPU products of at least ``gemm.MIN_MACS`` multiply-adds that autograd is not
recording. Every check here is against float64 (the product's exact value to float32's precision) or
against the torch path of the same layer: a fast path is tested equal to the plain path it replaces.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from models import MLP, Linear, gemm
from trainer.module import BackpropModule

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="oneDNN's float32 GEMM is not in this torch")


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("transposed_a", [False, True])
def test_onednn_products_have_float32_precision(transposed_a: bool) -> None:
    # ∂C/∂W = gᵀ x multiplies a transposed view; ∂C/∂x = g W and the forward do not
    a = randn(0, 192, 160).t() if transposed_a else randn(0, 160, 192)
    b = randn(1, 192, 144)
    want = a.double() @ b.double()
    with gemm.use("onednn"):
        assert gemm.onednn_for(a.shape[0] * a.shape[1] * b.shape[1], a, b)
        got = gemm.mm(a, b)
    torch_error = relative_error(a @ b, want)
    # float32 rounding of a 192-term sum: about 1e-7 of the largest entry; bf16 or tf32 inside would be ≥ 1e-4
    assert relative_error(got, want) <= max(1e-6, 10 * torch_error)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_to_float32_precision(bias: bool) -> None:
    x, weight = randn(2, 130, 150), randn(3, 170, 150)
    b = randn(4, 170) if bias else None
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    with gemm.use("onednn"):
        got = gemm.linear(x, weight, b)
    assert got.shape == (130, 170)
    assert relative_error(got, want) <= 1e-6


def test_the_choice_follows_size_dtype_device_and_autograd() -> None:
    big = (256, 128, 64)  # m·k·n = 2 097 152 ≥ MIN_MACS
    a, b = randn(0, 256, 128), randn(1, 128, 64)
    macs = big[0] * big[1] * big[2]
    assert macs >= gemm.MIN_MACS
    with gemm.use("auto"):
        assert gemm.onednn_for(macs, a, b) == gemm.onednn_available()
        assert not gemm.onednn_for(gemm.MIN_MACS - 1, a, b)  # small: torch's kernel
        assert not gemm.onednn_for(macs, a.double(), b.double())  # float64: torch's kernel
        w = b.clone().requires_grad_()
        assert not gemm.onednn_for(macs, a, w)  # autograd would record it: torch's, differentiable kernel
        with torch.no_grad():
            assert gemm.onednn_for(macs, a, w) == gemm.onednn_available()
    with gemm.use("torch"):
        assert not gemm.onednn_for(macs, a, b)


def test_use_restores_the_backend_and_rejects_unknown_names() -> None:
    before = gemm.backend()
    with gemm.use("torch"):
        assert gemm.backend() == "torch"
    assert gemm.backend() == before
    with pytest.raises(ValueError, match="unknown GEMM backend 'mkl'.*auto, torch, onednn"):
        gemm.set_backend("mkl")


def test_an_unknown_backend_in_the_environment_is_one_clear_error() -> None:
    env = {**os.environ, "HANDGRAD_GEMM": "fastest"}
    result = subprocess.run(
        [sys.executable, "-c", "import models"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "HANDGRAD_GEMM = 'fastest' is unknown: choose one of auto, torch, onednn" in result.stderr


@needs_onednn
def test_a_large_mlp_step_on_onednn_equals_the_torch_step() -> None:
    # every product of the step on oneDNN ("onednn" lifts the size limit), against the same step on torch's
    torch.manual_seed(0)
    fast = BackpropModule(
        hidden=[256, 256], activation="sigmoid", loss="cross_entropy", lr=0.1, in_features=192, out_features=10
    ).train()
    plain = copy.deepcopy(fast)
    x, y = randn(5, 128, 192), torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(6))
    fast_opt, plain_opt = fast.configure_optimizers(), plain.configure_optimizers()
    for _ in range(3):
        with gemm.use("onednn"):
            fast_cost, _ = fast.update(x, y, fast_opt.update)
        with gemm.use("torch"):
            plain_cost, _ = plain.update(x, y, plain_opt.update)
        torch.testing.assert_close(fast_cost, plain_cost, rtol=1e-5, atol=1e-6)
        for p, q in zip(fast.model.parameters(), plain.model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_a_forward_under_autograd_stays_differentiable_on_the_onednn_backend() -> None:
    torch.manual_seed(0)
    model = MLP([192, 256, 10], "tanh").train()
    x = randn(7, 128, 192)
    with gemm.use("onednn"):
        out = model(x)  # parameters require grad and autograd records: torch's kernels
        out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_onednn
def test_accumulating_on_onednn_adds_to_the_gradient_already_there() -> None:
    torch.manual_seed(0)
    layer = Linear(192, 256)
    reference = copy.deepcopy(layer)
    with gemm.use("onednn"):
        for seed in range(2):
            layer(randn(seed, 128, 192))
            layer.backward(randn(10 + seed, 128, 256))  # accumulate=True: adds, as autograd does
    for seed in range(2):
        reference(randn(seed, 128, 192).double().float()).backward(randn(10 + seed, 128, 256))
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
