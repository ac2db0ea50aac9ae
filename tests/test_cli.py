"""The ``trainer`` command end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import yaml
from _util import ROOT, run_cli, scalars

QUIET = ("--progress_bar.refresh_rate", "0")


def _fit(tmp_path, *extra):
    result = run_cli(
        "fit", "--config", "configs/line.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path), *QUIET, *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fit_writes_events_config_checkpoint_and_summary_without_warnings(tmp_path):
    result = _fit(tmp_path)
    run = tmp_path / "line" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"].startswith("converged")
    assert abs(summary["gap"]["max_abs_parameter"]) < 1e-3
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"] == 0.01
    assert len(scalars(run, "train/cost")) == summary["steps"]
    assert "stop reason" in result.stdout and "closed form" in result.stdout
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr


def test_each_run_gets_its_own_version_and_last_resumes_the_newest(tmp_path):
    _fit(tmp_path, "--trainer.max_steps", "40", "--convergence.tol", "0")
    first = json.loads((tmp_path / "line" / "version_0" / "summary.json").read_text())
    assert first["steps"] == 40
    _fit(tmp_path, "--trainer.max_steps", "70", "--convergence.tol", "0", "--ckpt_path", "last")
    second = json.loads((tmp_path / "line" / "version_1" / "summary.json").read_text())
    assert second["steps"] == 70
    assert json.loads((tmp_path / "line" / "version_0" / "summary.json").read_text()) == first  # untouched
    steps = [s for s, _ in scalars(tmp_path / "line" / "version_1", "train/cost")]
    assert steps[0] == 40 and steps[-1] == 69


def test_ckpt_path_last_without_a_run_says_so(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        "configs/line.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--ckpt_path",
        "last",
    )
    assert result.returncode != 0
    assert "no checkpoint under" in result.stderr
    assert "Traceback" not in result.stderr


def test_swap_in_a_csv_from_the_command_line(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("x,y\n0.5,1.4\n2.3,1.9\n2.9,3.2\n")
    _fit(tmp_path, "--data", "CSVData", "--data.path", str(csv), "--data.targets", "[y]", "--data.val_fraction", "0")
    summary = json.loads((tmp_path / "line" / "version_0" / "summary.json").read_text())
    assert summary["optimum"]["slope"] - summary["parameters"]["slope"] < 1e-3


def test_print_config_shows_the_resolved_keys():
    result = run_cli("fit", "--config", "configs/line.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["hidden"] == []
    assert config["trainer"]["log_every_n_steps"] == 1
    assert config["convergence"]["tol"] > 0
    assert config["checkpoint"]["save_last"] is True


def test_validate_test_and_predict_from_a_checkpoint(tmp_path):
    _fit(tmp_path, "--trainer.max_steps", "30")
    ckpt = str(tmp_path / "line" / "version_0" / "checkpoints" / "last.ckpt")
    for sub in ("validate", "test", "predict"):
        args = (sub, "--config", "configs/line.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path))
        result = run_cli(*args, "--ckpt_path", ckpt, *QUIET)
        assert result.returncode == 0, (sub, result.stderr[-2000:])


def test_console_script_and_module_entry_points():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "trainer"]
    assert script.value == "trainer.cli:main"
    assert (ROOT / "trainer" / "__main__.py").is_file()
    result = run_cli("--help")
    assert result.returncode == 0 and "fit" in result.stdout and "predict" in result.stdout


def test_lightning_early_stopping_can_be_added_from_yaml(tmp_path):
    config = tmp_path / "early.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args:\n        monitor: val/cost\n        patience: 2\n        min_delta: 0.01\n"
    )
    result = _fit(
        tmp_path,
        "--config",
        str(config),
        "--data.val_fraction",
        "0.3",
        "--convergence.tol",
        "0",
        "--trainer.max_steps",
        "5000",
    )
    summary = json.loads((tmp_path / "line" / "version_0" / "summary.json").read_text())
    assert summary["steps"] < 5000, result.stdout[-1000:]
    assert summary["stop_reason"].startswith("early stopping: val/cost")
