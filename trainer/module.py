"""BackpropModule: Lightning around the hand-written math.

One training step, with no autograd anywhere in it:
    pred = model(x)                        forward, caching what backward needs
    cost = loss(pred, y)
    model.backward(loss.backward())        the chain rule by hand, output layer first
    all-reduce the gradients               only under DDP: autograd never ran, so DDP's hooks did not fire
    opt.step()                             SGD: p ← p − lr·∂C/∂p; Lightning counts the update
    log cost                               a tensor: no host sync inside the step
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from models import LOSSES, MLP, REDUCTIONS, make_loss
from models.activations import ACTIVATIONS
from trainer.sgd import SGD

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
    ) -> None:
        super().__init__()
        hidden = list(hidden)
        self._validate(hidden, activation, output_activation, loss, reduction, lr, momentum, weight_decay, init)
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
            }
        )
        self.automatic_optimization = False
        self.model = MLP([in_features, *hidden, out_features], activation, output_activation)
        self.loss = make_loss(loss, reduction)
        self.classification = loss == "cross_entropy"
        self._initialise(init, slope, intercept)
        self.stop_reason: str | None = None

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

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The logger's step axis is Lightning's count of batches that stepped; with one update per batch it
        # must equal global_step. Lightning's restart bookkeeping leaves it one ahead after a resume.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, cost and the hand-written backward; ∂C/∂θ accumulates into each ``.grad``. Returns the cost."""
        with torch.no_grad():
            pred = self.model(x)  # (N, K)
            cost = self.loss(pred, y)
            self.model.backward(self.loss.backward())
        self._last_pred = pred
        return cost

    def sync_gradients(self) -> None:
        """Under DDP: all-reduce every gradient in one flat buffer, SUM then ÷ world size (the mean)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        cost = self.forward_backward(x, y)
        self.sync_gradients()
        opt.step()
        self.log("train/cost", cost, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        if self.classification:
            self.log("train/accuracy", self._accuracy(self._last_pred, y), on_step=True, batch_size=x.shape[0])
        self._last_pred = None
        return cost

    @staticmethod
    def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
        return (logits.argmax(1) == y).float().mean()

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        x, y = batch
        with torch.no_grad():
            pred = self.model(x)
            cost = self.loss(pred, y)
        self.log(f"{prefix}/cost", cost, prog_bar=prefix == "val", on_epoch=True, batch_size=x.shape[0])
        if self.classification:
            self.log(f"{prefix}/accuracy", self._accuracy(pred, y), on_epoch=True, batch_size=x.shape[0])
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
