"""Every hand-written backward in ``models/``, proven against references.

The references: autograd on the same forward with a random upstream gradient (float64 and float32), central
finite differences (float64), ``torch.nn`` and ``torch.nn.functional``, and the seed's chain-rule formulas
written out from the layers' own weights. Never a number typed into the test. Shapes are drawn by
hypothesis and include a batch of 1 and a width of 1 (``test_batch_of_one_and_width_of_one`` makes sure).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from models import (
    ACTIVATIONS,
    LOSSES,
    MLP,
    REDUCTIONS,
    Layer,
    Linear,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    SquaredError,
    activation,
    make_loss,
)
from models.gradcheck import Row, check_autograd, check_finite_differences, compare, tolerance

SIZES = st.integers(1, 5)  # batch sizes and widths
SEEDS = st.integers(0, 2**32 - 1)
ACTIVATION_NAMES = sorted(ACTIVATIONS)
NN_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}

Draw = Callable[[st.SearchStrategy], object]
Size = Callable[[], int]
Case = tuple[Layer, Tensor, Tensor | None]  # module, input (or prediction), loss target (None for a layer)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    """float64 normal noise on the CPU, from ``gen`` (moved to the device and dtype later)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def seeded(draw: Draw) -> torch.Generator:
    """A generator for the data and the same seed for torch's global RNG (parameter init), both drawn."""
    seed = draw(SEEDS)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to(case: Case, device: str, dtype: torch.dtype) -> Case:
    """Move a case's module, input and (float) target to ``device`` and ``dtype``; class indices stay long."""
    module, x, target = case
    module = module.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    if target is not None:
        target = target.to(device=device, dtype=dtype if target.is_floating_point() else target.dtype)
    return module, x, target


def assert_rows_ok(rows: list[Row], module: Layer, dtype: torch.dtype) -> None:
    """One row for the input and one per parameter, each within the dtype's tolerance."""
    assert [r.name for r in rows] == ["input", *dict(module.named_parameters())]
    assert all(r.dtype == dtype and r.tol == tolerance(dtype) for r in rows)
    bad = [f"{r.module}.{r.name}: rel {r.max_rel_error:.3e} > {r.tol:.0e}" for r in rows if not r.ok]
    assert not bad, "\n".join(bad)


def output_shape(module: Layer, x: Tensor, target: Tensor | None = None) -> torch.Size:
    """The output's shape, from a copy, so ``module`` itself caches nothing."""
    with torch.no_grad():
        probe = copy.deepcopy(module)
        return (probe(x) if target is None else probe(x, target)).shape


def layers_of(module: Layer) -> list[Layer]:
    """The module and every Layer inside it."""
    return [m for m in module.modules() if isinstance(m, Layer)]


def double(case: Case) -> Case:
    """A float64 copy of a case with the same values: the truth that float32 results are held to."""
    module, x, target = case
    target = target.double() if target is not None and target.is_floating_point() else target
    return copy.deepcopy(module).double(), x.double(), target


