"""``trainer check --config FILE [--key value …]``: the gradient check on the configured model and its data.

The model and the data module are built from the config exactly as ``trainer fit`` builds them (same
seed, same overrides). On the first training batch (at most ``MAX_EXAMPLES`` of it), the cost's gradient
with respect to the input and to every parameter is checked three ways, with the oracles of
``models.gradcheck``:

- autograd on the same forward in float32 (the training dtype), then in float64 (``check_autograd``);
- central finite differences of the cost in float64, entry by entry.

One row per tensor; the command exits 1 if any comparison is beyond its tolerance, else 0.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from models.gradcheck import check_autograd, compare, tolerance
from models.layer import Layer

MAX_EXAMPLES = 64  # of the first batch: the input's gradient shrinks as 1/N, and its rounding with it
FD_TOLERANCE = 1e-6  # central differences with h = 1e-6 in float64: truncation ~1e-12, rounding ~1e-10


class CostOf(Layer):
    """The cost C = loss(model(x), target) as one ``Layer``, so the oracles see model and loss together.

    Args:
        model: a ``Layer`` (the configured MLP); loss: a ``Loss``; target: the batch's targets.
    """

    def __init__(self, model: Layer, loss: Layer, target: Tensor) -> None:
        super().__init__()
        self.model, self.loss, self.target = model, loss, target

    def forward(self, x: Tensor) -> Tensor:
        return self.loss(self.model(x), self.target)  # 0-d

    # C = loss(model(x))  ⇒  ∂C/∂x = model'ᵀ(loss'(g)): the loss's backward feeds the model's
    def backward(self, grad_output: Tensor) -> Tensor:
        return self.model.backward(self.loss.backward(grad_output))


def central_differences(cost: Callable[[], Tensor], tensor: Tensor, h: float = 1e-6) -> Tensor:
    """∂cost/∂tensor by (C(t + hᵢ) − C(t − hᵢ)) / 2hᵢ per entry, hᵢ = h·max(1, |tᵢ|); ``tensor`` is restored."""
    grad = torch.empty_like(tensor)
    flat, out = tensor.data.view(-1), grad.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            value = flat[i].item()
            step = h * max(1.0, abs(value))
            flat[i] = value + step
            up = cost()
            flat[i] = value - step
            down = cost()
            flat[i] = value
            out[i] = (up - down) / (2 * step)
    return grad


def check_model(model: Layer, loss: Layer, x: Tensor, y: Tensor, seed: int = 0) -> list[dict]:
    """The three checks of every tensor (``input`` and each parameter) of ``loss(model(x), y)``.

    The model is copied per dtype; the original is not changed. Returns one dict per tensor with keys
    ``name``, ``shape``, ``float32``, ``float64``, ``finite_differences`` (max relative errors), ``ok``.
    """
    import copy

    results: dict[str, dict] = {}
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        target = y.to(dtype) if y.is_floating_point() else y
        cost = CostOf(m, copy.deepcopy(loss), target)
        gen = torch.Generator().manual_seed(seed)
        for row in check_autograd(cost, x.to(dtype), generator=gen):
            name = row.name.removeprefix("model.")
            results.setdefault(name, {"name": name})[str(dtype).removeprefix("torch.")] = row.max_rel_error
    # finite differences of the float64 cost, against the hand-written float64 gradient (upstream 1)
    m = copy.deepcopy(model).to(torch.float64)
    target = y.to(torch.float64) if y.is_floating_point() else y
    cost = CostOf(m, copy.deepcopy(loss), target)
    x64 = x.detach().to(torch.float64).clone()
    cost.train()
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        cost(x64)
        grad_input = cost.backward(torch.tensor(1.0, dtype=torch.float64))
    manual = {"input": grad_input, **{n: p.grad for n, p in m.named_parameters()}}
    tensors = {"input": x64, **dict(m.named_parameters())}
    cost.eval()

    def evaluate() -> Tensor:
        return cost(x64)

    for name, tensor in tensors.items():
        numeric = central_differences(evaluate, tensor)
        row = compare(name, "finite differences", manual[name], numeric)
        results[name]["finite_differences"] = row.max_rel_error
        results[name]["shape"] = tuple(tensor.shape)
    for r in results.values():
        r["ok"] = (
            r["float32"] <= tolerance(torch.float32)
            and r["float64"] <= tolerance(torch.float64)
            and r["finite_differences"] <= FD_TOLERANCE
        )
    return list(results.values())


def format_rows(rows: list[dict], labels: dict[str, str] | None = None) -> str:
    """The per-tensor table, with the tolerances in the header."""
    labels = labels or {}
    names = [labels.get(r["name"], r["name"]) for r in rows]
    width = max(12, *(len(n) for n in names))
    head = (
        f"{'tensor':<{width}} {'shape':<10} {'autograd f32':>13} {'autograd f64':>13} {'finite diff':>12}  ok\n"
        f"{'tolerance':<{width}} {'':<10} {tolerance(torch.float32):>13.0e} {tolerance(torch.float64):>13.0e} "
        f"{FD_TOLERANCE:>12.0e}"
    )
    lines = [head, "-" * len(head.splitlines()[0])]
    for name, r in zip(names, rows, strict=True):
        shape = "×".join(map(str, r["shape"])) or "scalar"
        lines.append(
            f"{name:<{width}} {shape:<10} {r['float32']:>13.3e} {r['float64']:>13.3e} "
            f"{r['finite_differences']:>12.3e}  {'yes' if r['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def run_check(argv: list[str]) -> int:
    """The ``trainer check`` command: build model and data from the config, check, print; 0 when all pass."""
    from trainer.cli import make_cli
    from trainer.monitor import display_names

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Every option of `trainer fit` is accepted (--config, --model.*, --data.*); see `trainer fit --help`.")
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = make_cli(argv, run=False)
    model, dm = cli.model, cli.datamodule
    x, y = next(iter(dm.train_dataloader()))
    x, y = x[:MAX_EXAMPLES], y[:MAX_EXAMPLES]
    rows = check_model(model.model, model.loss, x, y)
    labels = {n: f"{n} ({d})" for n, d in display_names(model).items() if d != n}
    hp = model.hparams
    print(
        f"gradient check: model {model.model.widths} activation {hp.activation} output {hp.output_activation}, "
        f"loss {hp.loss} ({hp.reduction}), on {x.shape[0]} examples of the first training batch "
        f"({dm.x_train.shape[0]} in training)"
    )
    print(format_rows(rows, labels))
    failed = [labels.get(r["name"], r["name"]) for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: the hand-written gradient of {', '.join(failed)} disagrees with the reference", file=sys.stderr)
        return 1
    print(f"all {len(rows)} gradients agree with autograd (float32, float64) and finite differences (float64)")
    return 0
