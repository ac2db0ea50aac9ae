"""Every fast path of the training step equals the plain path it replaces.

The fast paths: gradients written over the kept ``.grad`` buffers (``accumulate=False``) instead of zero_grad
and accumulate; no ∂C/∂input for the first layer (``input_grad=False``); Sigmoid's fused backward; caches
that hold references (a Linear's input and the activation's output below it are one storage); the
softmax-minus-one-hot cache of the cross-entropy; ``SGD.update`` without torch's step wrapper;
``BackpropModule.update`` as one step; and several updates per ``training_step`` call (``steps_per_call``).
Each is checked against the plain path or autograd, bit for bit where the claim is bit-exactness.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _util import quiet_trainer
from torch import Tensor

from models import MLP, Linear, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, Tanh
from trainer.callbacks import Convergence
from trainer.data import RegressionData
from trainer.module import BackpropModule, ConfigError
from trainer.sgd import SGD
from trainer.steps import StepGroup, StepGroups

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float64, torch.float32]


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(module: torch.nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------------------
# accumulate=False and input_grad=False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_written_over_equals_zero_grad_then_backward_bit_for_bit(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    fast = Linear(7, 5, bias=bias).to(dtype)
    plain = copy.deepcopy(fast)
    kept = None
    for round_ in range(3):  # the first round allocates, the next ones write over the same buffers
        x, g = randn(round_, 11, 7, dtype=dtype), randn(10 + round_, 11, 5, dtype=dtype)
        plain.zero_grad(set_to_none=True)
        plain(x)
        plain_input = plain.backward(g)
        fast(x)
        fast_input = fast.backward(g, accumulate=False)
        assert torch.equal(fast_input, plain_input)
        for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        if kept is None:
            kept = [p.grad for p in fast.parameters()]
        assert all(p.grad is k for p, k in zip(fast.parameters(), kept, strict=True))  # no new tensors


def test_accumulate_true_still_adds_like_autograd() -> None:
    torch.manual_seed(0)
    layer = Linear(3, 2).double()
    reference = copy.deepcopy(layer)
    for round_ in range(2):
        x, g = randn(round_, 4, 3), randn(5 + round_, 4, 2)
        layer(x)
        layer.backward(g)  # the default: accumulate, as autograd does
        reference(x).backward(g)
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_mlp_fast_backward_equals_plain_backward_bit_for_bit(activation: str) -> None:
    torch.manual_seed(0)
    fast = MLP([3, 6, 5, 2], activation, "sigmoid").double()
    plain = copy.deepcopy(fast)
    for round_ in range(2):
        x, g = randn(round_, 8, 3), randn(20 + round_, 8, 2)
        plain.zero_grad(set_to_none=True)
        plain(x)
        plain.backward(g)
        fast(x)
        assert fast.backward(g, accumulate=False, input_grad=False) is None  # no ∂C/∂x for the data
        for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_nested_sequential_passes_the_options_down() -> None:
    torch.manual_seed(0)
    inner = Sequential(Linear(2, 3), Tanh())
    fast = Sequential(inner, Linear(3, 1)).double()
    plain = copy.deepcopy(fast)
    x, g = randn(0, 4, 2), randn(1, 4, 1)
    for model in (fast, plain):
        model(x)
        model.backward(g)  # round 1 fills .grad
    plain.zero_grad(set_to_none=True)
    plain(x)
    plain.backward(g)
    fast(x)
    assert fast.backward(g, accumulate=False, input_grad=False) is None
    for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


# ---------------------------------------------------------------------------------------------------------
# Fused Sigmoid backward and the caches


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_fused_backward_equals_the_formula(dtype: torch.dtype) -> None:
    x, g = randn(0, 64, 9, dtype=dtype) * 4, randn(1, 64, 9, dtype=dtype)
    layer = Sigmoid()
    y = layer(x)
    fused = layer.backward(g)
    plain = g * y * (1 - y)  # the formula written out, three passes
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fused, plain, rtol=4 * eps, atol=4 * eps * g.abs().max().item())


def test_linear_and_the_activation_below_it_cache_one_storage() -> None:
    torch.manual_seed(0)
    model = MLP([3, 5, 2], "sigmoid").double()
    x = randn(0, 4, 3)
    with torch.no_grad():
        model(x)
    first, activation, second = model
    assert first._cache[0] is x  # a reference to the input, not a copy
    assert second._cache[0] is activation._cache[0]  # σ's output is the next layer's input: kept once
    model.release()


def _layer_by_layer(model: Sequential, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The plain path: each layer's out-of-place forward, then each backward, by hand, no layer in place."""
    out = x
    for layer in model:
        out = layer.forward(out)
    grad = g
    for layer in reversed(list(model)):
        grad = layer.backward(grad, accumulate=False) if layer.holds_parameters else layer.backward(grad)
    return out, grad, grads(model)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("output_activation", [None, "sigmoid"])
