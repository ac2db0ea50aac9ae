"""The hand-written SGD against torch.optim.SGD."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.sgd import SGD

SETTINGS = [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.01), (0.5, 0.3)]


def _twin_params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    ours = [p.requires_grad_() for p in ours]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    return ours, ref, gen


@pytest.mark.parametrize("momentum, weight_decay", SETTINGS)
def test_matches_torch_sgd_for_100_steps(momentum, weight_decay):
    ours, ref, gen = _twin_params(0)
    opt = SGD(ours, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    opt_ref = torch.optim.SGD(ref, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for _ in range(100):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ours]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum, weight_decay", SETTINGS[:2])
def test_matches_torch_sgd_on_a_real_cost(momentum, weight_decay):
    """Gradients from a real cost each step (so the trajectories feed back), with a scheduler driving lr."""
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(32, 3, generator=gen, dtype=torch.float64),
        torch.randn(32, 1, generator=gen, dtype=torch.float64),
    )
    w0 = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    w, w_ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = SGD([w], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt_ref = torch.optim.SGD([w_ref], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=10, gamma=0.5)
    for _ in range(100):
        for param, o in ((w, opt), (w_ref, opt_ref)):
            o.zero_grad()
            ((x @ param.T - y) ** 2).mean().backward()
            o.step()
        sched.step()
        sched_ref.step()
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"]
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)


def test_step_calls_the_closure_and_returns_its_cost():
    p = torch.zeros(2, requires_grad=True)
    opt = SGD([p], lr=0.5)
    calls = []

    def closure():
        calls.append(1)
        p.grad = torch.ones(2)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0
    assert calls == [1]
    torch.testing.assert_close(p.detach(), torch.full((2,), -0.5))


def test_parameters_without_gradient_are_left_alone():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad = torch.ones(2)
    SGD([a, b], lr=0.1, momentum=0.9).step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert not torch.equal(a.detach(), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-3}, "weight_decay"),
    ],
)
def test_invalid_settings_are_refused(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SGD([torch.zeros(1, requires_grad=True)], **kwargs)
