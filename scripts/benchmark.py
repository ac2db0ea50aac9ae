"""Our hand-written step and training loop, side by side with torch.nn + autograd and a bare loop.

    python scripts/benchmark.py                  the full run (a few minutes on 2 CPU cores)
    python scripts/benchmark.py --quick          the same comparisons, fewer repeats (≤ 60 s on 2 cores)
    python scripts/benchmark.py --json out.json  also write every raw measurement
    python scripts/benchmark.py --only step.line,memory.mlp_l

Every ratio is ours ÷ reference, lower is better. Each comparison runs in this one process, after
warm-ups, in interleaved repeats (A B B A, then B A A B, …); the ratio is the median over the repeats of
each repeat's own ratio, so a slow patch of a shared machine falls on both sides of it. The loops alternate
in slices of one fit: a slice of the bare loop runs between every two slices of the fit (``sliced_loop``).
Both sides start from the same weights and see the same data; threads are fixed (``--threads``, default
1: with two cores shared with other work, a second thread mostly waits for the busy one). On the CPU the
clock is the process's CPU time, all its threads together (so TensorBoard's writer thread counts against
the loop), which leaves out the time spent waiting for a core; ``--clock wall`` reads wall time instead. On
a GPU the step is timed by a pair of CUDA events, the loops by wall time after a synchronize.

    step.<case>   our update (forward, cost, hand-written backward, SGD) ÷ the same model from torch.nn,
                  trained by autograd and torch.optim.SGD (torch's default settings, the fastest here)
    floor.mlp_l   our update ÷ the matrix products it makes, timed alone with the same shapes and layouts
    loop.<case>   time per update through Trainer.fit (TensorBoard logging on) ÷ a bare loop making the
                  same updates on the same data, the two alternating every few hundred milliseconds
    memory.mlp_l  bytes our layers keep for backward ÷ bytes autograd saves for backward
    figures.<config>  Trainer.fit of configs/<config>.yaml at its real length with the figures and histograms
                  at their defaults, plus what a fresh process pays for them once (importing what draws
                  them where the trainer's own imports have not, first draws) ÷ the same fit with them off

A new comparison is one function registered with ``@comparison("name", target)`` that returns a
``Result``; ``--only`` picks comparisons by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, without installing

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from models import Linear, gemm  # noqa: E402
from trainer.allocator import retain_freed_memory  # noqa: E402
from trainer.module import BackpropModule  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# The models compared


@dataclass(frozen=True)
class Case:
    """One model and its data: widths, activations, loss, how many examples and the batch size."""

    widths: tuple[int, ...]
    activation: str
    output_activation: str | None
    loss: str
    examples: int
    batch_size: int | None  # None: the whole set each step
    lr: float
    steps_per_call: int = 1  # model.steps_per_call in loop.<case>: 256 for the line, whose update is tiny

    @property
    def batch(self) -> int:
        return self.examples if self.batch_size is None else self.batch_size

    def module(self, device: torch.device) -> BackpropModule:
        torch.manual_seed(0)
        module = BackpropModule(
            hidden=list(self.widths[1:-1]),
            activation=self.activation,
            output_activation=self.output_activation,
            loss=self.loss,
            lr=self.lr,
            in_features=self.widths[0],
            out_features=self.widths[-1],
            steps_per_call=self.steps_per_call,
        )
        return module.to(device)

    def data(self, n: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.widths[0], generator=gen)
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.widths[-1], (n,), generator=gen)
        else:
            y = torch.rand(n, self.widths[-1], generator=gen)  # in (0, 1): a sigmoid output can reach it
        return x.to(device), y.to(device)


CASES: dict[str, Case] = {
    "line": Case((1, 1), "identity", None, "squared_error", 1000, None, 0.01, steps_per_call=256),
    "chain": Case((1, 1, 1), "sigmoid", "sigmoid", "squared_error", 1000, None, 0.5),
    "mlp_s": Case((2, 64, 64, 1), "tanh", None, "squared_error", 1024, 64, 0.05),
    "mlp_l": Case((784, 1024, 1024, 10), "sigmoid", None, "cross_entropy", 4096, 512, 0.1),
}

NN_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}


def reference_of(module: BackpropModule) -> tuple[nn.Sequential, nn.Module, torch.optim.SGD]:
    """The same model from torch.nn with the same weights, its loss, and torch.optim.SGD (torch's defaults)."""
    hp = module.hparams
    layers: list[nn.Module] = []
    for layer in module.model:
        if isinstance(layer, Linear):
            layers.append(nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None))
        else:
            layers.append(NN_ACTIVATIONS[type(layer).__name__.lower()]())
    device = next(module.parameters()).device
    reference = nn.Sequential(*layers).to(device)
    reference.load_state_dict(module.model.state_dict())
    if hp.loss == "cross_entropy":
        loss: nn.Module = nn.CrossEntropyLoss()
    elif hp.out_features == 1:
        loss = nn.MSELoss()  # for one output the mean over examples of Σₖ is the usual MSE
    else:
        loss = _MeanOverExamples()
    return reference, loss, torch.optim.SGD(reference.parameters(), lr=hp.lr)


