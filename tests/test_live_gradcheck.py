"""The live gradient check: quiet through whole runs, loud and precise when a backward is wrong."""

from __future__ import annotations

import pytest
import torch
from tb_helpers import events, fit, scalars, summary

from models import MLP, SoftmaxCrossEntropy, SquaredError
from models.activations import ReLU
from models.gradcheck import tolerance
from models.losses import SquaredError as SquaredErrorClass
from trainer.live_gradcheck import GradientCheck, live_check


def test_stays_within_float32_tolerance_through_a_whole_line_run(tmp_path):
    """configs/line.yaml to its convergence stop, checked at every update."""
    run = fit("configs/line.yaml", tmp_path, "--gradcheck.every_n_steps", "1")
    result = summary(run)
    assert result["stop_reason"].startswith("converged")
    errors = scalars(events(run), "gradcheck/max_rel_error")
    assert sorted(errors) == list(range(result["steps"]))
    assert max(errors.values()) <= tolerance(torch.float32) == 1e-5


def test_stays_within_float32_tolerance_on_the_mlp(tmp_path):
    run = fit(
        "configs/mlp_classification.yaml", tmp_path, "--trainer.max_steps", "60", "--gradcheck.every_n_steps", "3"
    )
    errors = scalars(events(run), "gradcheck/max_rel_error")
    assert sorted(errors) == list(range(0, 60, 3))
    assert max(errors.values()) <= 1e-5
    # the end summary keeps the worst of them (and not a record per check, which grows with the run)
    worst_step = max(errors, key=errors.get)
    assert errors[worst_step] > 0  # otherwise "the worst" would be any step's
    assert summary(run)["gradcheck"] == {
        "checks": 20,
        "max_rel_error": pytest.approx(errors[worst_step], rel=1e-6),  # the events hold float32
        "at_step": worst_step,
    }


def test_a_broken_activation_stops_training_naming_the_parameters_below_it(tmp_path, monkeypatch, capsys):
    """ReLU's backward 0.1 % too large: the Linear layers under a ReLU are named, the output layer is not."""
    correct = ReLU.backward
    monkeypatch.setattr(ReLU, "backward", lambda self, g: correct(self, g) * 1.001)
    with pytest.raises(SystemExit) as exit_info:
        fit("configs/mlp_classification.yaml", tmp_path, "--trainer.max_steps", "5", "--gradcheck.every_n_steps", "1")
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]  # the one line the command prints
    assert message.startswith("error: live gradient check failed at step 0")
    for name in ("0.weight (Linear)", "0.bias (Linear)", "2.weight (Linear)", "2.bias (Linear)"):
        assert name in message
    assert "4.weight" not in message and "4.bias" not in message
    assert "float32 tolerance 1e-05" in message


def test_a_broken_loss_is_caught_by_the_steps_gradient(tmp_path, monkeypatch, capsys):
    """The squared error's backward 1 % too large: the model's own backward is right, the step's gradient not."""
    correct = SquaredErrorClass.backward
    monkeypatch.setattr(SquaredErrorClass, "backward", lambda self, g=1.0: correct(self, g) * 1.01)
    with pytest.raises(SystemExit) as exit_info:
        fit("configs/line.yaml", tmp_path, "--trainer.max_steps", "5", "--gradcheck.every_n_steps", "1")
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "0.weight (Linear)" in message and "the step's gradient" in message


