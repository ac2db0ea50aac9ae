"""Training through Lightning: the line reaches least squares, full batch is gradient descent, the
mini-batch gradients average to the full gradient, the cost is logged at every update, and resume works."""

from __future__ import annotations

import json

import pytest
import torch
from _util import quiet_trainer, scalars
from lightning.pytorch.loggers import TensorBoardLogger

from trainer import BackpropModule, ClassificationData, Convergence, LineData, RegressionData, Summary
from trainer.module import ConfigError
from trainer.optimum import least_squares


def _line_module(**kwargs) -> BackpropModule:
    return BackpropModule(hidden=[], lr=0.01, slope=1.0, intercept=0.0, **kwargs)


def test_line_reaches_least_squares_with_the_default_convergence_stop():
    data = LineData()
    module = _line_module()
    trainer = quiet_trainer(max_steps=20_000, callbacks=[Convergence()])
    trainer.fit(module, data)
    assert module.stop_reason is not None and module.stop_reason.startswith("converged")
    assert trainer.global_step < 20_000
    weight, bias = least_squares(data.x_train, data.y_train)
    lin = module.model.linears[0]
    assert abs(lin.weight.item() - weight.item()) < 1e-3
    assert abs(lin.bias.item() - bias.item()) < 1e-3


def _fit_params(batch_size, steps, seed=0, **module_kwargs):
    torch.manual_seed(seed)
    data = RegressionData(n=64, val_fraction=0.0, batch_size=batch_size, seed=seed)
    module = BackpropModule(hidden=[8], activation="tanh", lr=0.05, **module_kwargs)
    quiet_trainer(max_steps=steps).fit(module, data)
    return [p.detach().clone() for p in module.parameters()]


def test_batch_size_n_is_exactly_full_batch_gradient_descent():
    full = _fit_params(None, 25)
    same = _fit_params(64, 25)
    for a, b in zip(full, same, strict=True):
        assert torch.equal(a, b)


def test_full_batch_training_is_the_plain_gradient_descent_loop():
    """Lightning around the step changes nothing: the same updates as a bare loop with torch.optim.SGD on
    autograd's gradients of the same forward."""
    torch.manual_seed(0)
    data = RegressionData(n=64, val_fraction=0.0)
    module = BackpropModule(hidden=[8], activation="tanh", lr=0.05, momentum=0.5)
    reference = [p.detach().clone().requires_grad_() for p in module.parameters()]
    quiet_trainer(max_steps=30).fit(module, data)

    names = [n for n, _ in module.model.named_parameters()]
    opt = torch.optim.SGD(reference, lr=0.05, momentum=0.5)
    x, y = data.x_train, data.y_train
    for _ in range(30):
        params = dict(zip(names, reference, strict=True))
        hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
        pred = hidden @ params["2.weight"].T + params["2.bias"]
        cost = ((pred - y) ** 2).mean()
        opt.zero_grad()
        cost.backward()
        opt.step()
    for ours, ref in zip(module.parameters(), reference, strict=True):
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_mean_of_minibatch_gradients_is_the_full_gradient():
    data = RegressionData(n=60, val_fraction=0.0, batch_size=15)
    module = BackpropModule(hidden=[5], activation="sigmoid").double()
    x, y = data.x_train.double(), data.y_train.double()

    def grads(xb, yb):
        module.zero_grad(set_to_none=True)
        module.forward_backward(xb, yb)
        return [p.grad.clone() for p in module.parameters()]

    full = grads(x, y)
    batches = [grads(x[i : i + 15], y[i : i + 15]) for i in range(0, 60, 15)]
    for k, g in enumerate(full):
        mean = sum(b[k] for b in batches) / len(batches)
        torch.testing.assert_close(mean, g, rtol=1e-12, atol=1e-14)


def test_global_step_counts_updates_and_the_cost_is_logged_at_each_and_falls(tmp_path):
    data = RegressionData(n=64, val_fraction=0.25, batch_size=16)  # 3 updates an epoch
    module = BackpropModule(hidden=[8], activation="tanh", lr=0.1)
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    trainer = quiet_trainer(max_steps=30, logger=logger)
    trainer.fit(module, data)
    assert trainer.global_step == 30
    assert trainer.current_epoch == 10
    curve = scalars(tmp_path / "run" / "version_0", "train/cost")
    assert [step for step, _ in curve] == list(range(30))
    assert curve[-1][1] < 0.5 * curve[0][1]
    val = scalars(tmp_path / "run" / "version_0", "val/cost")
    assert len(val) == 10 and val[-1][1] < val[0][1]


def test_classification_logs_accuracy_and_learns(tmp_path):
    data = ClassificationData(dataset="blobs", n=300, noise=0.2, batch_size=32)
    module = BackpropModule(
        hidden=[16], activation="relu", loss="cross_entropy", lr=0.2, momentum=0.9, in_features=2, out_features=3
    )
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    quiet_trainer(max_steps=150, logger=logger).fit(module, data)
    accuracy = scalars(tmp_path / "run" / "version_0", "val/accuracy")
    assert accuracy[-1][1] > 0.9
    assert scalars(tmp_path / "run" / "version_0", "train/accuracy")