class _MeanOverExamples(nn.Module):
    """(1/N) Σₙ Σₖ (ŷ − y)²: our SquaredError(mean) for several outputs."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return nn.functional.mse_loss(pred, target, reduction="sum") / pred.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Clocks and the A/B harness


# The host clock of each kind, by name (a fresh process is handed the name): the process's CPU time or wall time
HOST_CLOCKS = {"cpu": "process_time", "wall": "perf_counter"}


class Clock:
    """Seconds per call of ``fn``.

    On a GPU: a pair of CUDA events (device time). On the CPU, ``cpu`` (the default) reads the process's
    CPU time, all its threads together: on a machine shared with other work it leaves out the time this
    process waits for a core, which wall time counts as ours or theirs at random. ``wall`` reads
    ``time.perf_counter``. ``host_kind`` is the host clock's kind (``wall`` on a GPU, whose loops are timed
    by wall time).
    """

    def __init__(self, device: torch.device, kind: str = "cpu") -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda events" if self.cuda else kind
        self.host_kind = "cpu" if self.kind == "cpu" else "wall"
        self.now = getattr(time, HOST_CLOCKS[self.host_kind])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def stamp(self) -> float:
        """A time stamp for the loops, which span many calls: on a GPU, wall time after a synchronize."""
        self.sync()
        return time.perf_counter() if self.cuda else self.now()

    def time(self, fn: Callable[[], Any], calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        t0 = self.now()
        for _ in range(calls):
            fn()
        return (self.now() - t0) / calls


@dataclass
class Result:
    """One comparison: ours and the reference, the ratio, and every raw measurement."""

    name: str
    ours: float
    reference: float
    ratio: float
    unit: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    @classmethod
    def of_pairs(
        cls, name: str, pairs: list[tuple[float, float]], rows: list[dict[str, Any]], note: str = ""
    ) -> Result:
        """The medians over repeated (ours, reference) measurements: of each side, and of their ratios."""
        return cls(
            name,
            statistics.median(o for o, _ in pairs),
            statistics.median(t for _, t in pairs),
            statistics.median(o / t for o, t in pairs),
            "s",
            rows,
            note,
        )


def interleaved(
    name: str,
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    clock: Clock,
    repeats: int,
    calls: int,
    warmup: int,
) -> Result:
    """Time ``ours`` and ``reference`` in interleaved quads, A B B A then B A A B, after ``warmup`` calls
    of each; each letter is ``calls`` calls.

    A quad's ratio (A₁ + A₂) ÷ (B₁ + B₂) cancels any slow drift of the machine across it; the ratio
    reported is the median over the quads, the times the medians of each side's per-quad mean.
    """
    for _ in range(warmup):
        ours()
        reference()
    clock.sync()
    rows: list[dict[str, Any]] = []
    quads: list[tuple[float, float]] = []
    for r in range(repeats):
        order = ["ours", "reference", "reference", "ours"] if r % 2 == 0 else ["reference", "ours", "ours", "reference"]
        got: dict[str, list[float]] = {"ours": [], "reference": []}
        for side in order:
            seconds = clock.time(ours if side == "ours" else reference, calls)
            got[side].append(seconds)
            rows.append({"comparison": name, "side": side, "repeat": r, "calls": calls, "seconds": seconds})
        quads.append((statistics.fmean(got["ours"]), statistics.fmean(got["reference"])))
    return Result.of_pairs(name, quads, rows)


# ---------------------------------------------------------------------------------------------------------
# The registry of comparisons


@dataclass(frozen=True)
class Settings:
    device: torch.device
    quick: bool
    clock: Clock
    workdir: Path

    def scale(self, quick: int, full: int) -> int:
        return quick if self.quick else full


@dataclass(frozen=True)
class Comparison:
    name: str
    target: float
    run: Callable[[Settings], Result]


COMPARISONS: dict[str, Comparison] = {}


def comparison(name: str, target: float) -> Callable[[Callable[[Settings], Result]], Callable[[Settings], Result]]:
    """Register ``fn(settings) -> Result`` as the comparison ``name``, met when its ratio is ≤ ``target``."""

    def register(fn: Callable[[Settings], Result]) -> Callable[[Settings], Result]:
        if name in COMPARISONS:
            raise ValueError(f"comparison {name!r} is registered twice")
        COMPARISONS[name] = Comparison(name, target, fn)
        return fn

    return register


# ---------------------------------------------------------------------------------------------------------
# step.<case>: our update against autograd + torch.optim.SGD


def step_functions(case: Case, device: torch.device) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """(ours, reference): one update each on the same batch, from the same initial weights."""
    module = case.module(device).train()
    optimizer = module.configure_optimizers()
    x, y = case.data(case.batch, device)
    reference, loss, reference_optimizer = reference_of(module)

    def ours() -> Tensor:
        return module.update(x, y, optimizer.update)

    def theirs() -> Tensor:
        reference_optimizer.zero_grad()  # set_to_none, torch's default
        cost = loss(reference(x), y)
        cost.backward()
        reference_optimizer.step()
        return cost

    return ours, theirs


def _step(case_name: str, quick: tuple[int, int], full: tuple[int, int]) -> Callable[[Settings], Result]:
    def run(s: Settings) -> Result:
        case = CASES[case_name]
        ours, theirs = step_functions(case, s.device)
        repeats, calls = quick if s.quick else full
        return interleaved(f"step.{case_name}", ours, theirs, s.clock, repeats, calls, warmup=max(2, calls))

    return run


comparison("step.line", 0.4)(_step("line", (21, 200), (41, 500)))
comparison("step.chain", 0.4)(_step("chain", (21, 200), (41, 500)))
comparison("step.mlp_s", 0.7)(_step("mlp_s", (21, 100), (41, 300)))
comparison("step.mlp_l", 0.97)(_step("mlp_l", (15, 1), (25, 2)))


# ---------------------------------------------------------------------------------------------------------
# floor.mlp_l: our update against its matrix products alone


def matrix_products(module: BackpropModule, batch: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The operands of every matrix product our update makes, with their shapes and memory layouts:
    forward x Wᵀ per layer; backward gᵀ x (∂C/∂W) per layer and g W (∂C/∂x) for all but the first."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    products = []
    linears = module.model.linears
    for i, layer in enumerate(linears):
        weight = layer.weight.detach()  # (O, I)
        x, g = randn(batch, layer.in_features), randn(batch, layer.out_features)
        products.append((x, weight.t()))  # forward: (N, I) @ (I, O)
        products.append((g.t(), x))  # ∂C/∂W: (O, N) @ (N, I)
        if i > 0:
            products.append((g, weight))  # ∂C/∂x: (N, O) @ (O, I)
    return products


@comparison("floor.mlp_l", 1.05)
def floor_mlp_l(s: Settings) -> Result:
    case = CASES["mlp_l"]
    ours, _ = step_functions(case, s.device)
    module = case.module(s.device)
    products = matrix_products(module, case.batch, s.device)

    def floor() -> None:
        for a, b in products:
            gemm.mm(a, b)  # on the kernel our layers pick for the product (models/gemm.py)

    repeats = s.scale(25, 41)
    result = interleaved("floor.mlp_l", ours, floor, s.clock, repeats, 1, warmup=2)
    result.note = f"{len(products)} matrix products on {gemm_kernels(products)}"
    return result


def gemm_kernels(products: list[tuple[Tensor, Tensor]]) -> str:
    """Which kernels ``models.gemm`` picks for these products: torch's, oneDNN's, or both."""
    picks = {"oneDNN" if gemm.onednn_for(a.shape[0] * a.shape[1] * b.shape[1], a, b) else "torch" for a, b in products}
    return " and ".join(sorted(picks))


# ---------------------------------------------------------------------------------------------------------
# memory.mlp_l: bytes kept for backward


def _storages(tensors, exclude: set[int]) -> dict[int, int]:
    """{storage address: bytes} of the tensors, each storage once, leaving out those in ``exclude``."""
    found: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            found[storage.data_ptr()] = storage.nbytes()
    return found


def saved_by_ours(module: BackpropModule, x: Tensor, y: Tensor, exclude: set[int]) -> dict[int, int]:
    """What our layers and loss cache in a training forward: the only thing backward reads besides the
    parameters. Released afterwards."""
    with torch.no_grad():
        module.loss(module.model(x), y)
    layers = [m for m in (*module.model.modules(), module.loss) if getattr(m, "_cache", None) is not None]
    cached = [t for m in layers for t in m._cache]
    module.model.release()
    module.loss.release()
    return _storages(cached, exclude)


def saved_by_autograd(reference: nn.Module, loss: nn.Module, x: Tensor, y: Tensor, exclude: set[int]) -> dict[int, int]:
    """What autograd saves for backward in the same forward, seen by ``saved_tensors_hooks``."""
    packed: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cost = loss(reference(x), y)
    del cost
    return _storages(packed, exclude)


@comparison("memory.mlp_l", 1.0)
def memory_mlp_l(s: Settings) -> Result:
    case = CASES["mlp_l"]
    module = case.module(s.device).train()
    reference, loss, _ = reference_of(module)
    x, y = case.data(case.batch, s.device)
    params = {p.untyped_storage().data_ptr() for p in (*module.parameters(), *reference.parameters())}
    ours = saved_by_ours(module, x, y, params)
    theirs = saved_by_autograd(reference, loss, x, y, params)
    ours_bytes, theirs_bytes = sum(ours.values()), sum(theirs.values())
    with_params = sum(saved_by_autograd(reference, loss, x, y, set()).values())
    rows = [
        {"comparison": "memory.mlp_l", "side": "ours", "bytes": ours_bytes, "storages": len(ours)},
        {"comparison": "memory.mlp_l", "side": "reference", "bytes": theirs_bytes, "storages": len(theirs)},
        {"comparison": "memory.mlp_l", "side": "reference, counting the weights it saves", "bytes": with_params},
    ]
    note = "parameters left out on both sides; each storage counted once"
    return Result("memory.mlp_l", ours_bytes, theirs_bytes, ours_bytes / theirs_bytes, "B", rows, note)


# ---------------------------------------------------------------------------------------------------------
# loop.<case>: Trainer.fit against a bare loop


class _Synthetic:
    """Builds a TensorData subclass over the case's random data (imported lazily: it needs lightning)."""

    @staticmethod
    def datamodule(case: Case):
        from trainer.data import TensorData

        class CaseData(TensorData):
            classification = case.loss == "cross_entropy"

            def make(self) -> tuple[Tensor, Tensor]:
                return case.data(case.examples, torch.device("cpu"), seed=self.seed)

        return CaseData(batch_size=case.batch_size, val_fraction=0.0, seed=0)


