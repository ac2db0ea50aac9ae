"""Run the trainer in-process or as a command, and read what it wrote to TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--progress_bar.refresh_rate", "0", "--summary.verbose", "false"]


def fit(config: str, save_dir: Path, *overrides: str) -> Path:
    """``trainer fit --config configs/<config>`` in this process; returns the run's version folder."""
    run_main(
        [
            "fit",
            "--config",
            str(ROOT / config),
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            *QUIET,
            *overrides,
        ]
    )
    return newest_run(save_dir)


def run_main(args: list[str]) -> None:
    """``trainer.cli.main(args)``, without LightningCLI's note that pytest's own argv is also set."""
    from trainer.cli import main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        main(args)


def built(config: str, save_dir: Path, *overrides: str):
    """(model, data module) exactly as ``trainer fit --config`` builds them (same seed, overrides), untrained."""
    from trainer.cli import make_cli

    args = ["--config", str(ROOT / config), "--trainer.logger.init_args.save_dir", str(save_dir), *QUIET, *overrides]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = make_cli(args, run=False)
    return cli.model, cli.datamodule


def newest_run(save_dir: Path) -> Path:
    runs = sorted(Path(save_dir).glob("*/version_*"), key=lambda p: p.stat().st_mtime_ns)
    assert runs, f"no run under {save_dir}"
    return runs[-1]


def command(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS`` in a subprocess with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def events(run: Path) -> EventAccumulator:
    """Every event of the run, nothing sampled away."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    """step → value of a scalar tag."""
    return {e.step: e.value for e in acc.Scalars(tag)}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())