def test_validate_test_and_predict_steps():
    data = RegressionData(n=40)
    module = BackpropModule(hidden=[4], activation="tanh")
    trainer = quiet_trainer()
    (val,) = trainer.validate(module, data, verbose=False)
    (test,) = trainer.test(module, data, verbose=False)
    assert val["val/cost"] == pytest.approx(module.full_cost(data.x_val, data.y_val), rel=1e-5)
    assert test["test/cost"] == pytest.approx(val["val/cost"], rel=1e-6)  # test uses the held-out split
    preds = torch.cat(trainer.predict(module, data))
    torch.testing.assert_close(preds, module.model.eval()(data.x_train))


def test_eval_passes_keep_no_cache():
    module = BackpropModule(hidden=[4], activation="sigmoid")
    module.eval()
    module(torch.randn(3, 1))
    assert all(getattr(layer, "_cache", None) is None for layer in module.model.modules())


# With manual optimization a step's checkpoint holds the state after its update, which resuming needs, and a
# resumed run writes to a folder of its own: the CLI silences Lightning's warnings about both (trainer/cli.py).
@pytest.mark.filterwarnings("ignore:.*no pre-optimization state was saved.*")
@pytest.mark.filterwarnings("ignore:.*The dirpath has changed from.*")
def test_resume_from_last_checkpoint_continues_where_it_stopped(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, version=None):
        torch.manual_seed(0)
        data = RegressionData(n=48, val_fraction=0.0, batch_size=16)
        module = BackpropModule(hidden=[6], activation="tanh", lr=0.1, momentum=0.9)
        logger = TensorBoardLogger(str(tmp_path), name="r", version=version, default_hp_metric=False)
        ckpt = ModelCheckpoint(save_last=True, every_n_train_steps=1)
        trainer = quiet_trainer(max_steps=max_steps, logger=logger, callbacks=[ckpt], enable_checkpointing=True)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer, module

    straight_trainer, straight = run(24, version="straight")
    _, _ = run(12, version="first")
    last = tmp_path / "r" / "first" / "checkpoints" / "last.ckpt"
    resumed_trainer, resumed = run(24, ckpt_path=str(last), version="second")
    assert resumed_trainer.global_step == 24
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_summary_reports_the_closed_form_for_the_line(tmp_path):
    data = LineData(n=50)
    module = _line_module()
    logger = TensorBoardLogger(str(tmp_path), name="s", default_hp_metric=False)
    summary = Summary(verbose=False)
    quiet_trainer(max_steps=3000, logger=logger, callbacks=[Convergence(), summary]).fit(module, data)
    written = json.loads((tmp_path / "s" / "version_0" / "summary.json").read_text())
    weight, bias = least_squares(data.x_train, data.y_train)
    assert written["optimum"]["slope"] == pytest.approx(weight.item(), rel=1e-9)
    assert written["optimum"]["intercept"] == pytest.approx(bias.item(), rel=1e-9)
    assert written["parameters"]["slope"] == pytest.approx(module.model.linears[0].weight.item())
    assert written["stop_reason"].startswith("converged")
    assert written["steps"] == written["epochs"]  # one update an epoch with the whole dataset
    assert abs(written["gap"]["max_abs_parameter"]) < 1e-3


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lr": 0.0}, "model.lr"),
        ({"lr": float("nan")}, "model.lr"),
        ({"momentum": 1.0}, "model.momentum"),
        ({"weight_decay": -1.0}, "model.weight_decay"),
        ({"hidden": [4, 0]}, r"model.hidden\[1\]"),
        ({"activation": "swish"}, "model.activation = 'swish' is unknown: choose one of identity, relu, sigmoid, tanh"),
        ({"loss": "hinge"}, "model.loss"),
        ({"reduction": "max"}, "model.reduction"),
        ({"hidden": [3], "slope": 1.0}, "model.slope"),
    ],
)
def test_bad_model_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        BackpropModule(**kwargs)


def test_hyperparameters_are_primitive_so_checkpoints_load_with_weights_only(tmp_path):
    module = BackpropModule(hidden=[3, 2], activation="relu", slope=None)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False)
    trainer.fit(module, RegressionData(n=16))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["hidden"] == [3, 2]
    loaded = BackpropModule.load_from_checkpoint(path, weights_only=True)
    for a, b in zip(module.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_convergence_on_minibatches_checks_epoch_means_and_can_be_told_to_check_every_update():
    def run(check):
        data = RegressionData(n=64, val_fraction=0.0, batch_size=8, noise=0.3)
        module = BackpropModule(hidden=[], lr=0.05)
        conv = Convergence(tol=1e-3, patience=3, check=check)
        trainer = quiet_trainer(max_steps=4000, callbacks=[conv])
        trainer.fit(module, data)
        return trainer.global_step

    per_epoch, per_step = run("auto"), run("step")
    assert per_epoch % 8 == 0  # it stops only at an epoch's end
    assert per_step < per_epoch  # noisy per-batch costs look negligible much sooner
    with pytest.raises(ValueError, match="convergence.check"):
        Convergence(check="sometimes")


def test_the_stop_reason_goes_to_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="t", default_hp_metric=False)
    quiet_trainer(max_steps=3000, logger=logger, callbacks=[Convergence(), Summary(verbose=False)]).fit(
        _line_module(), LineData(n=30)
    )
    acc = EventAccumulator(str(tmp_path / "t" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("summary/text_summary")
    assert b"converged" in event.tensor_proto.string_val[0]
