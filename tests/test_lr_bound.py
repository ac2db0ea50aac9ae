"""The learning-rate bound of linear least squares, against autograd's Hessian and against gradient descent."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from tb_helpers import built, fit

from trainer.module import BackpropModule
from trainer.monitor import LearningRateWarning
from trainer.optimum import LeastSquares, least_squares, squared_error
from trainer.sgd import SGD


def _data(n: int, inputs: int, outputs: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen, dtype=torch.float64) * torch.linspace(
        0.5, 2.0, inputs, dtype=torch.float64
    )
    y = torch.randn(n, outputs, generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("inputs", "outputs", "weight_decay"), [(1, 1, 0.0), (3, 2, 0.0), (2, 3, 0.1)])
def test_bound_against_autograds_hessian(reduction, inputs, outputs, weight_decay):
    """2 / λ_max of the Hessian of C(θ) + (λ_wd/2)‖θ‖², θ = (W, b) flattened, by torch.autograd.functional."""
    x, y = _data(40, inputs, outputs)
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0

    def cost(theta):
        w = theta[: outputs * inputs].reshape(outputs, inputs)
        b = theta[outputs * inputs :]
        return scale * ((x @ w.T + b - y) ** 2).sum() + 0.5 * weight_decay * (theta * theta).sum()

    theta = torch.zeros(outputs * (inputs + 1), dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(cost, theta)
    reference = 2.0 / torch.linalg.eigvalsh(hessian).max().item()
    bound = LeastSquares(x, y, reduction).lr_bound(weight_decay=weight_decay)
    torch.testing.assert_close(bound, reference, rtol=1e-10, atol=0)


def test_gap_is_the_cost_minus_the_optimum():
    x, y = _data(50, 3, 2)
    quadratic = LeastSquares(x, y, "mean")
    weight, bias = least_squares(x, y)
    assert quadratic.cost == pytest.approx(squared_error(x, y, weight, bias, "mean"), rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
        b = torch.randn(2, generator=gen, dtype=torch.float64)
        exact = squared_error(x, y, w, b, "mean") - quadratic.cost
        assert quadratic.gap(w, b) == pytest.approx(exact, rel=1e-10)


def _descend(x, y, lr: float, momentum: float, steps: int) -> tuple[float, float]:
    """(first gap, last gap) of the hand-written SGD on the line, in float64."""
    module = BackpropModule(lr=lr, momentum=momentum, slope=1.0, intercept=0.0).double()
    quadratic = LeastSquares(x, y, "mean")
    opt = SGD(module.model.parameters(), lr=lr, momentum=momentum)
    lin = module.model.linears[0]
    first = quadratic.gap(lin.weight, lin.bias)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        module.forward_backward(x, y)
        opt.step()
    return first, quadratic.gap(lin.weight, lin.bias)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_gradient_descent_converges_below_the_bound_and_diverges_above(momentum):
    x, y = _data(60, 1, 1)
    bound = LeastSquares(x, y, "mean").lr_bound(momentum=momentum)
    first, last = _descend(x, y, 0.97 * bound, momentum, 2000)
    assert last < 1e-8 * first
    first, last = _descend(x, y, 1.03 * bound, momentum, 2000)
    assert last > first


def test_too_large_an_lr_on_the_line_warns_with_a_stable_one(tmp_path):
    model, dm = built("configs/line.yaml", tmp_path)
    bound = LeastSquares(dm.x_train, dm.y_train, model.hparams.reduction).lr_bound()
    lr = 1.5 * bound
    with pytest.warns(LearningRateWarning) as record:
        fit("configs/line.yaml", tmp_path, "--model.lr", str(lr), "--trainer.max_steps", "3")
    (warning,) = [w for w in record if issubclass(w.category, LearningRateWarning)]
    message = str(warning.message)
    assert f"model.lr = {lr:g}" in message
    named = float(re.search(r"Use a learning rate below ([0-9.e+-]+)", message).group(1))
    assert named == pytest.approx(bound, rel=1e-3)
    suggested = float(re.search(r"--model.lr ([0-9.e+-]+)", message).group(1))
    assert suggested < bound


def test_the_configured_lr_does_not_warn(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit("configs/line.yaml", tmp_path, "--trainer.max_steps", "3")
    assert not [w for w in record if issubclass(w.category, LearningRateWarning)]


def test_a_data_set_is_solved_once_while_it_is_unchanged():
    """LeastSquares.of hands back the solve of the same tensors; a change in place, other tensors or another
    reduction get a solve of their own, equal to a fresh LeastSquares."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 2, generator=gen)
    y = x @ torch.tensor([[1.5], [-2.0]]) + 0.3 + 0.1 * torch.randn(50, 1, generator=gen)
    first = LeastSquares.of(x, y, "mean")
    assert LeastSquares.of(x, y, "mean") is first
    assert LeastSquares.of(x, y, "sum") is not first
    assert LeastSquares.of(x.clone(), y, "mean") is not first
    y[0] += 5.0  # in place: the old solve no longer holds
    again = LeastSquares.of(x, y, "mean")
    assert again is not first
    fresh = LeastSquares(x, y, "mean")
    torch.testing.assert_close(again.optimum, fresh.optimum, rtol=0, atol=0)
    assert again.cost == fresh.cost