def gradients(
    module: Layer, x: Tensor, target: Tensor | None, grad_output: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """(manual, autograd) gradients of the input and of each parameter, from one training forward."""
    x = x.detach().requires_grad_(True)
    params = list(module.parameters())
    module.train()
    module.zero_grad(set_to_none=True)
    out = module(x) if target is None else module(x, target)
    reference = torch.autograd.grad(out, [x, *params], grad_output)
    with torch.no_grad():
        manual = [module.backward(grad_output), *(p.grad for p in params)]
    module.zero_grad(set_to_none=True)
    return manual, list(reference)


def assert_agrees_with_autograd(name: str, manual: Tensor, reference: Tensor, truth: Tensor | None = None) -> None:
    """The issue's check, max relative error ≤ tolerance(dtype) against autograd, with one allowance.

    A float32 gradient that is a near-cancelling sum (a bias gradient Σₙ g whose terms almost cancel) cannot be
    resolved to 1e-5 by any float32 computation, autograd's included. ``truth``, autograd in float64 on the same
    values, tells those apart: where float32 autograd is itself off the truth by more than a tenth of the
    tolerance, the manual gradient must be no worse than autograd, within max(tolerance, 10 × autograd's error).
    """
    row = compare(name, "manual vs autograd", manual, reference)
    if row.ok:
        return
    message = f"{name}: rel {row.max_rel_error:.3e} > {row.tol:.0e}"
    assert truth is not None, message
    autograd_error = compare(name, "autograd vs float64", reference, truth).max_rel_error
    assert autograd_error > row.tol / 10, f"{message}, while float32 autograd is within {autograd_error:.1e} of float64"
    manual_error = compare(name, "manual vs float64", manual, truth).max_rel_error
    assert manual_error <= max(row.tol, 10 * autograd_error), (
        f"{message}; against float64 the manual gradient is off by {manual_error:.1e}, autograd by {autograd_error:.1e}"
    )


def assert_matches_autograd(case: Case, seed: int) -> None:
    """Manual backward against autograd on the same forward, with a random upstream gradient drawn from ``seed``.

    float64: ``check_autograd`` as it stands. float32: the same metric, judged by ``assert_agrees_with_autograd``.
    """
    module, x, target = case
    if x.dtype == torch.float64:
        rows = check_autograd(module, x, target, generator=torch.Generator().manual_seed(seed))
        assert_rows_ok(rows, module, x.dtype)
        return
    shape = output_shape(module, x, target)
    grad_output = randn(torch.Generator().manual_seed(seed), *shape).to(device=x.device, dtype=x.dtype)
    manual, reference = gradients(module, x, target, grad_output)
    _, truth = gradients(*double(case), grad_output.double())
    names = ["input", *dict(module.named_parameters())]
    for name, m, r, t in zip(names, manual, reference, truth, strict=True):
        assert m.dtype == x.dtype and m.shape == r.shape, name
        assert_agrees_with_autograd(name, m, r, t)


# ---------------------------------------------------------------------------------------------------------
# The modules under test, each with a random input: build(draw, size) -> (module, x, target), float64 on CPU.


def linear_case(bias: bool):
    def build(draw: Draw, size: Size) -> Case:
        n, fan_in, fan_out = size(), size(), size()
        gen = seeded(draw)
        return Linear(fan_in, fan_out, bias=bias), randn(gen, n, fan_in), None

    return build


def activation_case(name: str):
    def build(draw: Draw, size: Size) -> Case:
        n, k = size(), size()
        gen = seeded(draw)
        return activation(name), randn(gen, n, k, scale=3.0), None  # reach into the saturated tails

    return build


def sequential_case(draw: Draw, size: Size) -> Case:
    widths = [size() for _ in range(draw(st.integers(2, 4)))]
    n = size()
    gen = seeded(draw)
    layers: list[Layer] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [
            Linear(fan_in, fan_out, bias=draw(st.booleans())),
            activation(draw(st.sampled_from(ACTIVATION_NAMES))),
        ]
    if draw(st.booleans()):
        layers.pop()  # a linear output
    return Sequential(*layers), randn(gen, n, widths[0]), None


def mlp_case(draw: Draw, size: Size) -> Case:
    widths = [size() for _ in range(draw(st.integers(2, 4)))]
    n = size()
    act = draw(st.sampled_from(ACTIVATION_NAMES))
    output_act = draw(st.sampled_from([None, *ACTIVATION_NAMES]))
    gen = seeded(draw)
    return MLP(widths, act, output_act, bias=draw(st.booleans())), randn(gen, n, widths[0]), None


def squared_error_case(reduction: str):
    def build(draw: Draw, size: Size) -> Case:
        n, k = size(), size()
        gen = seeded(draw)
        pred, target = randn(gen, n, k), randn(gen, n, k)
        if k == 1 and draw(st.booleans()):
            target = target[:, 0]  # a 1-D target for a (N, 1) prediction
        return SquaredError(reduction), pred, target

    return build


def cross_entropy_case(reduction: str):
    def build(draw: Draw, size: Size) -> Case:
        n, k = size(), size()
        # Saturated softmax (large logits) has its own test against F.cross_entropy: there autograd on this forward
        # rounds p·g − g after scaling, which the manual (p − 1)·g avoids, so the two part by more than 1e-12.
        scale = draw(st.sampled_from([0.1, 1.0]))
        gen = seeded(draw)
        return SoftmaxCrossEntropy(reduction), randn(gen, n, k, scale=scale), torch.randint(0, k, (n,), generator=gen)

    return build


CASES: dict[str, Callable[[Draw, Size], Case]] = {
    "Linear": linear_case(bias=True),
    "Linear(bias=False)": linear_case(bias=False),
    **{ACTIVATIONS[name].__name__: activation_case(name) for name in ACTIVATION_NAMES},
    "Sequential": sequential_case,
    "MLP": mlp_case,
    **{f"SquaredError({r})": squared_error_case(r) for r in REDUCTIONS},
    **{f"SoftmaxCrossEntropy({r})": cross_entropy_case(r) for r in REDUCTIONS},
}
PARAMETRIZED = ["Linear", "Linear(bias=False)", "Sequential", "MLP"]


def draw_case(data: st.DataObject, kind: str, device: str, dtype: torch.dtype) -> Case:
    return to(CASES[kind](data.draw, lambda: data.draw(SIZES)), device, dtype)


# ---------------------------------------------------------------------------------------------------------
# The two oracles, for every module


def test_tolerances_are_the_issues() -> None:
    assert tolerance(torch.float64) <= 1e-12
    assert tolerance(torch.float32) <= 1e-5


@pytest.mark.parametrize("kind", CASES)
@given(data=st.data())
def test_manual_backward_matches_autograd(kind: str, device: str, dtype: torch.dtype, data: st.DataObject) -> None:
    assert_matches_autograd(draw_case(data, kind, device, dtype), data.draw(SEEDS))


@pytest.mark.parametrize("kind", CASES)
@given(data=st.data())
def test_manual_backward_passes_finite_differences(kind: str, device: str, data: st.DataObject) -> None:
    module, x, target = draw_case(data, kind, device, torch.float64)
    assert check_finite_differences(module, x, target)


@pytest.mark.parametrize("kind", CASES)
@settings(max_examples=3)
@given(data=st.data())
def test_batch_of_one_and_width_of_one(kind: str, device: str, dtype: torch.dtype, data: st.DataObject) -> None:
    module, x, target = to(CASES[kind](data.draw, lambda: 1), device, dtype)
    assert x.shape == (1, 1)
    assert_matches_autograd((module, x, target), data.draw(SEEDS))
    if dtype == torch.float64:
        assert check_finite_differences(module, x, target)


@pytest.mark.parametrize("output_activation", [None, *ACTIVATION_NAMES])
@pytest.mark.parametrize("hidden_activation", ACTIVATION_NAMES)
@settings(max_examples=4)
@given(widths=st.lists(SIZES, min_size=2, max_size=4), n=SIZES, seed=SEEDS)
def test_mlp_every_activation_pair(
    hidden_activation: str,
    output_activation: str | None,
    device: str,
    dtype: torch.dtype,
    widths: list[int],
    n: int,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, x, _ = to((MLP(widths, hidden_activation, output_activation), randn(gen, n, widths[0]), None), device, dtype)
    assert_matches_autograd((model, x, None), seed)
    if dtype == torch.float64:
        assert check_finite_differences(model, x)


DERIVATIVE_FROM_OUTPUT: dict[str, Callable[[Fraction], Fraction]] = {
    "sigmoid": lambda y: y * (1 - y),  # σ' = y(1 − y)
    "tanh": lambda y: 1 - y * y,  # tanh' = 1 − y²
}


@pytest.mark.parametrize("name", sorted(DERIVATIVE_FROM_OUTPUT))
@settings(max_examples=10)
@given(n=SIZES, k=SIZES, scale=st.sampled_from([1.0, 3.0, 6.0]), seed=SEEDS)
def test_activation_backward_is_as_precise_as_its_cache_allows(
    name: str, device: str, dtype: torch.dtype, n: int, k: int, scale: float, seed: int
) -> None:
    """Given the cached y, g·f'(y) is right to the dtype's tolerance, entry by entry, even near saturation.

    The reference evaluates g·f'(y) exactly, in rational arithmetic, from the very y and g the layer holds, so
    what is measured is the backward's own rounding: 1 − y·y loses the digits of a y near ±1, (1 − y)(1 + y)
    keeps them.
    """
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, n, k, scale=scale).to(device=device, dtype=dtype)
    grad_output = randn(gen, n, k).to(device=device, dtype=dtype)
    layer = activation(name)
    y = layer(x)
    manual = layer.backward(grad_output)
    exact = [
        float(Fraction(g) * DERIVATIVE_FROM_OUTPUT[name](Fraction(v)))
        for g, v in zip(grad_output.flatten().tolist(), y.flatten().tolist(), strict=True)
    ]
    reference = torch.tensor(exact, dtype=torch.float64, device=device).reshape(n, k)
    torch.testing.assert_close(manual.double(), reference, rtol=tolerance(dtype), atol=0)


# ---------------------------------------------------------------------------------------------------------
# Extreme inputs: saturated activations and huge logits stay finite, silent and right


def extreme_input(gen: torch.Generator, n: int, k: int, magnitude: float) -> Tensor:
    """±magnitude at random, plus a row of each sign so both tails are always hit: (n + 2, k)."""
    signs = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.float64) * 2 - 1
    return torch.cat([signs, torch.ones(1, k, dtype=torch.float64), -torch.ones(1, k, dtype=torch.float64)]) * magnitude


