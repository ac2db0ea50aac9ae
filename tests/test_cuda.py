"""One GPU and many: the CUDA mirror of the CPU tests, skipped without a GPU (marked ``cuda``).

- the hand-written gradients against autograd, on CUDA, in float64 and float32;
- ``accelerator: auto`` picks CUDA, and the data and the model stay there;
- every tensor a training step creates lives on the module's device (a dispatch mode watches every op);
- CPU and CUDA training agree in float64 over a few hundred mini-batch steps;
- with two GPUs or more, DDP over NCCL reaches one GPU's parameters.

A few checks run everywhere: the device recorder itself (it must flag a tensor on another device), the
all-reduce branch of ``sync_gradients`` on a one-process group, and the TF32 opt-in callback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from test_ddp import assert_same_run, fit, max_abs_difference, params
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import MLP, SoftmaxCrossEntropy, SquaredError
from models.gradcheck import check_autograd, check_finite_differences
from trainer import BackpropModule, LineData, RegressionData
from trainer.cli import make_cli
from trainer.tf32 import Float32MatmulPrecision

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
requires_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


class DeviceRecorder(TorchDispatchMode):
    """While active, notes the device of every tensor that any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[str, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.created.append((str(func), t.device))
        return out

    def elsewhere(self, device: torch.device) -> list[tuple[str, torch.device]]:
        """The ops that returned a tensor on another device than ``device``."""
        return [(op, d) for op, d in self.created if d.type != device.type]


@contextmanager
def one_process_group(tmp_path: Path, backend: str) -> Iterator[None]:
    """A real process group of one rank, so ``sync_gradients`` takes its all-reduce branch in this process."""
    if dist.is_initialized():
        dist.destroy_process_group()  # left over by an earlier in-process DDP fit of one rank: Lightning keeps it
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def step_on(device: str, tmp_path: Path, classification: bool) -> tuple[DeviceRecorder, BackpropModule]:
    """One training step's math (forward, backward, all-reduce branch, SGD) on ``device``, under the recorder."""
    torch.manual_seed(0)
    loss = "cross_entropy" if classification else "squared_error"
    module = BackpropModule(hidden=[5], activation="tanh", loss=loss, in_features=2, out_features=3).to(device)
    module._trainer = SimpleNamespace(world_size=2)  # claim a world: the one-rank group makes the sum a no-op
    opt = module.configure_optimizers()
    x = torch.randn(7, 2, device=device)
    y = torch.randint(0, 3, (7,), device=device) if classification else torch.randn(7, 3, device=device)
    backend = "nccl" if device == "cuda" else "gloo"
    with one_process_group(tmp_path, backend):
        recorder = DeviceRecorder()
        with recorder:
            opt.zero_grad(set_to_none=True)
            cost = module.forward_backward(x, y)
            correct = (module._last_pred.argmax(1) == y).sum() if classification else None
            cost, accuracy = module.sync_gradients(cost, x.shape[0], correct)
            opt.step()
    return recorder, module


# ---------------------------------------------------------------------------------------------- everywhere


def test_the_recorder_flags_a_tensor_on_another_device() -> None:
    recorder = DeviceRecorder()
    with recorder:
        torch.ones(2).mul_(3.0)
        torch.zeros(1, device="meta")
    assert [op for op, _ in recorder.elsewhere(torch.device("cpu"))] == ["aten.zeros.default"]
    assert recorder.created, "the recorder saw no op"


@pytest.mark.parametrize("classification", [False, True])
def test_the_all_reduce_branch_on_one_rank_keeps_the_local_step(tmp_path: Path, classification: bool) -> None:
    recorder, module = step_on("cpu", tmp_path, classification)
    assert any("c10d" in op for op, _ in recorder.created), "sync_gradients did not all-reduce"
    assert recorder.elsewhere(torch.device("cpu")) == []
    reference, _ = step_on_reference(classification)
    for (name, p), q in zip(module.model.named_parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, n=name: f"{n}: {m}")


def step_on_reference(classification: bool) -> tuple[BackpropModule, torch.Tensor]:
    """The same step on one process, without any all-reduce."""
    torch.manual_seed(0)
    loss = "cross_entropy" if classification else "squared_error"
    module = BackpropModule(hidden=[5], activation="tanh", loss=loss, in_features=2, out_features=3)
    opt = module.configure_optimizers()
    x = torch.randn(7, 2)
    y = torch.randint(0, 3, (7,)) if classification else torch.randn(7, 3)
    opt.zero_grad(set_to_none=True)
    cost = module.forward_backward(x, y)
    opt.step()
    return module, cost


def _tiny_fit(tmp_path: Path, callbacks: list[L.Callback]) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(BackpropModule(), datamodule=LineData(n=8))


class _SeenPrecision(L.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, *args) -> None:
        self.seen.append(torch.get_float32_matmul_precision())


@pytest.mark.skipif(bool(os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")), reason="TF32 forced by the environment")
def test_tf32_is_opt_in(tmp_path: Path) -> None:
    seen = _SeenPrecision()
    _tiny_fit(tmp_path, [seen])
    assert set(seen.seen) == {"highest"}, "something switched TF32 on without being asked"
    seen = _SeenPrecision()
    _tiny_fit(tmp_path, [Float32MatmulPrecision("high"), seen])
    assert set(seen.seen) == {"high"}
    assert torch.get_float32_matmul_precision() == "highest", "the callback did not restore the setting"
    with pytest.raises(ValueError, match="precision = 'fast' is unknown: choose one of highest, high, medium"):
        Float32MatmulPrecision("fast")


# ---------------------------------------------------------------------------------------------- one GPU


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_gradients_match_autograd_on_cuda(dtype: torch.dtype, activation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mlp = MLP([3, 6, 5, 2], activation, output_activation="sigmoid").to("cuda", dtype)
    x = torch.randn(9, 3, generator=gen, dtype=dtype).cuda()
    rows = check_autograd(mlp, x, generator=gen)
    pred = torch.randn(9, 4, generator=gen, dtype=dtype).cuda()
    rows += check_autograd(SquaredError("mean"), pred, torch.randn(9, 4, generator=gen, dtype=dtype).cuda())
    rows += check_autograd(SoftmaxCrossEntropy("sum"), pred, torch.randint(0, 4, (9,), generator=gen).cuda())
    bad = [row for row in rows if not row.ok]
    assert not bad, "\n".join(f"{r.module}.{r.name}: rel {r.max_rel_error:.2e} > {r.tol:.0e}" for r in bad)
    if dtype == torch.float64:
        assert check_finite_differences(mlp, x)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("classification", [False, True])
def test_every_tensor_of_the_step_lives_on_the_gpu(tmp_path: Path, classification: bool) -> None:
    recorder, module = step_on("cuda", tmp_path, classification)
    assert all(p.is_cuda and p.grad.is_cuda for p in module.model.parameters())
    assert recorder.elsewhere(torch.device("cuda")) == [], "the step created tensors off the GPU"


@pytest.mark.cuda
@requires_cuda
def test_auto_accelerator_trains_on_the_gpu(tmp_path: Path) -> None:
    cli = make_cli(
        [
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "line.yaml"),
            "--trainer.max_steps",
            "50",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--progress_bar.refresh_rate",
            "0",
        ]
    )
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert cli.datamodule.x_train.is_cuda and cli.datamodule.y_train.is_cuda, "the data left the GPU"
    assert all(p.is_cuda for p in cli.model.parameters())
    assert list(tmp_path.glob("line/version_*/summary.json"))
    if not os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"):
        assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.cuda
@requires_cuda
def test_cpu_and_cuda_training_match_in_float64(tmp_path: Path) -> None:
    def run(accelerator: str) -> dict:
        data = RegressionData(function="sine", n=256, batch_size=32, val_fraction=0.0, seed=0)
        torch.manual_seed(0)
        model = BackpropModule(hidden=[16, 16], activation="tanh", lr=0.05, momentum=0.9)
        (record,) = fit(
            tmp_path / accelerator, data, model, devices=1, max_steps=300, accelerator=accelerator, precision="64-true"
        )
        return record

    cpu, gpu = run("cpu"), run("cuda")
    assert cpu["dtype"] == gpu["dtype"] == "torch.float64" and cpu["steps"] == gpu["steps"] == 300
    for name, value in params(gpu).items():
        torch.testing.assert_close(value, params(cpu)[name], rtol=1e-10, atol=1e-11)
    print(f"\nCPU vs CUDA, float64, 300 steps: max |Δθ| {max_abs_difference(params(gpu), params(cpu)):.3g}")


# ---------------------------------------------------------------------------------------------- many GPUs


@pytest.mark.cuda
@requires_two_gpus
def test_nccl_ddp_matches_one_gpu(tmp_path: Path) -> None:
    def data(batch_size: int) -> RegressionData:
        return RegressionData(function="sine", n=49, batch_size=batch_size, val_fraction=0.0, seed=2)

    def model() -> BackpropModule:
        torch.manual_seed(0)
        return BackpropModule(hidden=[8, 8], activation="tanh", lr=0.05, momentum=0.9)

    ddp = fit(tmp_path / "ddp", data(8), model(), devices=2, max_steps=120, accelerator="cuda")
    (one,) = fit(tmp_path / "one", data(16), model(), devices=1, max_steps=120, accelerator="cuda")
    gap = assert_same_run(ddp, one)
    print(f"\nNCCL DDP vs one GPU, mini-batch: max |Δθ| {gap:.3g}")