def test_activations_in_place_inside_a_sequential_equal_the_plain_path_bit_for_bit(
    dtype: torch.dtype, activation: str, output_activation: str | None
) -> None:
    torch.manual_seed(0)
    fast = MLP([4, 6, 5, 3], activation, output_activation).to(dtype)
    plain = copy.deepcopy(fast)
    x, g = randn(0, 8, 4, dtype=dtype) * 3, randn(1, 8, 3, dtype=dtype)
    x_before, g_before = x.clone(), g.clone()
    with torch.no_grad():
        want_out, want_grad, want_grads = _layer_by_layer(plain, x, g)
        out = fast(x)
        got_out = out.clone()
        got_grad = fast.backward(g, accumulate=False)
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_grad, want_grad)
    for got, want in zip(grads(fast), want_grads, strict=True):
        assert torch.equal(got, want)
    # the caller's tensors are never overwritten: only those a Linear inside made
    assert torch.equal(x, x_before) and torch.equal(g, g_before)


def test_activation_in_place_leaves_what_a_hook_kept_alone() -> None:
    torch.manual_seed(0)
    model = MLP([3, 5, 2], "sigmoid").double()
    kept: list[Tensor] = []
    model[0].register_forward_hook(lambda module, inputs, output: kept.append(output))
    x = randn(0, 4, 3)
    with torch.no_grad():
        model(x)
        want = F.linear(x, model[0].weight, model[0].bias)
    assert torch.equal(kept[0], want)  # the first Linear's product, not σ of it
    model.release()


def test_a_subclass_that_replaces_backward_or_forward_is_never_bypassed_by_the_in_place_form() -> None:
    class Doubled(Sigmoid):  # a user's change to the math: the in-place form must not skip it
        def backward(self, grad_output: Tensor) -> Tensor:
            return 2 * super().backward(grad_output)

    class Shifted(Sigmoid):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x + 1)

    x, g = randn(0, 4, 3), randn(1, 4, 2)
    for changed in (Doubled, Shifted):
        torch.manual_seed(0)
        model = Sequential(Linear(3, 5), changed(), Linear(5, 2)).double()
        reference = Sequential(Linear(3, 5), changed(), Linear(5, 2)).double()
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            out = model(x)
            got = model.backward(g, accumulate=False)
            want_out, want, _ = _layer_by_layer(reference, x, g)
        assert not model[1].in_place_ok("forward" if changed is Shifted else "backward")
        assert torch.equal(out, want_out) and torch.equal(got, want)
    assert Sigmoid().in_place_ok("forward") and Sigmoid().in_place_ok("backward")


