"""The ``trainer`` command: LightningCLI around ``BackpropModule`` and the data modules.

trainer fit --config configs/line.yaml                     train, log to runs/, write summary.json
trainer fit --config configs/line.yaml --model.lr 0.05     any key can be overridden
trainer fit --config configs/line.yaml --ckpt_path last    resume the newest run of this config
trainer validate | test | predict --config … --ckpt_path …
trainer fit --config configs/line.yaml --print_config      the resolved config
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trainer.callbacks import Convergence, Summary
from trainer.data import TensorData
from trainer.module import BackpropModule
from trainer.progress import StepProgressBar

DEFAULT_ROOT = "runs"

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": DEFAULT_ROOT, "name": "handgrad", "default_hp_metric": False},
    },
    "log_every_n_steps": 1,  # every update is a point on the cost curve
    "max_epochs": -1,  # the convergence stop (or max_steps) ends a run, not an epoch count
    "max_steps": 20_000,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


def _quiet_warnings() -> None:
    """Silence Lightning's advice that does not apply to device-resident, index-batched data, and the
    deprecation notices between Lightning and jsonargparse that no user of this command can act on."""
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    for pattern in (
        ".*does not have many workers.*",
        ".*on_step=True.*",
        ".*smaller than the logging interval.*",
        ".*`max_epochs` was not set.*",
        ".*litlogger.*",
        ".*LightningCLI.*subclass_mode.*",
        ".*Starting from v1.9.0, `tensorboardX`.*",
        ".*TensorBoard support.*",
        ".*Total length of .* across ranks is zero.*",
        ".*isinstance.treespec, LeafSpec.*",
        # With manual optimization a step's checkpoint holds the state after its update, which is what
        # resuming needs (global_step counts that update).
        ".*no pre-optimization state was saved.*",
        ".*The dirpath has changed from.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def find_last_checkpoint(save_dir: str | os.PathLike, name: str) -> Path | None:
    """The newest ``last.ckpt`` under ``save_dir/name/version_*/checkpoints``, or None."""
    root = Path(save_dir) / name
    found = [p for p in root.glob("version_*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


class HandgradCLI(LightningCLI):
    """LightningCLI with the convergence stop, a checkpoint callback, the summary and linked widths."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Convergence, "convergence")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(Summary, "summary")
        parser.add_lightning_class_args(StepProgressBar, "progress_bar")
        parser.set_defaults({"progress_bar.refresh_rate": 10})
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")
        parser.link_arguments("data.out_features", "model.out_features", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None or config.get("ckpt_path") != "last":
            return
        logger = config["trainer"].get("logger")
        init = getattr(logger, "init_args", None) or {}
        save_dir = init.get("save_dir", DEFAULT_ROOT) if hasattr(init, "get") else DEFAULT_ROOT
        name = init.get("name", "handgrad") if hasattr(init, "get") else "handgrad"
        found = find_last_checkpoint(save_dir, name)
        if found is None:
            raise SystemExit(
                f"error: --ckpt_path last: no checkpoint under {Path(save_dir) / name}/version_*/checkpoints/; "
                "run `trainer fit` first, or give a checkpoint's path"
            )
        config["ckpt_path"] = str(found)


def make_cli(args: list[str] | None = None, run: bool = True) -> HandgradCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    _quiet_warnings()
    return HandgradCLI(
        BackpropModule,
        TensorData,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The console script ``trainer``."""
    make_cli(args)


if __name__ == "__main__":
    main(sys.argv[1:])
