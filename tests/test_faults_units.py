"""The parts that keep a run safe, in process: the lr bound, the divergence guard, the RNG and batch-order
state in checkpoints, atomic checkpoint writes, and layers that keep no cache between steps."""

from __future__ import annotations

import gc
import random
import signal
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from _util import ROOT, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from models import Layer
from trainer import BackpropModule, ClassificationData, LineData, RegressionData
from trainer.atomic import atomic_save
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.errors import DivergenceError
from trainer.guards import DivergenceGuard, RNGState, stable_lr
from trainer.optimum import least_squares, lr_bound
from trainer.preflight import load_checkpoint

# A step's checkpoint holds the state after its update under manual optimization, as resuming needs.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no pre-optimization state was saved.*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed from.*"),  # each resume writes a new folder
]

# ---------------------------------------------------------------------------------------------- lr bound


def _cost(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """s·Σ (x w + b − y)², written without the design matrix, for autograd's Hessian."""
    w, b = theta[:-1], theta[-1]
    diff = x @ w + b - y
    return (diff * diff).sum() / (x.shape[0] if reduction == "mean" else 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lr_bound_is_two_over_the_largest_eigenvalue_of_autograds_hessian(reduction):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    y = torch.randn(40, generator=gen, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(
        lambda t: _cost(t, x, y, reduction), torch.zeros(4, dtype=torch.float64)
    )
    reference = 2.0 / torch.linalg.eigvalsh(hessian).max().item()
    assert lr_bound(x, reduction) == pytest.approx(reference, rel=1e-12)


def _gradient_descent(x, y, lr, momentum=0.0, weight_decay=0.0, steps=3000) -> float:
    """Full-batch torch.optim.SGD on the mean squared error; the final distance to the least-squares optimum."""
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        _cost(theta, x, y, "mean").backward()
        opt.step()
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    optimum = torch.linalg.solve(2 * a.T @ a / x.shape[0] + weight_decay * torch.eye(a.shape[1], dtype=x.dtype),
                                 2 * a.T @ y / x.shape[0])  # fmt: skip
    return (theta.detach() - optimum).abs().max().item()


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.5, 0.3)])
def test_the_stable_bound_separates_converging_from_diverging_gradient_descent(momentum, weight_decay):
    data = LineData(n=60, noise=0.5)
    x, y = data.x_train.double(), data.y_train.double().squeeze(1)
    bound = stable_lr(x, "mean", momentum, weight_decay)
    assert _gradient_descent(x, y, 0.97 * bound, momentum, weight_decay) < 1e-6
    assert not _gradient_descent(x, y, 1.03 * bound, momentum, weight_decay) < 1e3  # grows without bound


# ----------------------------------------------------------------------------------------- divergence