@pytest.mark.parametrize("magnitude", [1e3, 1e4])
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
@settings(max_examples=4)
@given(n=SIZES, k=SIZES, seed=SEEDS)
def test_activation_is_finite_and_silent_at_extreme_inputs(
    name: str, magnitude: float, device: str, dtype: torch.dtype, n: int, k: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = extreme_input(gen, n, k, magnitude).to(device=device, dtype=dtype)
    grad_output = randn(gen, *x.shape).to(device=device, dtype=dtype)
    layer = activation(name).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
        grad_input = layer.backward(grad_output)
        rows = check_autograd(activation(name).to(device), x, generator=gen)
    assert torch.isfinite(y).all() and torch.isfinite(grad_input).all()
    torch.testing.assert_close(y, NN_ACTIVATIONS[name]()(x), rtol=0, atol=0)  # the same op as torch.nn's
    assert_rows_ok(rows, layer, dtype)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
@settings(max_examples=4)
@given(widths=st.lists(SIZES, min_size=2, max_size=4), n=SIZES, seed=SEEDS)
def test_mlp_is_finite_and_silent_at_extreme_inputs(
    name: str, device: str, dtype: torch.dtype, widths: list[int], n: int, seed: int
) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP(widths, name, name).to(device=device, dtype=dtype)
    x = extreme_input(gen, n, widths[0], 1e4).to(device=device, dtype=dtype)
    target = randn(gen, x.shape[0], widths[-1]).to(device=device, dtype=dtype)
    loss = SquaredError()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = loss(model(x), target)
        grad_input = model.backward(loss.backward())
    assert torch.isfinite(cost) and torch.isfinite(grad_input).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@settings(max_examples=8)
@given(n=SIZES, k=st.integers(2, 5), magnitude=st.sampled_from([1e3, 1e4]), seed=SEEDS)
def test_cross_entropy_is_finite_and_correct_at_huge_logits(
    reduction: str, device: str, dtype: torch.dtype, n: int, k: int, magnitude: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Logits near −m, 0 and +m, with near-ties at ±m: the case that loses precision if z is not shifted first.
    levels = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.float64)
    logits = (levels * magnitude + randn(gen, n, k)).to(device=device, dtype=dtype)
    target = torch.randint(0, k, (n,), generator=gen).to(device)
    loss = SoftmaxCrossEntropy(reduction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = loss(logits, target)
        grad = loss.backward()
    assert torch.isfinite(cost) and torch.isfinite(grad).all()
    reference = logits.clone().requires_grad_(True)
    reference_cost = F.cross_entropy(reference, target, reduction=reduction)
    reference_cost.backward()
    tol = tolerance(dtype)
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=tol, atol=tol)
    row = compare("input", "SoftmaxCrossEntropy", grad, reference.grad)
    assert row.ok, f"rel {row.max_rel_error:.3e} > {row.tol:.0e}"


# ---------------------------------------------------------------------------------------------------------
# The cache: a backward needs its own training forward


@pytest.mark.parametrize("kind", CASES)
@settings(max_examples=3)
@given(data=st.data())
def test_backward_without_forward_raises_naming_the_layer(kind: str, data: st.DataObject) -> None:
    module, x, target = draw_case(data, kind, "cpu", torch.float64)
    grad_output = torch.randn(output_shape(module, x, target), dtype=torch.float64)
    # A Sequential hands the gradient to its last layer first: that is the layer without a cache.
    first_to_run = module[-1] if isinstance(module, Sequential) else module
    with pytest.raises(RuntimeError, match=rf"\b{type(first_to_run).__name__}\.backward\(\)"):
        module.backward(grad_output)


@pytest.mark.parametrize("kind", CASES)
@settings(max_examples=3)
@given(data=st.data())
def test_second_backward_raises_the_cache_is_released(kind: str, data: st.DataObject) -> None:
    module, x, target = draw_case(data, kind, "cpu", torch.float64)
    out = module(x) if target is None else module(x, target)
    grad_output = torch.randn_like(out)
    module.backward(grad_output)
    assert all(layer._cache is None for layer in layers_of(module))
    with pytest.raises(RuntimeError, match="without a forward"):
        module.backward(grad_output)


@pytest.mark.parametrize("kind", CASES)
@settings(max_examples=3)
@given(data=st.data())
def test_eval_forward_caches_nothing(kind: str, data: st.DataObject) -> None:
    module, x, target = draw_case(data, kind, "cpu", torch.float64)
    module.eval()
    out = module(x) if target is None else module(x, target)
    assert all(layer._cache is None for layer in layers_of(module))
    with pytest.raises(RuntimeError, match="without a forward"):
        module.backward(torch.randn_like(out))


@pytest.mark.parametrize("kind", CASES)
@settings(max_examples=3)
@given(data=st.data())
def test_release_drops_the_cache(kind: str, data: st.DataObject) -> None:
    module, x, target = draw_case(data, kind, "cpu", torch.float64)
    out = module(x) if target is None else module(x, target)
    module.release()
    assert all(layer._cache is None for layer in layers_of(module))
    with pytest.raises(RuntimeError, match="without a forward"):
        module.backward(torch.randn_like(out))


# ---------------------------------------------------------------------------------------------------------
# Accumulation, no_grad, and no graph


@pytest.mark.parametrize("kind", PARAMETRIZED)
@settings(max_examples=8)
@given(data=st.data())
def test_two_rounds_accumulate_like_autograd(kind: str, device: str, dtype: torch.dtype, data: st.DataObject) -> None:
    module, x1, _ = draw_case(data, kind, device, dtype)
    gen = torch.Generator().manual_seed(data.draw(SEEDS))
    x2 = randn(gen, *x1.shape).to(device=device, dtype=dtype)
    shape = output_shape(module, x1)
    upstream = [randn(gen, *shape).to(device=device, dtype=dtype) for _ in range(2)]
    autograd_twice, each_alone = copy.deepcopy(module), [copy.deepcopy(module), copy.deepcopy(module)]
    truth = copy.deepcopy(module).double()

    for x, g in zip((x1, x2), upstream, strict=True):
        autograd_twice(x).backward(g)  # autograd adds the second round into .grad
        truth(x.double()).backward(g.double())
    for alone, x, g in zip(each_alone, (x1, x2), upstream, strict=True):
        alone(x)
        alone.backward(g)

    first_round_grads = None
    for x, g in zip((x1, x2), upstream, strict=True):
        module(x)
        with torch.no_grad():
            module.backward(g)
        if first_round_grads is None:
            first_round_grads = [p.grad for p in module.parameters()]

    alone1, alone2 = (alone.parameters() for alone in each_alone)
    params = zip(
        module.named_parameters(),
        autograd_twice.parameters(),
        truth.parameters(),
        alone1,
        alone2,
        first_round_grads,
        strict=True,
    )
    for (name, p), q, t, p1, p2, first in params:
        assert p.grad is first  # accumulated in place, as autograd does: the .grad tensor is kept
        assert torch.equal(p.grad, p1.grad + p2.grad)  # exactly round 1 + round 2
        assert_agrees_with_autograd(name, p.grad, q.grad, t.grad if dtype == torch.float32 else None)


def regression_or_classes(loss_name: str, gen: torch.Generator, n: int, k: int) -> Tensor:
    """A target for ``loss_name``: (N, K) values, or (N,) class indices."""
    return randn(gen, n, k) if loss_name == "squared_error" else torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_name", LOSSES)
@settings(max_examples=6)
@given(data=st.data())
def test_manual_path_under_no_grad_matches_autograd(
    loss_name: str, reduction: str, device: str, dtype: torch.dtype, data: st.DataObject
) -> None:
    model, x, _ = draw_case(data, "MLP", device, dtype)
    gen = torch.Generator().manual_seed(data.draw(SEEDS))
    target = regression_or_classes(loss_name, gen, x.shape[0], model.widths[-1]).to(device)
    target = target.to(dtype) if target.is_floating_point() else target
    truth = [None] * (1 + len(list(model.parameters())))
    if dtype == torch.float32:
        truth_model, truth_x, truth_target = double((model, x, target))
        truth_x.requires_grad_(True)
        make_loss(loss_name, reduction)(truth_model(truth_x), truth_target).backward()
        truth = [truth_x.grad, *(p.grad for p in truth_model.parameters())]
    reference, x_ref = copy.deepcopy(model), x.clone().requires_grad_(True)
    reference_cost = make_loss(loss_name, reduction)(reference(x_ref), target)
    reference_cost.backward()  # autograd, outside no_grad

    loss = make_loss(loss_name, reduction)
    with torch.no_grad():
        cost = loss(model(x), target)
        grad_input = model.backward(loss.backward())

    tol = tolerance(dtype)
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=tol, atol=tol)
    manual = [("input", grad_input), *((n, p.grad) for n, p in model.named_parameters())]
    autograd = [x_ref.grad, *(q.grad for q in reference.parameters())]
    for (name, m), r, t in zip(manual, autograd, truth, strict=True):
        assert_agrees_with_autograd(name, m, r, t)