class BareLoop:
    """The reference of ``loop.<case>``: the same module, optimizer, batches and update, no Trainer, run a
    slice at a time (``run``), so that its slices can alternate with the fit's."""

    def __init__(self, case: Case, s: Settings, warmup: int) -> None:
        self.clock = s.clock
        self.module = case.module(s.device).train()
        self.optimizer = self.module.configure_optimizers()
        dm = _Synthetic.datamodule(case)
        dm.setup("fit")
        dm.x_train, dm.y_train = dm.x_train.to(s.device), dm.y_train.to(s.device)
        batches = dm.train_dataloader()

        def stream():
            while True:
                yield from batches

        self.feed = stream()
        self.run(warmup)

    def run(self, updates: int) -> float:
        """Make ``updates`` updates; the seconds per update."""
        update, step, feed = self.module.update, self.optimizer.update, self.feed
        t0 = self.clock.stamp()
        for _ in range(updates):
            x, y = next(feed)
            update(x, y, step)
        return (self.clock.stamp() - t0) / updates


def sliced_loop(case: Case, s: Settings, slices: int, calls: int, warmup_calls: int = 3) -> list[tuple[float, float]]:
    """(fit, bare) seconds per update, one pair per slice: one Trainer.fit, its calls after the warm-up cut
    into ``slices`` slices of ``calls`` calls, and a slice of the bare loop making as many updates before
    the first and after each one (run from the fit's ``on_train_batch_end``, outside the fit's timed slices).

    So the two sides alternate every few hundred milliseconds, A B A B, in one process: a fit slice is set
    against the mean of the bare slices either side of it, which cancels the drift of a shared machine
    far better than whole fits run one after the other (the spread of a ``--quick`` reading of loop.mlp_l
    fell from 0.010 to 0.003). A slice spans whole epochs of the large MLP (8 batches), and the fit's
    periodic work (each epoch's start and end, the loggers' flush once a second) falls into its slices as
    it falls in a real run.
    """
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from trainer.callbacks import Convergence
    from trainer.cli import TRAINER_DEFAULTS

    k = case.steps_per_call
    bare = BareLoop(case, s, warmup=warmup_calls * k)
    fit_slices: list[float] = []
    bare_slices: list[float] = []
    clock = s.clock

    class Slicer(L.Callback):
        """Ends a fit slice, runs a bare slice, and starts the next fit slice, every ``calls`` calls."""

        def __init__(self) -> None:
            self.calls = 0
            self.started: tuple[float, int] | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.calls += 1
            done = self.calls - warmup_calls
            if done < 0 or done % calls:
                return
            now = clock.stamp()
            if self.started is not None:
                t0, step0 = self.started
                fit_slices.append((now - t0) / (trainer.global_step - step0))
            bare_slices.append(bare.run(calls * k))
            self.started = (clock.stamp(), trainer.global_step)

    module = case.module(s.device)
    slicer = Slicer()
    # The logger and loop settings of `trainer fit`; no checkpoints and no progress bar (both are
    # per-run choices: a checkpoint every epoch would be one per update with the whole set as the batch).
    logger_args = {**TRAINER_DEFAULTS["logger"]["init_args"], "save_dir": str(s.workdir), "name": f"loop{id(slicer)}"}
    trainer = L.Trainer(
        accelerator="cuda" if s.device.type == "cuda" else "cpu",
        devices=1,
        max_steps=(warmup_calls + slices * calls) * k,
        max_epochs=-1,
        logger=TensorBoardLogger(**logger_args),
        log_every_n_steps=TRAINER_DEFAULTS["log_every_n_steps"],
        num_sanity_val_steps=TRAINER_DEFAULTS["num_sanity_val_steps"],
        callbacks=[Convergence(tol=0.0), slicer],  # the CLI's convergence callback, its stop turned off
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _Synthetic.datamodule(case))
    if len(fit_slices) != slices or len(bare_slices) != slices + 1:
        raise RuntimeError(f"the fit stopped after {len(fit_slices)} of its {slices} slices")
    return [(fit, (bare_slices[j] + bare_slices[j + 1]) / 2) for j, fit in enumerate(fit_slices)]