def test_the_check_does_not_change_training(tmp_path):
    """Every update checked or none: the same parameters, bit for bit."""
    states = []
    for every in ("1", "0"):
        run = fit(
            "configs/mlp_classification.yaml",
            tmp_path / every,
            "--trainer.max_steps",
            "20",
            "--gradcheck.every_n_steps",
            every,
        )
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        states.append(ckpt["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize(
    ("widths", "activation", "loss"),
    [
        ([1, 1], "sigmoid", SquaredError()),
        ([2, 8, 8, 3], "tanh", SoftmaxCrossEntropy()),
        ([3, 5, 2], "relu", SquaredError("sum")),
    ],
)
def test_live_check_of_correct_gradients_in_float64(widths, activation, loss):
    torch.manual_seed(0)
    model = MLP(widths, activation).double()
    loss = loss.double()
    x = torch.randn(16, widths[0], dtype=torch.float64)
    y = torch.randint(0, widths[-1], (16,)) if isinstance(loss, SoftmaxCrossEntropy) else torch.randn(16, widths[-1])
    y = y if not y.is_floating_point() else y.double()
    with torch.no_grad():
        loss(model(x), y)
        model.backward(loss.backward())
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    rows = live_check(model, loss, x, y, generator=torch.Generator().manual_seed(1))
    assert [r.name for r in rows] == [n for n, _ in model.named_parameters()]
    assert all(r.ok for r in rows) and max(r.worst for r in rows) <= 1e-12
    for name, p in model.named_parameters():  # the step's gradients are left exactly as they were
        assert torch.equal(p.grad, before[name])


def test_live_check_sees_a_stale_gradient():
    """A gradient left over from an earlier batch (a missing zero_grad) is wrong for this batch."""
    torch.manual_seed(0)
    model, loss = MLP([2, 4, 1], "tanh").double(), SquaredError().double()
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    for _ in range(2):  # two backward passes, never zeroed: .grad holds twice the gradient
        with torch.no_grad():
            loss(model(x), y)
            model.backward(loss.backward())
    rows = live_check(model, loss, x, y)
    assert not any(r.ok for r in rows)
    assert all(0.1 < r.step_error <= 1.0 + 1e-9 for r in rows)  # |2g − g| / max(|g|, the terms' size)
    assert all(r.backward_error <= 1e-12 for r in rows)


def test_invalid_setting_is_named():
    with pytest.raises(ValueError, match=r"gradcheck.every_n_steps = -1 is invalid"):
        GradientCheck(every_n_steps=-1)


def test_a_correct_gradient_at_the_optimum_is_not_flagged():
    """At the least-squares optimum the gradient is rounding noise; another correct rounding of it must pass.

    The step's gradient is replaced by the float64 gradient rounded to float32: as right as the hand-written
    one, but its leading digits differ, as two correct GPU kernels' would.
    """
    from trainer.data import LineData
    from trainer.optimum import least_squares

    dm = LineData()
    x, y = dm.x_train, dm.y_train
    weight, bias = least_squares(x, y)
    model, loss = MLP([1, 1]), SquaredError()
    with torch.no_grad():
        model[0].weight.copy_(weight)
        model[0].bias.copy_(bias)
    params = list(model.parameters())
    with torch.enable_grad():
        float32 = torch.autograd.grad(loss(model(x), y), params)
        m64 = [p.detach().double().requires_grad_() for p in params]
        float64 = torch.autograd.grad(((x.double() @ m64[0].T + m64[1] - y.double()) ** 2).mean(), m64)
    model.release()
    loss.release()
    naive = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(float64, float32, strict=True))
    assert naive > 1e-5  # relative to the gradient itself, two correct roundings disagree
    for p, g in zip(params, float64, strict=True):
        p.grad = g.float()
    rows = live_check(model, loss, x, y, generator=torch.Generator().manual_seed(0))
    assert all(r.ok for r in rows), rows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("config", "steps"), [("configs/line.yaml", "0"), ("configs/mlp_classification.yaml", "300")])
def test_on_the_gpu_the_check_passes_and_the_pictures_are_drawn(tmp_path, config, steps):
    """On the real device: the check at every update (the line to convergence), figures, and the summary."""
    extra = ["--trainer.max_steps", steps] if steps != "0" else []
    run = fit(
        config,
        tmp_path,
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "1",
        "--gradcheck.every_n_steps",
        "1",
        *extra,
    )
    acc = events(run)
    errors = scalars(acc, "gradcheck/max_rel_error")
    assert len(errors) == summary(run)["steps"] and max(errors.values()) <= 1e-5
    assert acc.Tags()["images"]
    assert summary(run)["final_train_cost"] is not None


def test_under_ddp_the_reference_is_reduced_as_the_step_was(tmp_path):
    """Two CPU processes, the summed cost and an uneven last batch: the check passes at every update.

    Under DDP the step's gradient is the all-reduced one; the check reduces autograd's gradient with the
    training step's own all-reduce, so a sum (not a mean) and unequal shards are judged correctly.
    """
    from tb_helpers import command

    args = ["fit", "--config", "configs/mlp_classification.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--model.reduction", "sum", "--model.lr", "0.002", "--data.n", "1001", "--trainer.max_steps", "14"]
    args += ["--gradcheck.every_n_steps", "1", "--progress_bar.refresh_rate", "0", "--figures.at_end", "false"]
    result = command(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.glob("*/version_*")
    errors = scalars(events(run), "gradcheck/max_rel_error")
    assert sorted(errors) == list(range(14))  # 801 examples in batches of 64: step 12 is the uneven 33
    assert max(errors.values()) <= 1e-5


def test_the_end_table_names_the_worst_check_and_its_step_only_when_one_disagreed():
    from trainer.callbacks import format_summary

    base = {"stop_reason": "max_steps", "steps": 40, "epochs": 4}
    worst = format_summary({**base, "gradcheck": {"checks": 4, "max_rel_error": 2.5e-7, "at_step": 30}})
    assert "gradcheck     max rel error 2.5e-07 at step 30  (4 checks)" in worst.splitlines()
    exact = format_summary({**base, "gradcheck": {"checks": 1, "max_rel_error": 0.0, "at_step": 0}})
    assert "gradcheck     max rel error 0  (1 check)" in exact.splitlines()
    assert "gradcheck" not in format_summary(base)  # the check turned off
