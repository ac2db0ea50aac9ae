"""The ``trainer`` command: LightningCLI around ``BackpropModule`` and the data modules.

trainer fit --config configs/line.yaml                     train, log to runs/, write summary.json
trainer fit --config configs/line.yaml --model.lr 0.05     any key can be overridden
trainer fit --config configs/line.yaml --ckpt_path last    resume the newest run of this config
trainer validate | test | predict --config … --ckpt_path …
trainer fit --config configs/line.yaml --print_config      the resolved config
trainer check --config configs/line.yaml                   hand-written gradients against autograd and
                                                           finite differences, on the config's model and data
trainer fit --config configs/line.yaml --debug             full tracebacks (also HANDGRAD_DEBUG=1)

Bad input — a setting, a data file, a checkpoint, a device — is one line on stderr (`error: …`, naming the
key, file, row, column or value and what to do instead) and exit 2, before anything is written. A run that
diverges, or fails the live gradient check, exits 1; Ctrl-C saves a checkpoint and exits 130. See
``trainer.errors``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trainer.allocator import retain_freed_memory
from trainer.callbacks import Checkpoint, Convergence, Summary
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.data import TensorData
from trainer.errors import EXIT_INTERRUPTED, CheckpointError, debug_requested, describe
from trainer.figures import Figures
from trainer.guards import fault_callbacks
from trainer.live_gradcheck import GradientCheck, GradientCheckError
from trainer.module import BackpropModule
from trainer.monitor import Histograms, Monitor
from trainer.preflight import check_checkpoint_matches, check_devices, load_checkpoint
from trainer.progress import StepProgressBar

DEFAULT_ROOT = "runs"

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # max_queue: the event writer's thread takes events in bursts instead of one handoff per point
        # (with its default of 10, logging the cost of a tiny model's update costs more than the update).
        "init_args": {"save_dir": DEFAULT_ROOT, "name": "handgrad", "default_hp_metric": False, "max_queue": 1000},
    },
    "log_every_n_steps": 1,  # every update is a point on the cost curve
    "max_epochs": -1,  # the convergence stop (or max_steps) ends a run, not an epoch count
    "max_steps": 20_000,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    # Our IndexBatches shard each epoch's order per rank themselves (trainer/data.py); Lightning would only
    # touch torch DataLoaders anyway, and this makes sure no DistributedSampler reshuffles behind them.
    "use_distributed_sampler": False,
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
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
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
        parser.add_lightning_class_args(Monitor, "monitor")
        parser.add_lightning_class_args(GradientCheck, "gradcheck")
        parser.add_lightning_class_args(Histograms, "histograms")
        parser.add_lightning_class_args(Figures, "figures")
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")
        parser.link_arguments("data.out_features", "model.out_features", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Resolve and check ``--ckpt_path`` before anything is built or written.

        ``last`` becomes the newest ``last.ckpt`` of this config's runs. The file must load with
        ``weights_only=True``: tensors and plain values only, so a pickle that would run code is refused
        unread. Unlike LightningCLI's default, the checkpoint's hyperparameters do not replace the config
        (a ``--model.lr`` given with ``--ckpt_path`` would be lost): the config must build the model the
        checkpoint holds, which ``after_instantiate_classes`` checks.
        """
        self.checkpoint: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        if config.get("weights_only") is False:
            raise CheckpointError(
                "--weights_only false is refused: a handgrad checkpoint holds only tensors and plain values, and "
                "loading anything more would let the file run code; leave --weights_only out"
            )
        if config["ckpt_path"] == "last":
            config["ckpt_path"] = str(self._last_checkpoint(config))
        self.checkpoint = load_checkpoint(config["ckpt_path"])

    @staticmethod
    def _last_checkpoint(config) -> Path:
        logger = config["trainer"].get("logger")
        init = getattr(logger, "init_args", None) or {}
        save_dir = init.get("save_dir", DEFAULT_ROOT) if hasattr(init, "get") else DEFAULT_ROOT
        name = init.get("name", "handgrad") if hasattr(init, "get") else "handgrad"
        found = find_last_checkpoint(save_dir, name)
        if found is None:
            raise CheckpointError(
                f"--ckpt_path last: no checkpoint under {Path(save_dir) / name}/version_*/checkpoints/; "
                "run `trainer fit` first, or give a checkpoint's path"
            )
        return found

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None:
            check_devices(config["trainer"].get("accelerator"), config["trainer"].get("devices"))

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make every save atomic
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.checkpoint is not None:
            check_checkpoint_matches(
                self.checkpoint,
                self.config[self.subcommand]["ckpt_path"],
                self.model.state_dict(),
                dict(self.model.hparams),
                resume=self.subcommand == "fit",
            )
            self.config_init[self.subcommand]["weights_only"] = True
            self.checkpoint = None  # Lightning loads it again; keep one copy in memory, not two


def make_cli(args: list[str] | None = None, run: bool = True) -> HandgradCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    _quiet_warnings()
    retain_freed_memory()  # each update's buffers stay in the process (trainer/allocator.py)
    return HandgradCLI(
        BackpropModule,
        TensorData,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": fault_callbacks()},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "trainer"},  # not __main__.py under python -m trainer
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The console script ``trainer``: bad input is one line on stderr and exit 2, never a traceback.

    Exit codes are listed in ``trainer.errors``; ``--debug`` (or ``HANDGRAD_DEBUG=1``) shows tracebacks.
    """
    debug, argv = debug_requested(list(sys.argv[1:] if args is None else args))
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself, and warns when given both
    try:
        if argv[:1] == ["check"]:
            from trainer.check import run_check

            sys.exit(run_check(argv[1:]))
        make_cli(None if args is None else argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted outside a training step: no checkpoint was saved", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except GradientCheckError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        found = None if debug else describe(exc)
        if found is None:
            raise
        code, message = found
        print(message if code == EXIT_INTERRUPTED else f"error: {message}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