def _loop(case_name: str, quick: tuple[int, int], full: tuple[int, int]) -> Callable[[Settings], Result]:
    def run(s: Settings) -> Result:
        case = CASES[case_name]
        slices, calls = quick if s.quick else full
        pairs = sliced_loop(case, s, slices, calls)
        rows = [
            {
                "comparison": f"loop.{case_name}",
                "side": side,
                "slice": j,
                "updates": calls * case.steps_per_call,
                "seconds": seconds,
            }
            for j, pair in enumerate(pairs)
            for side, seconds in zip(("ours", "reference"), pair, strict=True)
        ]
        note = f"steps_per_call={case.steps_per_call}; {slices} slices of {calls} calls, bare slices between"
        return Result.of_pairs(f"loop.{case_name}", pairs, rows, note=note)

    return run


comparison("loop.line", 2.0)(_loop("line", (12, 4), (24, 8)))
comparison("loop.mlp_l", 1.03)(_loop("mlp_l", (24, 8), (48, 8)))


# ---------------------------------------------------------------------------------------------------------
# figures.<config>: trainer.fit with the pictures at their defaults against the same fit without them

# Each config at its real length: the line's convergence stop ends it after 487 updates, the classification
# config runs its max_steps. A shorter run would only inflate the share of the sets drawn at the start and end.
PICTURE_RUNS: dict[str, tuple[str, int]] = {
    "line": ("configs/line.yaml", 487),
    "mlp_classification": ("configs/mlp_classification.yaml", 2000),
}
PICTURES_OFF = ["--figures.every_n_steps", "0", "--figures.at_end", "false", "--histograms.every_n_steps", "0"]
# The same length every time (the stop's test off, max_steps set), and no terminal output.
QUIET_FIT = ["--convergence.tol", "0", "--progress_bar.refresh_rate", "0", "--summary.verbose", "false"]
# what the figures import (matplotlib: its font's file; isal: the PNGs' deflate, which fsspec imports where
# installed); their text comes from the glyph cache, which loads nothing of FreeType (trainer.lettering)
FIGURE_IMPORTS = ("PIL.Image", "matplotlib", "isal.isal_zlib")