class PoisonGradient(L.Callback):
    """Writes a NaN into the first weight's gradient before the update of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.at:
            pl_module.model.linears[0].weight.grad[0, 0] = float("nan")


def _checkpointing(tmp_path, every=1) -> dict:
    """Trainer arguments for a checkpoint every ``every`` updates, all kept, and last.ckpt."""
    cb = ModelCheckpoint(
        dirpath=tmp_path,
        filename="step{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=-1,
        save_last=True,
    )
    return {"callbacks": [cb], "enable_checkpointing": True}


def test_a_nan_gradient_stops_at_once_and_no_checkpoint_holds_it(tmp_path):
    module = BackpropModule(hidden=[4], activation="tanh", lr=0.05)
    saving = _checkpointing(tmp_path)
    saving["callbacks"] = [DivergenceGuard(), PoisonGradient(at=5), *saving["callbacks"]]
    trainer = quiet_trainer(max_steps=50, plugins=[AtomicCheckpointIO()], **saving)
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, RegressionData(n=32, val_fraction=0.0))
    message = str(info.value)
    assert message.startswith("training diverged at step 5 with lr = 0.05: the gradient of model.0.weight")
    assert "lower model.lr" in message and str(tmp_path / "last.ckpt") in message
    assert trainer.global_step == 5
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["last.ckpt", "step1.ckpt", "step2.ckpt", "step3.ckpt", "step4.ckpt"]
    for path in tmp_path.glob("*.ckpt"):
        checkpoint = load_checkpoint(path)
        assert checkpoint["global_step"] <= 4
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4
    BackpropModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)


def test_a_linear_model_that_diverges_is_told_its_stable_bound(tmp_path):
    data = LineData(n=50)
    bound = stable_lr(data.x_train, "mean")
    module = BackpropModule(hidden=[], lr=1.3 * bound)
    trainer = quiet_trainer(max_steps=5000, callbacks=[DivergenceGuard()])
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, data)
    message = str(info.value)
    assert f"diverged at step {trainer.global_step} with lr = {1.3 * bound:g}: the cost is inf" in message
    assert f"stable only for lr < {bound:.6g}" in message
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the cost overflowed first


# ---------------------------------------------------------------------------------- resumable state


class Draws(L.Callback):
    """Draws from every global generator before each step, as dropout or a random augmentation would."""

    def __init__(self) -> None:
        self.draws: dict[int, tuple[float, float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws[trainer.global_step] = (torch.rand(1).item(), random.random(), float(np.random.rand()))


@pytest.mark.parametrize("with_rng_state", [True, False])
def test_the_rng_state_resumes_exactly_and_only_with_the_callback(tmp_path, with_rng_state):
    def run(folder, ckpt_path=None, seed=0):
        L.seed_everything(seed, verbose=False)
        draws = Draws()
        saving = _checkpointing(tmp_path / folder, every=4)
        saving["callbacks"] = [*([RNGState()] if with_rng_state else []), draws, *saving["callbacks"]]
        trainer = quiet_trainer(max_steps=8, **saving)
        trainer.fit(BackpropModule(hidden=[3]), RegressionData(n=16, batch_size=4), ckpt_path=ckpt_path)
        return draws.draws

    straight = run("straight")
    resumed = run("resumed", ckpt_path=tmp_path / "straight" / "step4.ckpt", seed=123)  # only the checkpoint
    assert sorted(resumed) == [4, 5, 6, 7]  # can bring the generators back
    same = all(resumed[s] == straight[s] for s in resumed)
    assert same == with_rng_state


def test_every_checkpoint_holds_the_batch_order_position_of_its_own_step(tmp_path):
    data = RegressionData(n=40, val_fraction=0.0, batch_size=6)  # 7 batches an epoch, the last one short
    trainer = quiet_trainer(max_steps=20, **_checkpointing(tmp_path))
    trainer.fit(BackpropModule(hidden=[2]), data)
    per_epoch = 7
    for step in range(1, 21):
        checkpoint = torch.load(tmp_path / f"step{step}.ckpt", weights_only=True)
        (state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        # the batches already taken when this step's checkpoint was written: no batch fetched ahead
        assert (state["epoch"], state["position"]) == ((step - 1) // per_epoch, (step - 1) % per_epoch + 1), step


# ----------------------------------------------------------------------------------- atomic writes

KILL_MID_SAVE = textwrap.dedent(
    """
    import importlib.util, io, os, signal, sys, torch
    path, mode, source = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("atomic", source)  # torch only: no Lightning to import
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    atomic.atomic_save({"version": 1, "w": torch.zeros(100_000)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dies_half_way
    new = {"version": 2, "w": torch.ones(100_000)}
    if mode == "atomic":
        atomic.atomic_save(new, path)
    else:  # the naive write, for contrast
        with open(path, "wb") as f:
            torch.save(new, f)
    """
)


@pytest.mark.parametrize("mode", ["atomic", "naive"])
def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_whole(tmp_path, mode):
    path = tmp_path / "last.ckpt"
    args = [sys.executable, "-c", KILL_MID_SAVE, str(path), mode, str(ROOT / "trainer" / "atomic.py")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    if mode == "atomic":
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["version"] == 1 and torch.equal(checkpoint["w"], torch.zeros(100_000))
        assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"] != []  # the temporary file it was writing
    else:  # the harness does catch a half-written file
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)


def test_atomic_save_leaves_no_temporary_file_and_the_usual_permissions(tmp_path):
    atomic_save({"a": torch.arange(3)}, tmp_path / "sub" / "x.ckpt")
    (tmp_path / "plain").write_bytes(b"")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.ckpt"]
    assert (tmp_path / "sub" / "x.ckpt").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert torch.equal(torch.load(tmp_path / "sub" / "x.ckpt", weights_only=True)["a"], torch.arange(3))


# ----------------------------------------------------------------------------------------- caches


class NoCacheAfterStep(L.Callback):
    def __init__(self) -> None:
        self.checked = 0

    def _check(self, pl_module) -> None:
        holders = [type(m).__name__ for m in pl_module.modules() if isinstance(m, Layer) and m._cache is not None]
        assert not holders, f"still caching after the step: {holders}"
        assert getattr(pl_module, "_last_pred", None) is None
        self.checked += 1

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._check(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._check(pl_module)


@pytest.mark.parametrize(
    "settings, data",
    [
        ({"hidden": [5, 4], "activation": "tanh", "output_activation": "sigmoid"}, RegressionData),
        ({"hidden": [6], "activation": "relu", "loss": "cross_entropy"}, ClassificationData),
        ({"hidden": [1], "activation": "sigmoid", "output_activation": "sigmoid"}, RegressionData),
    ],
    ids=["tanh-mlp", "relu-classifier", "chain"],
)
def test_no_layer_holds_a_cache_after_any_step(settings, data):
    probe = NoCacheAfterStep()
    data = data(n=48, batch_size=8)
    module = BackpropModule(**settings, in_features=data.in_features, out_features=data.out_features)
    trainer = quiet_trainer(max_steps=12, callbacks=[probe], val_check_interval=3, check_val_every_n_epoch=None)
    trainer.fit(module, data)
    assert probe.checked >= 12 + 4


def _census() -> tuple[int, int]:
    """(live objects the collector tracks, of which tensors), after a collection."""
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(issubclass(type(o), torch.Tensor) for o in objects)


@pytest.mark.parametrize(
    "settings, momentum", [({"hidden": []}, 0.0), ({"hidden": [8, 8], "activation": "tanh"}, 0.9)], ids=["line", "mlp"]
)
def test_our_step_leaves_nothing_behind(settings, momentum):
    """Forward, hand-written backward and SGD, 10,000 times: not one tensor more at the end, nor objects.

    (Counting allocated blocks instead would see CPython's free lists filling up for tens of thousands
    of steps; live objects are what a leak adds.)"""
    data = RegressionData(n=64, val_fraction=0.0)
    module = BackpropModule(**settings, momentum=momentum)
    opt = module.configure_optimizers()

    def step():
        opt.zero_grad(set_to_none=True)
        module.forward_backward(data.x_train, data.y_train)
        opt.step()
        module._last_pred = None

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spins (40x slower on a busy machine)
    try:
        for _ in range(500):  # warm-up: the momentum buffers, torch's first-call caches
            step()
        before = _census()
        for _ in range(10_000):
            step()
        after = _census()
    finally:
        torch.set_num_threads(threads)
    # a leak of anything per step would add 10,000; a lazily made object elsewhere in the process adds one
    assert after[1] == before[1] and after[0] - before[0] < 10, (before, after)


def test_least_squares_reference_is_what_the_bound_test_converges_to():
    """The convergence check above uses a solve; it agrees with lstsq, the project's reference for the line."""
    data = LineData(n=60, noise=0.5)
    x, y = data.x_train.double(), data.y_train.double()
    weight, bias = least_squares(x, y)
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    solved = torch.linalg.solve(a.T @ a, a.T @ y.squeeze(1))
    torch.testing.assert_close(torch.cat([weight.reshape(-1), bias]), solved, rtol=1e-10, atol=1e-12)