@pytest.mark.parametrize("loss_name", LOSSES)
@settings(max_examples=4)
@given(data=st.data())
def test_manual_backward_builds_no_autograd_graph(loss_name: str, data: st.DataObject) -> None:
    """Called with grad mode on, the manual path still leaves plain tensors, like autograd's .grad."""
    model, x, _ = draw_case(data, "MLP", "cpu", torch.float64)
    target = regression_or_classes(loss_name, torch.Generator().manual_seed(0), x.shape[0], model.widths[-1])
    loss = make_loss(loss_name)
    cost = loss(model(x), target.to(torch.float64) if target.is_floating_point() else target)
    assert cost.requires_grad  # the forward is differentiable by autograd ...
    grad_input = model.backward(loss.backward())  # ... the manual backward is not autograd
    assert not grad_input.requires_grad
    assert not any(p.grad.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Parameters: the names, shapes, init and state_dict of torch.nn


@settings(max_examples=10)
@given(fan_in=SIZES, fan_out=SIZES, bias=st.booleans())
def test_linear_parameters_are_nn_linears(fan_in: int, fan_out: int, bias: bool) -> None:
    ours, theirs = Linear(fan_in, fan_out, bias=bias), nn.Linear(fan_in, fan_out, bias=bias)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features)


@example(seed=0, fan_in=3, fan_out=4, bias=True, double=False)
@settings(max_examples=10)
@given(seed=SEEDS, fan_in=SIZES, fan_out=SIZES, bias=st.booleans(), double=st.booleans())
def test_linear_default_init_is_nn_linears_bit_for_bit(
    seed: int, fan_in: int, fan_out: int, bias: bool, double: bool
) -> None:
    dtype = torch.float64 if double else torch.float32
    torch.manual_seed(seed)
    ours = Linear(fan_in, fan_out, bias=bias, dtype=dtype)
    torch.manual_seed(seed)
    theirs = nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q), name