def fit_args(config: str, updates: int, save_dir: Path | str, *overrides: str) -> list[str]:
    """The arguments of ``trainer fit --config config`` for ``updates`` updates, with its runs under ``save_dir``."""
    args = ["--config", str(ROOT / config), "--trainer.max_steps", str(updates), *QUIET_FIT]
    return [*args, "--trainer.logger.init_args.save_dir", str(save_dir), *overrides]


def timed_fit(args: list[str], stamp: Callable[[], float]) -> dict[str, float]:
    """Build ``trainer fit`` from ``args`` in this process and time its ``trainer.fit`` on ``stamp``.

    Returns ``seconds`` (the fit), ``pictures_seconds`` (what the figures and histograms timed themselves
    drawing, the end included), ``figure_sets`` and ``histogram_sets`` (how many were drawn).
    """
    from trainer.cli import make_cli
    from trainer.figures import Figures
    from trainer.monitor import Histograms

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = make_cli(args, run=False)
    begin = stamp()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = stamp() - begin
    figures = next(c for c in cli.trainer.callbacks if isinstance(c, Figures))
    histograms = next(c for c in cli.trainer.callbacks if isinstance(c, Histograms))
    return {
        "seconds": seconds,
        "pictures_seconds": figures.spent + histograms.budget.spent,
        "figure_sets": figures.sets,
        "histogram_sets": histograms.budget.count,
    }


