"""BackpropModule: Lightning around the hand-written math.

One update (``update``), with no autograd anywhere in it:
    pred = model(x)                        forward, caching what backward needs
    cost = loss(pred, y)
    model.backward(loss.backward())        the chain rule by hand, output layer first, written over the
                                           .grad buffers of the last update (no zero_grad)
    all-reduce the gradients and cost      only under DDP: autograd never ran, so DDP's hooks did not fire
    opt.step()                             SGD: p ← p − lr·∂C/∂p; Lightning counts the update

A ``training_step`` call makes one update per batch it is given: one, or k with ``steps_per_call``
(trainer/steps.py). The costs stay tensors until the end of the call, then go to the loggers at their
own steps in one host sync.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer import call
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from models import LOSSES, MLP, REDUCTIONS, gemm, make_loss
from models.activations import ACTIVATIONS
from trainer.events import scalar_events
from trainer.sgd import SGD
from trainer.steps import StepGroup

INITS = ("default", "zeros")


class ConfigError(ValueError):
    """A model or optimiser setting that cannot work; the message names the key and the valid values."""


def _choice(key: str, value: str | None, valid: Sequence[str], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in valid:
        extra = " (or null)" if allow_none else ""
        raise ConfigError(f"model.{key} = {value!r} is unknown: choose one of {', '.join(valid)}{extra}")


class BackpropModule(L.LightningModule):
    """A model with hand-written gradients, trained by a hand-written SGD step (manual optimization).

    Args (all primitive, so they are the CLI keys and every checkpoint loads with ``weights_only=True``):
        hidden: the hidden widths; ``[]`` is the seed's straight line, ``[1]`` with sigmoid its one-neuron
            chain, ``[64, 64]`` an MLP.
        activation: after every hidden layer: sigmoid, tanh, relu or identity.
        output_activation: after the last layer, or null for a linear output.
        loss: ``squared_error`` or ``cross_entropy`` (class-index targets).
        reduction: ``mean`` over examples (the same lr works for any batch size) or ``sum``.
        lr, momentum, weight_decay: the SGD update.
        init: ``default`` (the init of ``torch.nn.Linear``) or ``zeros``.
        slope, intercept: a straight line's starting m and c (``hidden: []`` with one input and one output).
        in_features, out_features: the widths of the data, linked from the data module by the CLI.
        steps_per_call: updates per ``training_step`` call (k ≥ 1): for tiny models, whose update costs less
            than one pass of Lightning's loop. The updates are those of k = 1; see ``trainer/steps.py``.

    Raises:
        ConfigError: for any setting outside its valid range, naming the key.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (),
        activation: str = "sigmoid",
        output_activation: str | None = None,
        loss: str = "squared_error",
        reduction: str = "mean",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        init: str = "default",
        slope: float | None = None,
        intercept: float | None = None,
        in_features: int = 1,
        out_features: int = 1,
        steps_per_call: int = 1,
    ) -> None:
        super().__init__()
        hidden = list(hidden)
        self._validate(hidden, activation, output_activation, loss, reduction, lr, momentum, weight_decay, init)
        if not isinstance(steps_per_call, int) or isinstance(steps_per_call, bool) or steps_per_call < 1:
            raise ConfigError(
                f"model.steps_per_call = {steps_per_call!r} is invalid: use an integer ≥ 1 (1 is one update per call)"
            )
        self.save_hyperparameters(
            {
                "hidden": hidden,
                "activation": activation,
                "output_activation": output_activation,
                "loss": loss,
                "reduction": reduction,
                "lr": float(lr),
                "momentum": float(momentum),
                "weight_decay": float(weight_decay),
                "init": init,
                "slope": slope,
                "intercept": intercept,
                "in_features": int(in_features),
                "out_features": int(out_features),
                "steps_per_call": steps_per_call,
            }
        )
        self.automatic_optimization = False
        self.model = MLP([in_features, *hidden, out_features], activation, output_activation)
        self.loss = make_loss(loss, reduction)
        self.classification = loss == "cross_entropy"
        self._initialise(init, slope, intercept)
        self.stop_reason: str | None = None
        # Set for a call whose last update the live gradient check compares with autograd: the update then
        # runs on the kernels autograd runs (models/gemm.py), so the two agree to the bit unless the math
        # differs. Every other update takes the fast kernels, which tests/test_gemm.py checks against these.
        self.reference_kernels = False
        self._last_flush = 0.0  # time.monotonic() of the loggers' last flush (_log_each_update)
        self._event_writers: list[tuple[Any, Any]] | None = None  # (logger, its bulk writer or None), per fit
        self._reads: list[Tensor] = []  # one-element tensors each call reads with its costs (read_each_call)

    # Attributes that only ever hold plain values (never a parameter, buffer or submodule), written on every
    # update: Lightning sets _current_fx_name around each hook it calls (27 times a training_step call), and
    # nn.Module.__setattr__ spends 0.9 µs on each checking what the value is, where a dict write takes 0.1.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_last_pred", "_last_flush", "_event_writers"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @staticmethod
    def _validate(hidden, activation, output_activation, loss, reduction, lr, momentum, weight_decay, init) -> None:
        for i, width in enumerate(hidden):
            if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
                raise ConfigError(
                    f"model.hidden[{i}] = {width!r} is invalid: every hidden width must be an integer ≥ 1"
                )
        _choice("activation", activation, sorted(ACTIVATIONS))
        _choice("output_activation", output_activation, sorted(ACTIVATIONS), allow_none=True)
        _choice("loss", loss, list(LOSSES))
        _choice("reduction", reduction, list(REDUCTIONS))
        _choice("init", init, INITS)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"model.lr = {lr!r} is invalid: the learning rate must be a finite number > 0")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"model.momentum = {momentum!r} is invalid: use a value in [0, 1) (0 turns it off)")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ConfigError(
                f"model.weight_decay = {weight_decay!r} is invalid: use a finite value ≥ 0 (0 turns it off)"
            )

    def _initialise(self, init: str, slope: float | None, intercept: float | None) -> None:
        if init == "zeros":
            with torch.no_grad():
                for p in self.model.parameters():
                    p.zero_()
        if slope is None and intercept is None:
            return
        linears = self.model.linears
        if len(linears) != 1 or linears[0].weight.shape != (1, 1):
            raise ConfigError(
                "model.slope and model.intercept set a straight line's start: use them with hidden: [] and "
                f"one input and one output (this model has widths {self.model.widths})"
            )
        with torch.no_grad():
            if slope is not None:
                linears[0].weight.fill_(slope)
            if intercept is not None:
                linears[0].bias.fill_(intercept)

    @property
    def is_linear(self) -> bool:
        """A single Linear layer with no activation: least squares has a closed form for it."""
        hp = self.hparams
        return not hp.hidden and hp.output_activation in (None, "identity") and hp.loss == "squared_error"

    # ------------------------------------------------------------------ the step

    def on_train_start(self) -> None:
        self._event_writers = None  # looked up again at the first update: a new fit may write new files

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The logger's step axis is Lightning's count of batches that stepped; with one update per batch it
        # must equal global_step. Lightning's restart bookkeeping leaves it one ahead after a resume.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_backward(self, x: Tensor, y: Tensor, accumulate: bool = True) -> Tensor:
        """Forward, cost and the hand-written backward; ∂C/∂θ accumulates into each ``.grad`` (or, with
        ``accumulate=False``, is written over it in place: zero_grad and backward in one). Returns the cost."""
        with torch.no_grad():
            return self._forward_backward(x, y, accumulate)

    def _forward_backward(self, x: Tensor, y: Tensor, accumulate: bool) -> Tensor:
        # the submodules from nn.Module's own dict: self.model would pass through its __getattr__ (0.4 µs)
        modules = self._modules
        model, loss = modules["model"], modules["loss"]
        if x.shape[0] == 0:
            # An empty shard under DDP (a last global batch smaller than the world): it adds nothing.
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif not accumulate:
                    p.grad.zero_()
            if self.classification:
                self._last_pred = x.new_zeros(0, self.hparams.out_features)
            return x.new_zeros(())
        pred = model(x)  # (N, K)
        cost = loss(pred, y)
        # input_grad=False: x is the data, so ∂C/∂x is never needed (autograd skips it too)
        model.backward(loss.backward(), accumulate=accumulate, input_grad=False)
        if self.classification:
            self._last_pred = pred  # for the accuracy
        return cost

    def update(self, x: Tensor, y: Tensor, optimizer_step: Callable[[], object]) -> tuple[Tensor, Tensor | None]:
        """One update on the batch (x, y), as ``training_step`` makes it; returns the cost and, for
        classification, the accuracy (0-d tensors, over all ranks under DDP; no host sync).

        Forward, cost, backward written over the last update's ``.grad`` buffers (so no zero_grad), the
        all-reduce under DDP, then ``optimizer_step()``: Lightning's ``self.optimizers().step`` (which
        counts the update and runs its hooks) or, outside that, our ``SGD.update`` (the benchmark).
        """
        # No autograd anywhere in the update. The grad mode is switched directly: torch.no_grad() costs
        # 1.1 µs and torch.set_grad_enabled 0.6 µs, as much as a small layer's forward; this 0.2 µs.
        was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if self.reference_kernels:  # an update the live gradient check compares with autograd
                with gemm.use("torch"):
                    cost = self._forward_backward(x, y, accumulate=False)
            else:
                cost = self._forward_backward(x, y, accumulate=False)
            correct = (self._last_pred.argmax(1) == y).sum() if self.classification else None
            cost, accuracy = self.sync_gradients(cost, x.shape[0], correct)  # the cost over all ranks
            optimizer_step()
        finally:
            torch._C._set_grad_enabled(was_enabled)
        return cost, accuracy

    def sync_gradients(
        self, cost: Tensor, num_examples: int, correct: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Under DDP: make every rank's ``.grad`` and cost those of the whole global batch, in one all-reduce.

        Autograd never runs, so DDP's hooks never fire: this is the only gradient communication. Rank r
        holds the gradient g_r of its cost C_r over its n_r examples. For the mean over examples the
        global batch's gradient is Σ_r n_r g_r / Σ_r n_r, which is SUM ÷ world size when the shards are
        equal and stays exact when the last batch is uneven (a plain mean of the ranks' means is not);
        for the sum it is Σ_r g_r. One flat buffer [n_r·g_r, n_r·C_r, n_r, correct_r] is summed over the
        ranks and divided on the device, so the step makes no host sync.

        Args:
            cost: this rank's cost (0-d); num_examples: n_r; correct: this rank's count of right classes.

        Returns:
            The cost and the accuracy (None without ``correct``) over all ranks; on one process, the
            cost as it is and correct / n.
        """
        if not (dist.is_available() and dist.is_initialized()) or self._trainer is None or self.trainer.world_size <= 1:
            return cost, None if correct is None else correct / num_examples  # one process: the usual case
        params = list(self.model.parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        size = sum(g.numel() for g in grads)
        tail = cost.new_zeros(3)
        flat = torch.cat([*(g.reshape(-1) for g in grads), tail])  # (P + 3,)
        flat[size] = cost
        flat[size + 1].fill_(num_examples)  # a fill, not a tensor built on the host: no copy, no sync
        if correct is not None:
            flat[size + 2] = correct
        mean = self.hparams.reduction == "mean"
        if mean:
            flat[: size + 1].mul_(num_examples)  # n_r·g_r and n_r·C_r: sums over the examples
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total = flat[size + 1]  # Σ_r n_r, the global batch
        if mean:
            flat[: size + 1].div_(total)
        for p, g in zip(params, flat[:size].split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)
        return flat[size], None if correct is None else flat[size + 2] / total

    def setup(self, stage: str) -> None:
        """Tell the data module how many batches each training_step call takes (``steps_per_call``)."""
        if stage != "fit":
            return
        k = self.hparams.steps_per_call
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "steps_per_call"):
            dm.steps_per_call = k  # also 1: a data module reused after a run with k > 1 goes back to one batch
        elif k > 1:
            raise ConfigError(
                f"model.steps_per_call = {k} needs one of handgrad's data modules (trainer.data), which hand "
                "over k batches per call; use steps_per_call: 1 with other data"
            )

    def read_each_call(self, *tensors: Tensor) -> None:
        """Have every ``training_step`` call read ``tensors`` (each of one element, on the model's device)
        after its updates, in the call's one host read of its costs: their values come back as the call's
        ``outputs["read"]``, a list of floats. A callback that needs a number after every call, such as the
        path of the line's slope and intercept (``trainer.figures``), gets it without a host read of its own.
        A later call replaces them; with none, nothing more is read.
        """
        for t in tensors:
            if t.numel() != 1:
                raise ValueError(f"read_each_call takes tensors of one element; got one of shape {tuple(t.shape)}")
        self._reads = [t.detach().view(()) for t in tensors]

    def training_step(self, batch: tuple[Tensor, Tensor] | StepGroup, batch_idx: int) -> dict[str, Tensor] | None:
        """One update per batch: the one batch, or each of a ``StepGroup``'s k (``steps_per_call``).

        All but the last update of a call use our SGD directly and are counted here; the last also runs the
        ``on_before_optimizer_step`` hooks, as Lightning's optimizer step does (``_direct_step``).
        Every update's cost is logged at its own step (see ``_log_each_update``).
        """
        opt = self.optimizers()
        first = self.trainer.global_step
        batches = batch.batches if isinstance(batch, StepGroup) else [batch]
        if self.trainer.max_steps >= 0:
            batches = batches[: max(self.trainer.max_steps - first, 0)]  # never past max_steps
        last_step = self._direct_step(opt) or opt.step
        costs, accuracies = [], []
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            cost, accuracy = self.update(x, y, last_step if last else opt.optimizer.update)
            costs.append(cost)
            if not last:
                self._count_update()
            if accuracy is not None:
                accuracies.append(accuracy)
        self._last_pred = None
        if not costs:
            return None
        k, reads = len(costs), self._reads
        values = torch.stack(costs + accuracies + reads)  # one op, then the call's one host sync
        numbers = values.tolist()
        cost_values = numbers[:k]
        series = {"train/cost": cost_values}
        if accuracies:
            series["train/accuracy"] = numbers[k : 2 * k]
        self._log_each_update(first, series)
        cost = costs[-1]
        self._publish_cost(cost, cost_values[-1])
        # every update's cost, as tensors and as the numbers already read (for trainer.callbacks.Convergence)
        out = {"loss": cost, "costs": values[:k], "cost_values": cost_values}
        if reads:
            out["read"] = numbers[len(numbers) - len(reads) :]
        return out

    # Lightning inspects training_step's signature on every call (to see whether it takes batch_idx):
    # inspect.getfullargspec, about 10 µs a call. A function's ``__signature__`` answers that at once.
    training_step.__signature__ = inspect.signature(training_step)

    def _publish_cost(self, cost: Tensor, value: float) -> None:
        """Leave the last cost where ``self.log("train/cost", cost, prog_bar=True, logger=False)`` would: in
        ``trainer.callback_metrics`` (what EarlyStopping and checkpoints monitor) and on the progress bar.

        The loggers got every value already. Lightning's ``self.log`` costs 0.5 ms a call here (its result
        collection, then a conversion per step), 2 % of a 24 ms update of the large MLP; this is two dict
        writes into the same dicts Lightning fills from ``self.log``.
        """
        connector = self.trainer._logger_connector
        # a tensor of its own, never a view (under DDP the cost is one of the all-reduced buffer):
        # ModelCheckpoint deep-copies these metrics every epoch, and torch keeps a little memory for each
        # deep copy of a view
        connector._callback_metrics["train/cost"] = cost if cost._base is None else cost.clone()
        connector._progress_bar_metrics["train/cost"] = value

    def _direct_step(self, opt: Any) -> Callable[[], None] | None:
        """The optimizer step of a call's last update as Lightning's ``opt.step()`` makes it, without its
        wrappers; None where those wrappers may do more, and ``opt.step()`` must run.

        With the plain precision plugin, the single-device or DDP strategy (no model averaging) and no
        optimizer step hooks, ``opt.step()`` counts the update, runs the ``on_before_optimizer_step`` hooks of
        the callbacks and the module (Monitor and GradientCheck read the gradients there), then steps; in
        manual optimization it clips nothing. This does the same in the same order, without the layers of
        strategy, precision plugin, closure and ``torch.optim`` profiling wrapper around it (0.3 ms a call
        on a 2-core CPU: 1.5 % of a large MLP's update, more than a small model's whole update).
        """
        trainer = self.trainer
        optimizer = opt.optimizer
        precision, strategy = type(trainer.precision_plugin), type(trainer.strategy)
        if not (
            precision.optimizer_step is Precision.optimizer_step  # plain 32- and 64-bit: no scaler, no autocast
            and precision._after_closure is Precision._after_closure
            and strategy.optimizer_step in (Strategy.optimizer_step, DDPStrategy.optimizer_step)
            and getattr(trainer.strategy, "_model_averager", None) is None
            and isinstance(optimizer, SGD)
            and not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks)
            and not (torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)
        ):
            return None

        def step() -> None:
            opt._on_before_step()  # the manual-optimization loop's count: an update is ready
            call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
            call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
            optimizer.update()
            opt._on_after_step()  # and completed: global_step advances

        return step

    def _count_update(self) -> None:
        """Count an update made without Lightning's optimizer wrapper, as the wrapper does: global_step is
        the manual-optimization loop's count of completed optimizer steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _log_each_update(self, first_step: int, series: dict[str, list[float]]) -> None:
        """Write update i's values (the i-th of each series) to the loggers at step first_step + i, every
        ``log_every_n_steps``.

        The steps are those Lightning's own ``self.log`` would give (the update count before the update),
        but a whole call's values come from one host sync, go to TensorBoard's writer thread in bursts
        (``trainer/events.py``), and the loggers are flushed (``logger.save()``) at most once a second, where
        Lightning's logging flushes after every step.
        """
        writers = self._event_writers
        if writers is None:  # once a fit: each logger with its bulk TensorBoard writer, or None
            writers = self._event_writers = [(logger, scalar_events(logger)) for logger in self.loggers]
        if not writers:
            return
        every = self.trainer.log_every_n_steps
        # Lightning's rule for which steps to log
        names = list(series)
        points = [
            (first_step + i, dict(zip(names, row, strict=True)))
            for i, row in enumerate(zip(*series.values(), strict=True))
            if (first_step + i + 1) % every == 0
        ]
        for logger, events in writers:
            if events is not None:
                events.write(points)  # TensorBoard: held, then handed off in bursts (trainer/events.py)
            else:
                for step, metrics in points:
                    logger.log_metrics(metrics, step=step)
        now = time.monotonic()
        if now - self._last_flush >= 1.0 or self.trainer.should_stop:
            self._last_flush = now
            for logger, _ in writers:
                logger.save()

    @staticmethod
    def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
        return (logits.argmax(1) == y).float().mean()

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        x, y = batch
        with torch.no_grad():
            pred = self.model(x)
            cost = self.loss(pred, y)
        # Evaluation is not sharded (every rank sees every example), so under DDP the sync only confirms
        # equal values; it keeps Lightning's epoch-level bookkeeping right and costs nothing on one process.
        sync = self._trainer is not None and self.trainer.world_size > 1
        self.log(f"{prefix}/cost", cost, prog_bar=prefix == "val", on_epoch=True, batch_size=x.shape[0], sync_dist=sync)
        if self.classification:
            accuracy = self._accuracy(pred, y)
            self.log(f"{prefix}/accuracy", accuracy, on_epoch=True, batch_size=x.shape[0], sync_dist=sync)
        return cost

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            pred = self.model(x)
        return pred.softmax(1) if self.classification else pred

    def configure_optimizers(self) -> SGD:
        hp = self.hparams
        return SGD(self.model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    # ------------------------------------------------------------------ what the run learned

    @torch.no_grad()
    def full_cost(self, x: Tensor, y: Tensor) -> float:
        """The cost over the given examples, in eval mode (no cache kept)."""
        was_training = self.model.training
        self.model.eval()
        self.loss.eval()
        cost = self.loss(self.model(x), y).item()
        self.model.train(was_training)
        self.loss.train(was_training)
        return cost

    def named_scalars(self, limit: int = 16) -> dict[str, float] | None:
        """Every parameter entry by name (``slope``/``intercept`` for the line), or None past ``limit``."""
        params = dict(self.model.named_parameters())
        if sum(p.numel() for p in params.values()) > limit:
            return None
        if self.is_linear and self.model.linears[0].weight.shape == (1, 1):
            lin = self.model.linears[0]
            return {"slope": lin.weight.item(), "intercept": lin.bias.item()}
        out = {}
        for name, p in params.items():
            flat = p.detach().reshape(-1).tolist()
            for i, v in enumerate(flat):
                out[name if len(flat) == 1 else f"{name}[{i}]"] = v
        return out