@settings(max_examples=10)
@given(seed=SEEDS, n=SIZES, fan_in=SIZES, fan_out=SIZES, bias=st.booleans())
def test_linear_state_dict_moves_to_nn_linear_and_back(
    device: str, dtype: torch.dtype, seed: int, n: int, fan_in: int, fan_out: int, bias: bool
) -> None:
    torch.manual_seed(seed)
    ours = Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    theirs = nn.Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())  # strict: same keys, same shapes
    x = torch.randn(n, fan_in, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    tol = tolerance(dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)

    back = Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    back.load_state_dict(theirs.state_dict())
    for p, q in zip(back.parameters(), ours.parameters(), strict=True):
        assert torch.equal(p, q)


finite32 = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)  # exact in float32
small32 = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=10)
@given(slope=finite32, intercept=finite32, n=SIZES, seed=SEEDS)
def test_from_values_is_the_seed_line(slope: float, intercept: float, n: int, seed: int) -> None:
    line = Linear.from_values(slope, intercept)
    dtype = torch.get_default_dtype()
    assert line.weight.shape == (1, 1) and line.bias.shape == (1,)
    assert torch.equal(line.weight, torch.full((1, 1), slope, dtype=dtype))
    assert torch.equal(line.bias, torch.full((1,), intercept, dtype=dtype))
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tol = tolerance(torch.float64)
    torch.testing.assert_close(line.double()(x), slope * x + intercept, rtol=tol, atol=tol)  # ŷ = m·x + c