def _first_pictures(config: str, kind: str, threads: int, accelerator: str) -> None:
    """Run in a fresh process by ``once_per_process``: prints its measurements of ``config`` as JSON."""
    import importlib

    import trainer.cli  # noqa: F401  (what every `trainer fit` imports before it draws anything)

    torch.set_num_threads(threads)
    clock = getattr(time, HOST_CLOCKS[kind])
    begin = clock()
    for module in FIGURE_IMPORTS:
        importlib.import_module(module)
    imported = clock() - begin
    _quiet()
    device = ["--trainer.accelerator", accelerator]
    with tempfile.TemporaryDirectory() as tmp:
        timed_fit(fit_args(config, 1, tmp, *device, *PICTURES_OFF), clock)  # the first fit's costs, without pictures
        first, *later = (timed_fit(fit_args(config, 1, tmp, *device), clock)["seconds"] for _ in range(3))
    print(json.dumps({"import_after_trainer": imported, "first": first, "later": min(later)}))


_ONCE: dict[tuple[str, str, str], dict[str, float]] = {}
ONCE_PROCESSES = 3


def once_per_process(
    configs: list[str], kind: str, accelerator: str, without_cache: bool = False
) -> dict[str, dict[str, float]]:
    """What the pictures cost a fresh process once, which the warm fits of this benchmark no longer pay.

    For each config, in a new interpreter, after the trainer's own imports: the seconds of importing
    ``FIGURE_IMPORTS`` (``import_after_trainer``: nothing for what the trainer's imports already did); then,
    after a first fit without pictures, 1-update fits with them: the first takes ``first_use``
    seconds longer than the quickest later one (glyphs read, caches filled, code run for the first time).
    Each is the median of ``ONCE_PROCESSES`` fresh processes (one alone moved the line's ratio by a
    percent either way). ``total``, their sum, is charged to every fit with pictures. ``import_alone`` is the
    same import in a bare interpreter, for the record. The configs are measured side by side, each in its
    own process, a round at a time, on ``kind``'s clock; the results are kept for later calls.

    The glyph cache is put in place first (``trainer.figures.prepare_glyphs``), as every run after a
    machine's first finds it. What that first run pays more is measured for the record, not charged, with
    ``without_cache`` (the full run): one more process a config, with an empty cache of its own
    (``first_use_without_cache``).
    """
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def python(code: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, stdout=subprocess.PIPE, text=True
        )

    def result(process: subprocess.Popen) -> str:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a fresh process measuring the pictures failed (exit {process.returncode})")
        return out.strip().splitlines()[-1]

    missing = [c for c in configs if (c, kind, accelerator) not in _ONCE]
    if missing:
        clock = HOST_CLOCKS[kind]
        modules = ", ".join(FIGURE_IMPORTS)
        alone = python(f"import time; t = time.{clock}(); import {modules}; print(time.{clock}() - t)")
        alone = float(result(alone))
        scripts = str(Path(__file__).resolve().parent)
        code = (
            f"import sys; sys.path.insert(0, {scripts!r}); import benchmark; benchmark._first_pictures"
            "({!r}, " + f"{kind!r}, {torch.get_num_threads()}, {accelerator!r})"
        )
        from trainer.figures import prepare_glyphs

        prepare_glyphs()
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in missing}
        for _ in range(ONCE_PROCESSES):
            started = {c: python(code.format(c)) for c in missing}
            for c, process in started.items():
                got = json.loads(result(process))
                runs[c].append({**got, "first_use": max(0.0, got["first"] - got["later"])})
        cold = {}
        if without_cache:
            with tempfile.TemporaryDirectory() as empty:
                started = {c: python(code.format(c), HANDGRAD_CACHE_DIR=str(Path(empty) / c)) for c in missing}
                cold = {c: json.loads(result(process)) for c, process in started.items()}
        for c, got in runs.items():
            median = {key: statistics.median(run[key] for run in got) for key in got[0]}
            total = median["import_after_trainer"] + median["first_use"]
            _ONCE[c, kind, accelerator] = {"import_alone": alone, **median, "total": total, "processes": len(got)}
            if c in cold:
                _ONCE[c, kind, accelerator]["first_use_without_cache"] = max(0.0, cold[c]["first"] - cold[c]["later"])
    return {c: _ONCE[c, kind, accelerator] for c in configs}


