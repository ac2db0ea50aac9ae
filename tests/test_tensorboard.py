"""What a run leaves in TensorBoard: every tag of the issue, and its values against references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tb_helpers import QUIET, ROOT, built, events, fit, run_main, scalars, summary
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.figures import DPI, FIGSIZE
from trainer.optimum import least_squares, squared_error

LINE_STEPS = 120
CLASSIFICATION_STEPS = 30


@pytest.fixture(scope="module")
def line_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("line")
    run = fit("configs/line.yaml", save, "--trainer.max_steps", str(LINE_STEPS), "--gradcheck.every_n_steps", "10")
    return run, events(run), save


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("classification")
    run = fit(
        "configs/mlp_classification.yaml",
        save,
        "--trainer.max_steps",
        str(CLASSIFICATION_STEPS),
        "--histograms.every_n_steps",
        "10",
        "--histograms.max_overhead",
        "1.0",
        "--gradcheck.every_n_steps",
        "10",
    )
    return run, events(run), save


def test_line_logs_every_tag(line_run):
    _, acc, _ = line_run
    tags = acc.Tags()
    expected = {
        "train/cost",
        "train/lr",
        "train/grad_norm",
        "train/step_size/slope",
        "train/step_size/intercept",
        "params/slope",
        "params/intercept",
        "train/optimum_gap",
        "train/lr_bound",
        "gradcheck/max_rel_error",
    }
    assert expected <= set(tags["scalars"])
    assert {"figures/fit", "figures/cost_surface"} <= set(tags["images"])
    assert "figures/decision_regions" not in tags["images"]
    assert not tags["histograms"]  # two numbers: curves, not histograms
    for tag in expected - {"train/lr_bound", "gradcheck/max_rel_error"}:
        assert sorted(scalars(acc, tag)) == list(range(LINE_STEPS)), tag


def test_line_scalars_follow_gradient_descent(line_run, tmp_path):
    """params, step sizes, gradient norm, cost and gap at step k against torch.optim.SGD on autograd's cost."""
    _, acc, _ = line_run
    model, dm = built("configs/line.yaml", tmp_path)
    x, y = dm.x_train, dm.y_train
    lr = model.hparams.lr
    m = torch.tensor(model.hparams.slope, requires_grad=True)
    c = torch.tensor(model.hparams.intercept, requires_grad=True)
    opt = torch.optim.SGD([m, c], lr=lr)
    w_opt, b_opt = least_squares(x, y)
    optimum = squared_error(x, y, w_opt, b_opt, "mean")
    logged = {tag: scalars(acc, tag) for tag in acc.Tags()["scalars"]}
    for k in range(LINE_STEPS):
        opt.zero_grad()
        cost = ((m * x + c - y) ** 2).mean()
        cost.backward()
        close = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(logged["params/slope"][k], m.item(), **close)
        torch.testing.assert_close(logged["params/intercept"][k], c.item(), **close)
        torch.testing.assert_close(logged["train/step_size/slope"][k], lr * m.grad.item(), **close)
        torch.testing.assert_close(logged["train/step_size/intercept"][k], lr * c.grad.item(), **close)
        torch.testing.assert_close(logged["train/grad_norm"][k], torch.hypot(m.grad, c.grad).item(), **close)
        torch.testing.assert_close(logged["train/cost"][k], cost.item(), **close)
        exact = squared_error(x, y, m.detach().reshape(1, 1), c.detach().reshape(1), "mean") - optimum
        torch.testing.assert_close(logged["train/optimum_gap"][k], exact, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(logged["train/lr"][k], lr)
        opt.step()


def test_line_lr_bound_is_two_over_the_hessians_largest_eigenvalue(line_run, tmp_path):
    _, acc, _ = line_run
    _, dm = built("configs/line.yaml", tmp_path)
    x, y = dm.x_train.double(), dm.y_train.double()

    def cost(theta):
        return ((theta[0] * x + theta[1] - y) ** 2).mean()

    hessian = torch.autograd.functional.hessian(cost, torch.zeros(2, dtype=torch.float64))
    (bound,) = scalars(acc, "train/lr_bound").values()
    torch.testing.assert_close(bound, 2.0 / torch.linalg.eigvalsh(hessian).max().item(), rtol=1e-6, atol=0)


def test_line_figures_after_the_start_and_at_the_end(line_run):
    """The fit and the cost surface show the start in every frame, so they have none at step 0."""
    _, acc, _ = line_run
    for tag in ("figures/fit", "figures/cost_surface"):
        images = acc.Images(tag)
        steps = [i.step for i in images]
        assert steps[-1] == LINE_STEPS and 0 not in steps, (tag, steps)
        picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
        size = (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI), 3)
        assert picture.shape == (images[-1].height, images[-1].width, 3) == size
        assert picture.std() > 10  # not a blank canvas


def test_line_hparams_tab(line_run):
    run, acc, _ = line_run
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.lr"].number_value == pytest.approx(0.01)
    assert hparams["data"].string_value == "LineData"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"hp/train_cost", "hp/optimum_gap", "hp/lr_bound", "hp/steps", "hp/gradcheck_max_rel_error"} <= metrics
    assert set(acc.Tags()["scalars"]) >= metrics
    # the live gradient check's worst, as the summary has it (the event holds it in float32)
    (logged,) = [e.value for e in acc.Scalars("hp/gradcheck_max_rel_error")]
    assert logged == pytest.approx(summary(run)["gradcheck"]["max_rel_error"], rel=1e-6, abs=1e-30)