@pytest.mark.parametrize("layer", [Sigmoid, Tanh, ReLU], ids=lambda cls: cls.__name__)
def test_in_place_forms_write_over_their_input_only_outside_autograd(layer: type) -> None:
    x, g = randn(0, 4, 3), randn(1, 4, 3)
    act = layer()
    with torch.no_grad():
        y = act.forward_in_place(x)
        assert y is x  # no new (N, O) buffer: that is the saving
        if layer is not Tanh:  # Tanh's backward keeps its temporary (see models/activations.py)
            assert act.backward_in_place(g) is g
        else:
            act.release()
    x = randn(0, 4, 3).requires_grad_(True)
    y = act.forward_in_place(x)  # under autograd: out of place, so the graph stays right
    assert y is not x and y.grad_fn is not None
    act.release()


def test_cache_is_detached_when_forward_runs_under_autograd() -> None:
    model = MLP([2, 3, 1], "tanh").double()
    x = randn(0, 4, 2).requires_grad_(True)
    model(x)
    cached = [t for layer in model for t in layer._cache]
    assert cached and not any(t.requires_grad for t in cached)
    model.release()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_cache_gives_autograds_gradient(reduction: str) -> None:
    logits, target = randn(0, 9, 4) * 5, torch.randint(0, 4, (9,), generator=torch.Generator().manual_seed(1))
    loss = SoftmaxCrossEntropy(reduction)
    cost = loss(logits, target)
    (cached,) = loss._cache
    assert cached.shape == logits.shape  # one (N, K) tensor: no logits, lse or targets kept
    grad = loss.backward(2.5)
    reference = logits.clone().requires_grad_(True)
    reference_cost = F.cross_entropy(reference, target, reduction=reduction)
    (2.5 * reference_cost).backward()
    torch.testing.assert_close(cost, reference_cost.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# SGD.update and BackpropModule.update


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 0.01)])
def test_sgd_update_equals_step_and_torch_sgd(momentum: float, weight_decay: float) -> None:
    params = [torch.nn.Parameter(randn(i, 4, 3)) for i in range(2)]
    direct = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours_step = SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ours_update = SGD(direct, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    theirs = torch.optim.SGD(reference, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for round_ in range(3):
        for group in (params, direct, reference):
            for i, p in enumerate(group):
                p.grad = randn(100 * round_ + i, 4, 3)
        ours_step.step()
        ours_update.update()
        theirs.step()
    for p, q, r in zip(params, direct, reference, strict=True):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


def _module(**overrides) -> BackpropModule:
    torch.manual_seed(0)
    settings = {"hidden": [6, 5], "activation": "sigmoid", "lr": 0.3, "in_features": 2, "out_features": 3}
    settings.update(overrides)
    return BackpropModule(**settings).double()


@pytest.mark.parametrize("loss", ["squared_error", "cross_entropy"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_module_update_equals_the_plain_step_bit_for_bit(loss: str, momentum: float) -> None:
    fast = _module(loss=loss, momentum=momentum)
    plain = copy.deepcopy(fast)
    fast_opt, plain_opt = fast.configure_optimizers(), plain.configure_optimizers()
    for round_ in range(4):
        x = randn(round_, 10, 2)
        y = randn(50 + round_, 10, 3) if loss == "squared_error" else torch.arange(10) % 3
        plain_opt.zero_grad(set_to_none=True)  # the plain step: zero, accumulate, step
        plain_cost = plain.forward_backward(x, y)
        plain_opt.step()
        cost, _ = fast.update(x, y, fast_opt.update)
        assert torch.equal(cost, plain_cost)
        for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p, q)


def test_module_update_matches_autograd_and_torch_sgd() -> None:
    fast = _module()
    reference = torch.nn.Sequential(
        torch.nn.Linear(2, 6), torch.nn.Sigmoid(), torch.nn.Linear(6, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 3)
    ).double()
    reference.load_state_dict(fast.model.state_dict())
    opt, reference_opt = fast.configure_optimizers(), torch.optim.SGD(reference.parameters(), lr=0.3)
    for round_ in range(4):
        x, y = randn(round_, 10, 2), randn(50 + round_, 10, 3)
        fast.update(x, y, opt.update)
        reference_opt.zero_grad()
        (F.mse_loss(reference(x), y, reduction="sum") / 10).backward()  # SquaredError(mean): 1/N Σₙ Σₖ
        reference_opt.step()
    for p, q in zip(fast.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# Several updates per call


class _Batches:
    """An epoch iterable like IndexBatches: ``m`` labelled batches per epoch, epochs counted."""

    def __init__(self, m: int) -> None:
        self.m, self.epoch, self.state = m, 0, {"epoch": 0}

    def __len__(self) -> int:
        return self.m

    def __iter__(self):
        self.epoch += 1
        return iter([(torch.tensor([self.epoch]), torch.tensor([i])) for i in range(self.m)])

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state) -> None:
        self.epoch = state["epoch"]


def _labels(group: StepGroup) -> list[tuple[int, int]]:
    assert isinstance(group, StepGroup)
    return [(int(x), int(y)) for x, y in group]


@pytest.mark.parametrize(("m", "k"), [(5, 2), (5, 5), (3, 4), (6, 3)])
def test_step_groups_cut_each_epoch_in_order_never_across_its_end(m: int, k: int) -> None:
    groups = StepGroups(_Batches(m), k)
    assert len(groups) == -(-m // k) and not groups.full_batch
    for epoch in (1, 2):
        got = [_labels(group) for group in groups]
        assert [len(g) for g in got] == [min(k, m - i) for i in range(0, m, k)]
        assert [pair for g in got for pair in g] == [(epoch, i) for i in range(m)]


def test_step_groups_repeat_a_full_batch_k_times_one_epoch_each() -> None:
    batches = _Batches(1)
    groups = StepGroups(batches, 4)
    assert len(groups) == 1 and groups.full_batch
    (group,) = list(groups)
    assert _labels(group) == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert groups.state_dict() == batches.state_dict() == {"epoch": 4}


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_step_groups_and_the_model_key_reject_bad_counts(k) -> None:
    with pytest.raises(ValueError, match="steps_per_call"):
        StepGroups(_Batches(2), k)
    with pytest.raises(ConfigError, match="model.steps_per_call"):
        BackpropModule(steps_per_call=k)


def _quiet() -> None:
    from trainer.cli import _quiet_warnings

    _quiet_warnings()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _fit(
    tmp_path: Path,
    name: str,
    k: int,
    batch_size: int | None,
    max_steps: int,
    tol: float = 0.0,
    log_every: int = 1,
    module_class: type[BackpropModule] = BackpropModule,
):
    from lightning.pytorch.loggers import TensorBoardLogger

    _quiet()
    torch.manual_seed(0)
    dm = RegressionData(n=50, batch_size=batch_size, val_fraction=0.2, noise=0.1)
    module = module_class(hidden=[4], activation="tanh", lr=0.1, steps_per_call=k)
    convergence = Convergence(tol=tol, patience=3)
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        logger=TensorBoardLogger(str(tmp_path), name=name, default_hp_metric=False),
        log_every_n_steps=log_every,
        callbacks=[convergence],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    return trainer, module, convergence


def _cost_events(log_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/cost")]


@pytest.mark.parametrize(("batch_size", "max_steps"), [(None, 10), (16, 11)])
def test_steps_per_call_makes_the_same_updates_and_logs_them_at_the_same_steps(
    tmp_path: Path, batch_size: int | None, max_steps: int
) -> None:
    # Full batch: a call is 4 epochs. Mini-batches of 16 from 40 examples: 3 a epoch, so calls of 3; 11
    # updates end mid-call, which must stop at max_steps exactly.
    one, one_module, one_conv = _fit(tmp_path, "one", 1, batch_size, max_steps)
    four, four_module, four_conv = _fit(tmp_path, "four", 4, batch_size, max_steps)
    assert one.global_step == four.global_step == max_steps
    for p, q in zip(one_module.parameters(), four_module.parameters(), strict=True):
        assert torch.equal(p, q)
    ones, fours = _cost_events(one.logger.log_dir), _cost_events(four.logger.log_dir)
    assert [s for s, _ in fours] == [s for s, _ in ones] == list(range(max_steps))
    torch.testing.assert_close(torch.tensor([v for _, v in fours]), torch.tensor([v for _, v in ones]))
    assert four_conv.previous == one_conv.previous  # the convergence check saw the same costs
    if batch_size is not None:
        assert four.current_epoch == one.current_epoch  # with mini-batches an epoch is still one pass


class _LoggedByLightning(BackpropModule):
    """The reference for our logging: one update per call, its cost through Lightning's own self.log."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        cost, _ = self.update(x, y, self.optimizers().step)
        self.log("train/cost", cost, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return cost


@pytest.mark.parametrize("log_every", [1, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_costs_are_logged_at_the_steps_and_values_lightning_logs(tmp_path: Path, k: int, log_every: int) -> None:
    ours, _, _ = _fit(tmp_path, f"ours{k}", k, None, 10, log_every=log_every)
    theirs, _, _ = _fit(tmp_path, "lightning", 1, None, 10, log_every=log_every, module_class=_LoggedByLightning)
    assert _cost_events(ours.logger.log_dir) == _cost_events(theirs.logger.log_dir)
    assert ours.callback_metrics["train/cost"].ndim == 0  # the last cost, for callbacks and the progress bar


def test_steps_per_call_convergence_checks_every_update(tmp_path: Path) -> None:
    one, _, _ = _fit(tmp_path, "one", 1, None, 400, tol=1e-3)
    four, _, _ = _fit(tmp_path, "four", 4, None, 400, tol=1e-3)
    assert one.global_step < 400, "the reference run should converge before max_steps"
    # The stop is decided at the same update; the call it falls in runs to its end.
    assert four.global_step == -(-one.global_step // 4) * 4


def test_a_data_module_reused_with_one_step_per_call_hands_over_single_batches(tmp_path: Path) -> None:
    from trainer.data import IndexBatches

    _quiet()
    dm = RegressionData(n=20, batch_size=None)
    for k, loader_type in ((4, StepGroups), (1, IndexBatches)):
        trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(BackpropModule(steps_per_call=k), dm)
        assert type(trainer.train_dataloader) is loader_type and trainer.global_step == 4


def test_steps_per_call_needs_handgrads_data_modules() -> None:
    _quiet()
    module = BackpropModule(steps_per_call=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1)))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="steps_per_call = 2 needs one of handgrad's"):
        warnings.simplefilter("ignore")  # Lightning's note that there is no validation data
        trainer.fit(module, train_dataloaders=data)


def test_steps_per_call_from_the_cli(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "trainer", "fit", "--config", "configs/line.yaml"]
    args += ["--model.steps_per_call", "8", "--trainer.max_steps", "20", "--progress_bar.refresh_rate", "0"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--convergence.tol", "0"]
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (summary_path,) = tmp_path.glob("line/version_*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 20
    assert [s for s, _ in _cost_events(str(summary_path.parent))] == list(range(20))


# ---------------------------------------------------------------------------------------------------------
# The benchmark's own accounting


def _benchmark():
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    return benchmark


def test_memory_counts_each_storage_once_and_leaves_out_parameters() -> None:
    benchmark = _benchmark()
    module = BackpropModule(hidden=[8, 6], activation="sigmoid", loss="cross_entropy", in_features=5, out_features=3)
    reference, loss, _ = benchmark.reference_of(module)
    x, y = torch.randn(7, 5), torch.arange(7) % 3
    params = {p.untyped_storage().data_ptr() for p in (*module.parameters(), *reference.parameters())}
    ours = benchmark.saved_by_ours(module, x, y, params)
    theirs = benchmark.saved_by_autograd(reference, loss, x, y, params)
    # What backward needs: the input, each hidden activation once, and one (N, K) tensor for the loss.
    needed = (7 * 5 + 7 * 8 + 7 * 6 + 7 * 3) * 4
    assert sum(ours.values()) == needed
    assert sum(ours.values()) <= sum(theirs.values())
    assert all(layer._cache is None for layer in module.model)  # released after counting


def test_the_loop_comparison_times_the_fit_and_the_bare_slices_between_it_apart(tmp_path: Path, monkeypatch) -> None:
    """loop.<case>: a bare slice runs between every two fit slices, inside the fit, and none of its time
    may count as the fit's. Each bare slice here also burns 60 ms of CPU after timing itself: were it
    charged to the fit, each fit slice would read 5 ms an update more."""
    import dataclasses

    benchmark = _benchmark()
    cpu = torch.device("cpu")
    settings = benchmark.Settings(cpu, True, benchmark.Clock(cpu), tmp_path)
    case = dataclasses.replace(benchmark.CASES["line"], steps_per_call=4)
    slices, calls, burn = 3, 3, 0.06
    timed = benchmark.BareLoop.run
    returned: list[float] = []

    def run(self, updates: int) -> float:
        seconds = timed(self, updates)
        returned.append(seconds)
        t0 = time.process_time()
        while time.process_time() - t0 < burn:
            pass
        return seconds

    monkeypatch.setattr(benchmark.BareLoop, "run", run)
    pairs = benchmark.sliced_loop(case, settings, slices, calls)
    assert len(pairs) == slices
    assert len(returned) == 1 + slices + 1  # the warm-up, then one before the first fit slice and one after each
    bare = returned[1:]
    for j, (fit, reference) in enumerate(pairs):
        assert reference == pytest.approx((bare[j] + bare[j + 1]) / 2)  # the slices either side of it
        assert 0 < fit < burn / (calls * case.steps_per_call) / 4  # 5 ms an update, had the burn counted


def test_benchmark_reports_json_and_rejects_unknown_names(tmp_path: Path, capsys) -> None:
    benchmark = _benchmark()
    out = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--only", "step.line,memory.mlp_l", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "threads", "ratios", "rows"} <= set(report)
    assert set(report["ratios"]) == {"step.line", "memory.mlp_l"}
    assert all(r > 0 for r in report["ratios"].values())
    assert report["threads"] == torch.get_num_threads() == 1
    timed = [row for row in report["rows"] if row.get("comparison") == "step.line" and "seconds" in row]
    assert {row["side"] for row in timed} == {"ours", "reference"} and all(row["seconds"] > 0 for row in timed)
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("wrote")
    assert "ratios" in printed and printed.index("ratios") > printed.index("memory.mlp_l")
    assert benchmark.main(["--only", "step.nothing"]) == 2
    assert "unknown comparison step.nothing" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_paths_on_cuda_equal_the_cpu_plain_path() -> None:
    fast = _module().cuda()
    plain = copy.deepcopy(fast).cpu()
    opt, plain_opt = fast.configure_optimizers(), plain.configure_optimizers()
    for round_ in range(3):
        x, y = randn(round_, 10, 2), randn(50 + round_, 10, 3)
        fast.update(x.cuda(), y.cuda(), opt.update)
        plain_opt.zero_grad(set_to_none=True)
        plain.forward_backward(x, y)
        plain_opt.step()
    for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Calls without nn.Module's hook machinery, the one-neuron Linear, the loss's cached scales


def test_layers_called_directly_still_run_every_hook() -> None:
    torch.manual_seed(0)
    model = MLP([2, 3, 1], "tanh").train()
    seen: list[str] = []
    model[0].register_forward_hook(lambda m, args, out: seen.append("child"))
    model.register_forward_pre_hook(lambda m, args: seen.append("model pre"))
    with torch.no_grad():
        model(randn(0, 4, 2, dtype=torch.float32))
    assert seen == ["model pre", "child"]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        seen.clear()
        with torch.no_grad():
            model(randn(0, 4, 2, dtype=torch.float32))
    finally:
        handle.remove()
    assert seen.count("child") == 1 and {"Linear", "Tanh", "MLP"} <= set(seen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_one_neuron_linear_equals_the_general_product(dtype: torch.dtype) -> None:
    from models import gemm

    neuron = Linear.from_values(0.7, -0.2).to(dtype)
    x, g = randn(0, 50, 1, dtype=dtype), randn(1, 50, 1, dtype=dtype)
    with torch.no_grad():
        fast = neuron(x)  # b + x·w, one elementwise op
        fast_input = neuron.backward(g)
        with gemm.use("torch"):  # the general path: x Wᵀ + b as a matrix product
            plain = neuron(x)
            plain_grads = [p.grad.clone() for p in neuron.parameters()]
            plain_input = neuron.backward(g)
    torch.testing.assert_close(fast, plain, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    assert torch.equal(fast_input, plain_input)  # g·w is the same single product per row
    for p, q in zip(neuron.parameters(), plain_grads, strict=True):
        torch.testing.assert_close(p.grad, 2 * q)  # accumulated twice, the same value each time


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_squared_errors_cached_scales_follow_the_dtype_and_batch(reduction: str) -> None:
    from models import SquaredError

    loss = SquaredError(reduction)
    for dtype, n in [(torch.float32, 10), (torch.float64, 10), (torch.float32, 7)]:
        pred, target = randn(n, n, 2, dtype=dtype), randn(n + 1, n, 2, dtype=dtype)
        cost = loss(pred, target)
        grad = loss.backward()
        scale = 1 / n if reduction == "mean" else 1.0
        assert cost.dtype == grad.dtype == dtype
        torch.testing.assert_close(cost, ((pred - target) ** 2).sum() * scale)
        assert torch.equal(grad, (pred - target) * (2 * scale))  # the same number as the Python scalar
        loss(pred, target)
        torch.testing.assert_close(loss.backward(0.5), (pred - target) * scale)  # another upstream


def test_repeat_epochs_leaves_the_state_k_iterations_leave() -> None:
    from trainer.data import IndexBatches

    x, y = torch.arange(6.0).view(6, 1), torch.arange(6.0).view(6, 1)
    fast, plain = IndexBatches(x, y, batch_size=None), IndexBatches(x, y, batch_size=None)
    for _ in range(2):
        batch = fast.repeat_epochs(5)
        plain_batches = [next(iter(plain)) for _ in range(5)]
        assert fast.state_dict() == plain.state_dict()
        assert all(torch.equal(batch[0], b[0]) and torch.equal(batch[1], b[1]) for b in plain_batches)
    with pytest.raises(ValueError, match="one batch per epoch"):
        IndexBatches(x, y, batch_size=2).repeat_epochs(3)


def test_a_logger_with_a_prefix_gets_the_costs_through_log_metrics(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="prefixed", prefix="run")
    data = RegressionData(function="quadratic", n=40, batch_size=None, val_fraction=0.0)
    trainer = quiet_trainer(max_steps=6, logger=logger)
    trainer.fit(BackpropModule(hidden=[], lr=0.1), data)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("run-train/cost")] == list(range(6))
    assert trainer.progress_bar_metrics["train/cost"] == pytest.approx(trainer.callback_metrics["train/cost"].item())


class _HookLog(L.Callback):
    """Every on_before_optimizer_step: the step and whether the gradients are there (the Monitor reads them)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls.append((trainer.global_step, all(p.grad is not None for p in pl_module.model.parameters())))


@pytest.mark.parametrize("k", [1, 3])
def test_the_direct_optimizer_step_equals_lightnings(monkeypatch, k: int) -> None:
    def run(direct: bool) -> tuple[L.Trainer, BackpropModule, _HookLog]:
        if not direct:
            monkeypatch.setattr(BackpropModule, "_direct_step", lambda self, opt: None)
        torch.manual_seed(0)
        module = BackpropModule(hidden=[5], activation="tanh", lr=0.05, momentum=0.5, steps_per_call=k)
        data = RegressionData(function="sine", n=48, batch_size=16, val_fraction=0.0)
        log = _HookLog()
        trainer = quiet_trainer(max_steps=10, callbacks=[log])
        trainer.fit(module, data)
        monkeypatch.undo()
        return trainer, module, log

    (direct, direct_module, direct_log), (plain, plain_module, plain_log) = run(True), run(False)
    assert direct.global_step == plain.global_step == 10
    assert direct_log.calls == plain_log.calls and direct_log.calls  # the same hooks at the same steps
    assert all(has_grads for _, has_grads in direct_log.calls)
    for p, q in zip(direct_module.parameters(), plain_module.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_direct_optimizer_step_stands_aside_for_optimizer_hooks() -> None:
    module = BackpropModule(hidden=[], lr=0.1)
    data = RegressionData(function="quadratic", n=20, batch_size=None, val_fraction=0.0)
    seen = []
    trainer = quiet_trainer(max_steps=3)

    class Hooked(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            trainer.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: seen.append(len(seen)))

    trainer.callbacks.append(Hooked())
    trainer.fit(module, data)
    assert seen == [0, 1, 2]  # a step hook on the optimizer: Lightning's own opt.step() ran, and with it the hook


def test_the_module_writes_its_per_update_attributes_plainly_and_keeps_nn_modules_rules_for_the_rest() -> None:
    module = BackpropModule(hidden=[3], loss="cross_entropy", in_features=2, out_features=2)
    module._current_fx_name = "training_step"  # what Lightning sets around every hook
    assert module.__dict__["_current_fx_name"] == "training_step"
    module._last_pred = torch.ones(4, 2)
    assert "_last_pred" not in module.state_dict() and not list(module.buffers())
    before = set(module.state_dict())
    module.extra = torch.nn.Parameter(torch.ones(1))  # any other name goes through nn.Module
    assert set(module.state_dict()) == before | {"extra"}


def test_batches_already_on_the_device_skip_lightnings_transfer_and_others_take_it() -> None:
    dm = RegressionData(n=16, batch_size=4)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    device = x.device
    batch = (x, y)
    assert dm.transfer_batch_to_device(batch, device, 0) is batch  # as it is: Lightning's would rebuild it
    moved = dm.transfer_batch_to_device([x.double(), y], device, 0)  # not one of ours: Lightning's own path
    assert isinstance(moved, list) and torch.equal(moved[0], x.double())


def test_lightning_still_finds_batch_idx_in_training_steps_signature() -> None:
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    module = BackpropModule()
    assert is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
    assert not is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True)


def test_each_call_reads_the_tensors_asked_for_with_its_costs(tmp_path):
    """read_each_call: every training_step call hands back the values of the tensors asked for, read after
    its updates with the costs; asking for none stops it, and a tensor of more than one element is refused."""
    module = BackpropModule(in_features=1, out_features=1, hidden=[3], lr=0.05)
    first = module.model.linears[0]

    class Reads(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[list[float], list[float]]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            expected = [first.weight[1, 0].item(), first.bias[2].item()]  # after the call's update
            self.seen.append((outputs.get("read"), expected))

    reads = Reads()
    module.read_each_call(first.weight[1, 0], first.bias[2])
    quiet_trainer(tmp_path, max_steps=4, callbacks=[reads]).fit(module, RegressionData(n=64, batch_size=16))
    assert len(reads.seen) == 4
    for got, expected in reads.seen:
        assert got == pytest.approx(expected, rel=0, abs=0)
    module.read_each_call()
    reads.seen.clear()
    quiet_trainer(tmp_path, max_steps=2, callbacks=[reads]).fit(module, RegressionData(n=64, batch_size=16))
    assert [got for got, _ in reads.seen] == [None, None]  # nothing read any more
    with pytest.raises(ValueError, match="one element"):
        module.read_each_call(first.bias)