def pictures_comparison(s: Settings, name: str, config: str, updates: int, repeats: int) -> Result:
    """``trainer.fit`` of ``config`` for ``updates`` updates with every picture at its default (ours), plus
    what a fresh process pays for them once, ÷ the same fit with figures and histograms off (reference).

    After a 1-update warm-up of each side, ``repeats`` interleaved quads (A B B A, then B A A B, …); a quad's
    ratio is the quicker of its two fits with pictures ÷ the quicker of its two without (a busy moment of
    the machine only ever adds time: one such fit moved a quad's ratio of means by 10 %), and the result is
    the median over the quads.
    """
    once = once_per_process([config], s.clock.host_kind, s.device.type)[config]
    save = s.workdir / name
    device = ["--trainer.accelerator", s.device.type]
    sides = {"ours": device, "reference": [*device, *PICTURES_OFF]}
    for overrides in sides.values():  # warm-up: this process's first fit and first pictures
        timed_fit(fit_args(config, 1, save, *overrides), s.clock.stamp)
    rows: list[dict[str, Any]] = []
    quads: list[tuple[float, float]] = []
    orders = (["ours", "reference", "reference", "ours"], ["reference", "ours", "ours", "reference"])
    for r in range(repeats):
        got: dict[str, list[float]] = {"ours": [], "reference": []}
        for side in orders[r % 2]:
            fit = timed_fit(fit_args(config, updates, save, *sides[side]), s.clock.stamp)
            seconds = fit["seconds"] + (once["total"] if side == "ours" else 0.0)
            got[side].append(seconds)
            row = {"comparison": name, "side": side, "repeat": r, "updates": updates, **fit}
            rows.append({**row, "fit_seconds": fit["seconds"], "seconds": seconds})
        quads.append((min(got["ours"]), min(got["reference"])))
    rows.append({"comparison": name, "side": "ours, once per process", **once})
    note = (
        f"{updates} updates; ours + {1e3 * once['total']:.0f} ms once a process (first pictures "
        f"{1e3 * once['first_use']:.0f} ms, imports {1e3 * once['import_after_trainer']:.0f} ms "
        f"after the trainer's imports, {1e3 * once['import_alone']:.0f} ms alone"
    )
    if "first_use_without_cache" in once:
        note += f"; a machine's first run {1e3 * once['first_use_without_cache']:.0f} ms, filling the glyph cache"
    note += ")"
    return Result.of_pairs(name, quads, rows, note)