def test_classification_logs_every_tag(classification_run):
    run, acc, _ = classification_run
    tags = acc.Tags()
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    expected = {"train/cost", "val/cost", "train/accuracy", "val/accuracy", "train/lr", "train/grad_norm"}
    expected |= {f"train/step_size/{n}" for n in names} | {"gradcheck/max_rel_error"}
    assert expected <= set(tags["scalars"])
    assert not any(t.startswith("params/") for t in tags["scalars"])  # 1218 numbers: histograms instead
    assert "train/optimum_gap" not in tags["scalars"] and "train/lr_bound" not in tags["scalars"]
    assert {f"weights/{n}" for n in names} | {f"grads/{n}" for n in names} <= set(tags["histograms"])
    assert tags["images"] == ["figures/decision_regions"]
    steps = [i.step for i in acc.Images("figures/decision_regions")]
    assert steps[0] == 0 and steps[-1] == CLASSIFICATION_STEPS, steps  # a frame at the start, and the end
    result = summary(run)
    assert 0.0 <= result["final_train_accuracy"] <= 1.0 and 0.0 <= result["final_val_accuracy"] <= 1.0


def test_classification_histograms_hold_the_weights_and_gradients_of_step_zero(classification_run, tmp_path):
    """weights/<name> and grads/<name> at step 0 against the freshly built model and autograd's gradient."""
    _, acc, _ = classification_run
    model, dm = built("configs/mlp_classification.yaml", tmp_path)
    x, y = next(iter(dm.train_dataloader()))  # the first batch of the run
    params = dict(model.model.named_parameters())
    cost = model.loss(model.model(x), y)
    grads = dict(zip(params, torch.autograd.grad(cost, list(params.values())), strict=True))
    model.model.release()
    model.loss.release()
    for name, p in params.items():
        for tag, values in ((f"weights/{name}", p.detach()), (f"grads/{name}", grads[name])):
            first = acc.Histograms(tag)[0]
            assert first.step == 0
            h = first.histogram_value
            assert h.num == values.numel()
            torch.testing.assert_close(h.min, values.min().item(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(h.max, values.max().item(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(h.sum, values.double().sum().item(), rtol=1e-5, atol=1e-7)


def test_classification_step_sizes_are_lr_times_the_gradient(classification_run, tmp_path):
    _, acc, _ = classification_run
    model, dm = built("configs/mlp_classification.yaml", tmp_path)
    x, y = next(iter(dm.train_dataloader()))
    params = dict(model.model.named_parameters())
    grads = torch.autograd.grad(model.loss(model.model(x), y), list(params.values()))
    model.model.release()
    model.loss.release()
    for name, g in zip(params, grads, strict=True):
        logged = scalars(acc, f"train/step_size/{name}")[0]
        torch.testing.assert_close(logged, model.hparams.lr * torch.linalg.vector_norm(g).item(), rtol=1e-5, atol=0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    torch.testing.assert_close(scalars(acc, "train/grad_norm")[0], norm, rtol=1e-5, atol=0)


def test_runs_without_a_logger(tmp_path):
    """No TensorBoard: the monitor, figures and histograms stand aside; training and the summary still work."""
    run_dir = tmp_path / "nolog"
    run_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/line.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.max_steps",
            "5",
            *QUIET,
        ]
    )
    assert not list(run_dir.rglob("events.out.tfevents*"))


def test_scalars_share_the_steps_of_the_cost_when_logging_less_often(tmp_path):
    run = fit("configs/line.yaml", tmp_path, "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5")
    acc = events(run)
    steps = sorted(scalars(acc, "train/cost"))
    assert len(steps) == 4
    for tag in ("params/slope", "train/grad_norm", "train/optimum_gap", "train/lr"):
        assert sorted(scalars(acc, tag)) == steps, tag


@pytest.mark.parametrize(
    ("config", "images", "linear"),
    [
        ("configs/chain.yaml", ["figures/fit"], False),
        ("configs/mlp_regression.yaml", ["figures/fit"], False),
        ("configs/csv.yaml", [], True),  # two features: no picture applies, but the closed form does
    ],
)
def test_the_other_configs(tmp_path, config, images, linear):
    run = fit(config, tmp_path, "--trainer.max_steps", "20")
    acc = events(run)
    tags = acc.Tags()
    assert sorted(tags["images"]) == images
    assert ("train/optimum_gap" in tags["scalars"]) == linear == ("train/lr_bound" in tags["scalars"])
    assert {"train/cost", "train/lr", "train/grad_norm", "gradcheck/max_rel_error"} <= set(tags["scalars"])
    assert max(scalars(acc, "gradcheck/max_rel_error").values()) <= 1e-5


def test_the_end_of_a_fit_measures_its_summary_once(tmp_path, monkeypatch):
    """The HParams metrics take the summary callback's numbers instead of a second pass over the data."""
    import trainer.callbacks as callbacks
    import trainer.monitor as monitor

    calls = []
    measure = callbacks.run_summary

    def counted(trainer, pl_module):
        calls.append(trainer.global_step)
        return measure(trainer, pl_module)

    monkeypatch.setattr(callbacks, "run_summary", counted)
    monkeypatch.setattr(monitor, "run_summary", counted)
    run = fit("configs/line.yaml", tmp_path, "--trainer.max_steps", "20")
    assert calls == [20]
    (steps,) = [e.value for e in events(run).Scalars("hp/steps")]
    assert steps == summary(run)["steps"] == 20