@settings(max_examples=10)
@given(fan_in=SIZES, fan_out=SIZES, seed=SEEDS, bias=st.booleans())
def test_from_values_takes_a_matrix_and_a_vector(fan_in: int, fan_out: int, seed: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight, b = torch.randn(fan_out, fan_in, generator=gen), torch.randn(fan_out, generator=gen)
    layer = Linear.from_values(weight, b if bias else None)
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.bias, b) if bias else layer.bias is None


def nn_sequential_like(model: MLP) -> nn.Sequential:
    """The torch.nn twin of ``model``: nn.Linear where it has Linear, nn.Tanh where it has Tanh, ..."""
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    twins = [
        nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, Linear)
        else NN_ACTIVATIONS[names[type(m)]]()
        for m in model
    ]
    return nn.Sequential(*twins).to(torch.float64)


@settings(max_examples=10)
@given(data=st.data())
def test_mlp_state_dict_loads_into_an_nn_sequential(device: str, data: st.DataObject) -> None:
    model, x, _ = draw_case(data, "MLP", device, torch.float64)
    twin = nn_sequential_like(model).to(device)
    assert set(twin.state_dict()) == set(model.state_dict())
    twin.load_state_dict(model.state_dict())  # strict
    tol = tolerance(torch.float64)
    torch.testing.assert_close(model(x), twin(x), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# MLP structure and validation


@settings(max_examples=20)
@given(
    widths=st.lists(SIZES, min_size=2, max_size=5),
    hidden_activation=st.sampled_from(ACTIVATION_NAMES),
    output_activation=st.sampled_from([None, *ACTIVATION_NAMES]),
    bias=st.booleans(),
)
def test_mlp_structure(widths: list[int], hidden_activation: str, output_activation: str | None, bias: bool) -> None:
    model = MLP(widths, hidden_activation, output_activation, bias=bias)
    expected: list[type[Layer]] = []
    for i in range(len(widths) - 1):
        expected.append(Linear)
        if i < len(widths) - 2:
            expected.append(ACTIVATIONS[hidden_activation])  # after every hidden layer
    if output_activation is not None:
        expected.append(ACTIVATIONS[output_activation])  # after the last
    assert [type(layer) for layer in model] == expected
    assert [(m.in_features, m.out_features) for m in model.linears] == list(zip(widths[:-1], widths[1:], strict=True))
    assert all((m.bias is not None) == bias for m in model.linears)
    assert model.linears == [layer for layer in model if isinstance(layer, Linear)]


def test_mlp_one_one_is_the_line_and_one_one_one_the_chain() -> None:
    assert [type(layer) for layer in MLP([1, 1])] == [Linear]
    assert [type(layer) for layer in MLP([1, 1, 1], "sigmoid")] == [Linear, Sigmoid, Linear]
    assert [type(layer) for layer in MLP([1, 1, 1], "sigmoid", "sigmoid")] == [Linear, Sigmoid, Linear, Sigmoid]


@pytest.mark.parametrize(
    "widths", [[], [3], [0, 1], [1, 0], [2, -1], [-3, 2], [2, 0, 1], [1.5, 2], [2, True], [2, "3"]]
)
def test_mlp_rejects_bad_widths(widths: list) -> None:
    with pytest.raises(ValueError, match="widths"):
        MLP(widths)


def assert_lists_all(exc: pytest.ExceptionInfo, names) -> None:
    message = str(exc.value)
    assert all(name in message for name in names), message


@pytest.mark.parametrize("bad", ["softplus", "Gelu", "", None])
def test_unknown_activation_raises_listing_the_valid_names(bad: str | None) -> None:
    for build in (lambda: activation(bad), lambda: MLP([2, 1], activation=bad)):
        with pytest.raises(ValueError) as exc:
            build()
        assert_lists_all(exc, ACTIVATIONS)
    if bad is not None:
        with pytest.raises(ValueError) as exc:
            MLP([2, 1], output_activation=bad)
        assert_lists_all(exc, ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_names_are_case_insensitive(name: str) -> None:
    assert type(activation(name)) is ACTIVATIONS[name]
    assert type(activation(name.upper())) is ACTIVATIONS[name]


def test_unknown_loss_and_reduction_raise_listing_the_valid_names() -> None:
    with pytest.raises(ValueError) as exc:
        make_loss("hinge")
    assert_lists_all(exc, LOSSES)
    for build in (
        lambda: SquaredError("avg"),
        lambda: SoftmaxCrossEntropy("none"),
        lambda: make_loss("squared_error", "avg"),
        lambda: make_loss("cross_entropy", "Mean"),
    ):
        with pytest.raises(ValueError) as exc:
            build()
        assert_lists_all(exc, REDUCTIONS)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_make_loss_builds_the_named_loss(name: str, reduction: str) -> None:
    loss = make_loss(name, reduction)
    assert type(loss) is LOSSES[name] and loss.reduction == reduction


def test_sequential_takes_layers_only() -> None:
    with pytest.raises(TypeError, match="Layer"):
        Sequential(Linear(1, 1), nn.Linear(1, 1))


# ---------------------------------------------------------------------------------------------------------
# The seed: the one-neuron chain and the line, against the tutorial's chain-rule formulas


def chain_by_hand(weights: list[float], biases: list[float], x: float, d: float) -> dict[str, float]:
    """The tutorial's formulas, in float64 from the layers' own values, output layer first.

    z_l = w_l·a_{l−1} + b_l, a_l = σ(z_l) (a_{−1} = x), C = (a₂ − d)², σ′(z) = σ(z)(1 − σ(z)).
    """

    def sigma(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    def sigma_prime(z: float) -> float:
        return sigma(z) * (1.0 - sigma(z))

    inputs, zs = [], []  # the input of each layer, and its z
    a = x
    for w, b in zip(weights, biases, strict=True):
        inputs.append(a)
        zs.append(w * a + b)
        a = sigma(zs[-1])
    grads = {"cost": (a - d) ** 2}
    dC_da = 2.0 * (a - d)  # ∂C/∂a₂
    for layer in reversed(range(len(weights))):
        grads[f"w{layer}"] = inputs[layer] * sigma_prime(zs[layer]) * dC_da  # ∂C/∂w = a_{l−1}·σ′(z)·∂C/∂a
        grads[f"b{layer}"] = sigma_prime(zs[layer]) * dC_da  # ∂C/∂b = σ′(z)·∂C/∂a
        dC_da = weights[layer] * sigma_prime(zs[layer]) * dC_da  # ∂C/∂a_{l−1} = w·σ′(z)·∂C/∂a
    grads["x"] = dC_da
    return grads


def seed_chain(build: str) -> Sequential:
    if build == "sequential":
        return Sequential(Linear(1, 1), Sigmoid(), Linear(1, 1), Sigmoid(), Linear(1, 1), Sigmoid())
    return MLP([1, 1, 1, 1], "sigmoid", "sigmoid")


@pytest.mark.parametrize("build", ["sequential", "mlp"])
@settings(max_examples=10)
@given(seed=SEEDS, x=st.floats(-3, 3), d=st.floats(0, 1))
def test_one_neuron_chain_matches_the_formulas_by_hand(build: str, seed: int, x: float, d: float) -> None:
    torch.manual_seed(seed)
    chain = seed_chain(build).double()
    linears = [m for m in chain if isinstance(m, Linear)]
    expected = chain_by_hand([m.weight.item() for m in linears], [m.bias.item() for m in linears], x, d)

    loss = SquaredError(reduction="sum")  # one example: C = (a₂ − d)²
    cost = loss(chain(torch.tensor([[x]], dtype=torch.float64)), torch.tensor([[d]], dtype=torch.float64))
    with torch.no_grad():
        grad_x = chain.backward(loss.backward())

    def close(actual: Tensor, value: float) -> None:
        torch.testing.assert_close(actual.reshape(()), torch.tensor(value, dtype=torch.float64), rtol=1e-12, atol=1e-15)

    close(cost, expected["cost"])
    close(grad_x, expected["x"])
    for layer, m in enumerate(linears):
        close(m.weight.grad, expected[f"w{layer}"])
        close(m.bias.grad, expected[f"b{layer}"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@settings(max_examples=10)
@given(slope=small32, intercept=small32, n=SIZES, seed=SEEDS)
def test_the_line_matches_its_formulas(reduction: str, slope: float, intercept: float, n: int, seed: int) -> None:
    """ŷ = m·x + c, C = s Σ (ŷ − y)²  ⇒  ∂C/∂m = 2s Σ (ŷ − y)·x,  ∂C/∂c = 2s Σ (ŷ − y)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    line, loss = Linear.from_values(slope, intercept).double(), SquaredError(reduction)
    cost = loss(line(x.unsqueeze(1)), y)  # a 1-D target for the (N, 1) prediction
    with torch.no_grad():
        line.backward(loss.backward())
    s = 1.0 / n if reduction == "mean" else 1.0
    residual = slope * x + intercept - y
    tol = tolerance(torch.float64)
    torch.testing.assert_close(cost, s * (residual**2).sum(), rtol=tol, atol=tol)
    torch.testing.assert_close(line.weight.grad, (2 * s * (residual * x).sum()).reshape(1, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(line.bias.grad, (2 * s * residual.sum()).reshape(1), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# The losses against torch.nn.functional


@settings(max_examples=10)
@given(n=SIZES, seed=SEEDS, one_d_target=st.booleans())
def test_squared_error_mean_is_mse_for_one_output(
    device: str, dtype: torch.dtype, n: int, seed: int, one_d_target: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred, target = randn(gen, n, 1).to(device, dtype), randn(gen, n, 1).to(device, dtype)
    target = target[:, 0] if one_d_target else target
    loss = SquaredError("mean")
    cost = loss(pred, target)
    grad = loss.backward()
    reference = pred.clone().requires_grad_(True)
    reference_cost = F.mse_loss(reference, target.reshape(n, 1))
    reference_cost.backward()
    tol = tolerance(dtype)
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=tol, atol=tol)
    assert grad.shape == pred.shape
    assert compare("input", "SquaredError", grad, reference.grad).ok


@pytest.mark.parametrize("reduction", REDUCTIONS)
@settings(max_examples=10)
@given(n=SIZES, k=SIZES, seed=SEEDS)
def test_squared_error_reductions(reduction: str, device: str, dtype: torch.dtype, n: int, k: int, seed: int) -> None:
    """mean: the mean over examples of Σₖ (ŷₖ − yₖ)²; sum: the plain sum."""
    gen = torch.Generator().manual_seed(seed)
    pred, target = randn(gen, n, k).to(device, dtype), randn(gen, n, k).to(device, dtype)
    loss = SquaredError(reduction)
    cost = loss(pred, target)
    grad = loss.backward()
    reference = pred.clone().requires_grad_(True)
    per_entry = F.mse_loss(reference, target, reduction="none")  # (N, K)
    reference_cost = per_entry.sum(1).mean() if reduction == "mean" else F.mse_loss(reference, target, reduction="sum")
    reference_cost.backward()
    tol = tolerance(dtype)
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=tol, atol=tol)
    assert compare("input", "SquaredError", grad, reference.grad).ok


shapes = st.lists(SIZES, min_size=1, max_size=3).map(tuple)


@settings(max_examples=20)
@given(pred_shape=st.lists(SIZES, min_size=1, max_size=2).map(tuple), target_shape=shapes)
def test_squared_error_rejects_mismatched_shapes(pred_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    one_d_for_one_output = len(pred_shape) == 2 and pred_shape[1] == 1 and target_shape == pred_shape[:1]
    if target_shape == pred_shape or one_d_for_one_output:
        SquaredError()(torch.zeros(pred_shape), torch.zeros(target_shape))  # accepted
        return
    with pytest.raises(ValueError, match="shape"):
        SquaredError()(torch.zeros(pred_shape), torch.zeros(target_shape))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@settings(max_examples=10)
@given(n=SIZES, k=SIZES, scale=st.sampled_from([0.1, 1.0, 3.0]), seed=SEEDS)
def test_cross_entropy_is_torch_cross_entropy(
    reduction: str, device: str, dtype: torch.dtype, n: int, k: int, scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = randn(gen, n, k, scale=scale).to(device, dtype)
    target = torch.randint(0, k, (n,), generator=gen).to(device)
    loss = SoftmaxCrossEntropy(reduction)
    cost = loss(logits, target)
    grad = loss.backward()
    reference = logits.clone().requires_grad_(True)
    reference_cost = F.cross_entropy(reference, target, reduction=reduction)
    reference_cost.backward()
    tol = tolerance(dtype)
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=tol, atol=tol)
    assert compare("input", "SoftmaxCrossEntropy", grad, reference.grad).ok


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"), [((4,), (4,)), ((4, 3), (4, 1)), ((4, 3), (5,)), ((2, 4, 3), (2,)), ((4, 3), ())]
)
def test_cross_entropy_rejects_bad_shapes(logits_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="logits"):
        SoftmaxCrossEntropy()(torch.zeros(logits_shape), torch.zeros(target_shape, dtype=torch.long))