def _figures(name: str, repeats: tuple[int, int]) -> Callable[[Settings], Result]:
    def run(s: Settings) -> Result:
        config, updates = PICTURE_RUNS[name]
        configs = [c for c, _ in PICTURE_RUNS.values()]
        once_per_process(configs, s.clock.host_kind, s.device.type, without_cache=not s.quick)  # all at once
        return pictures_comparison(s, f"figures.{name}", config, updates, s.scale(*repeats))

    return run


comparison("figures.line", 1.05)(_figures("line", (6, 6)))  # a short fit: more quads against the noise
comparison("figures.mlp_classification", 1.05)(_figures("mlp_classification", (1, 4)))


# ---------------------------------------------------------------------------------------------------------
# Running and reporting


def _quiet() -> None:
    from trainer.cli import _quiet_warnings

    _quiet_warnings()
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _format_value(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 2**20:9.2f} MiB"
    for scale, suffix in ((1e-6, "µs"), (1e-3, "ms"), (1.0, "s ")):
        if value < 1000 * scale:
            return f"{value / scale:9.1f} {suffix}"
    return f"{value:9.1f} s "


def format_table(results: list[Result], header: str) -> str:
    width = max([14, *(len(r.name) for r in results)])
    lines = [header, ""]
    lines.append(f"{'comparison':<{width}} {'ours':>12} {'reference':>12} {'ratio':>7} {'target':>7}  met  note")
    lines.append("-" * (width + 66))
    for r in results:
        target = COMPARISONS[r.name].target
        met = "yes" if r.ratio <= target else "NO"
        lines.append(
            f"{r.name:<{width}} {_format_value(r.ours, r.unit):>12} {_format_value(r.reference, r.unit):>12} "
            f"{r.ratio:7.3f} {target:7.2f}  {met:<4} {r.note}"
        )
    lines.append("")
    lines.append("ratios (ours ÷ reference, lower is better):")
    for r in results:
        lines.append(f"  {r.name:<{width}} {r.ratio:.3f}  (target ≤ {COMPARISONS[r.name].target:g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: ≤ 60 s on 2 CPU cores")
    parser.add_argument("--json", metavar="FILE", help="write device, torch, threads, ratios and every raw row")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on both sides (default 1)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="on the CPU: process CPU time (default; robust on a shared machine) or wall time",
    )
    parser.add_argument(
        "--malloc",
        choices=("retain", "system"),
        default="retain",
        help="retain: keep freed memory in the process as `trainer fit` does (trainer/allocator.py, the default);"
        " system: glibc's own thresholds. Either way both sides of every comparison share it",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", default=None, help="comma-separated comparison names, e.g. step.line,loop.line")
    args = parser.parse_args(argv)

    names = list(COMPARISONS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in COMPARISONS]
        if unknown:
            print(f"error: --only: unknown comparison {', '.join(unknown)}; choose from {', '.join(COMPARISONS)}")
            return 2
    if args.threads < 1:
        print(f"error: --threads {args.threads}: use a number of threads ≥ 1")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is available here; use --device cpu")
        return 2
    torch.set_num_threads(args.threads)
    _quiet()
    malloc = "retained" if args.malloc == "retain" and retain_freed_memory() else "system"

    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="handgrad-bench-") as workdir:
        settings = Settings(device, args.quick, Clock(device, args.clock), Path(workdir))
        for name in names:
            t0 = time.perf_counter()
            result = COMPARISONS[name].run(settings)
            results.append(result)
            print(f"  {name:<14} ratio {result.ratio:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    elapsed = time.perf_counter() - started

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    mode = "quick" if args.quick else "full"
    header = (
        f"handgrad benchmark  device={device} ({device_name})  torch={torch.__version__}  "
        f"threads={torch.get_num_threads()}  clock={settings.clock.kind}  malloc={malloc}  gemm={gemm.backend()}  "
        f"{mode}  {elapsed:.0f} s"
    )
    print()
    print(format_table(results, header))
    if args.json:
        report = {
            "device": str(device),
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "clock": settings.clock.kind,
            "malloc": malloc,
            "gemm": gemm.backend(),
            "quick": args.quick,
            "seconds": elapsed,
            "ratios": {r.name: r.ratio for r in results},
            "targets": {r.name: COMPARISONS[r.name].target for r in results},
            "met": {r.name: r.ratio <= COMPARISONS[r.name].target for r in results},
            "rows": [row for r in results for row in r.rows]
            + [
                {"comparison": r.name, "summary": True, "ours": r.ours, "reference": r.reference, "unit": r.unit}
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
