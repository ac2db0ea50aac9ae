"""Every config in configs/ opens with the command that runs it, and trains for a few steps."""

from __future__ import annotations

import json

import pytest
from _util import ROOT

from trainer.cli import make_cli

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"line", "chain", "mlp_regression", "mlp_classification", "csv"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_opens_with_its_command(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# trainer ") and f"configs/{config.name}" in first


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_a_few_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["trainer"])
    args = ["fit", "--config", str(config), "--trainer.max_steps", "5", "--progress_bar.refresh_rate", "0"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--summary.verbose", "false"]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    cli = make_cli(args)
    assert cli.trainer.global_step == 5
    (summary,) = tmp_path.glob("*/version_0/summary.json")
    assert json.loads(summary.read_text())["final_train_cost"] is not None
