"""Lightning's DDP without torch's DistributedDataParallel wrapper: the gradient all-reduce is ours.

Lightning's ``DDPStrategy`` wraps the LightningModule in ``torch.nn.parallel.DistributedDataParallel``,
whose reducer all-reduces gradients from autograd hooks. Our gradients are written by hand under
``torch.no_grad()``, so those hooks never fire, and with manual optimization Lightning even switches the
reducer off around every forward. The wrapper would still allocate gradient buckets as large as the
parameters, broadcast any buffers before every forward, and accept options (``find_unused_parameters``,
``static_graph``, comm hooks) that could not act. So ``HandgradDDPStrategy`` keeps the process group,
the launchers, the cluster environments (torchrun, SLURM, …) and rank-0 checkpointing of ``DDPStrategy``,
and replaces the wrapping with one broadcast of rank 0's parameters, so every rank starts from the same
point. ``BackpropModule.sync_gradients`` does the one all-reduce per step.

Importing this module registers the class under Lightning's own names ``ddp``, ``ddp_spawn``,
``ddp_fork`` and ``ddp_notebook``, so ``--trainer.strategy ddp`` picks it. (The
``ddp_*_find_unused_parameters_*`` names keep Lightning's wrapper, which is inert here and still correct.)
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

# Lightning's names for DDP and the way each one starts its processes.
START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}

# DDPStrategy arguments that configure the DistributedDataParallel wrapper or its reducer.
_WRAPPER_ARGUMENTS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class HandgradDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for hand-written gradients: the same processes and ranks, no DDP wrapper.

    Args: those of ``DDPStrategy`` (``accelerator``, ``parallel_devices``, ``cluster_environment``,
    ``checkpoint_io``, ``precision_plugin``, ``process_group_backend``, ``timeout``, ``start_method``).

    Raises:
        ValueError: for an option of the DistributedDataParallel wrapper or its reducer (comm hooks,
            model averaging, ``find_unused_parameters``, ``static_graph``, …): there is no wrapper here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wrapper = [key for key in _WRAPPER_ARGUMENTS if kwargs.get(key) is not None]
        super().__init__(*args, **kwargs)
        wrapper += sorted(self._ddp_kwargs)  # what DDPStrategy would pass on to DistributedDataParallel
        if wrapper:
            raise ValueError(
                f"trainer.strategy: {', '.join(wrapper)} configure(s) torch's DistributedDataParallel wrapper, "
                "which handgrad does not use (its gradients are hand-written and all-reduced by "
                "BackpropModule.sync_gradients); remove the option"
            )

    def teardown(self) -> None:
        """Lightning's teardown; then, in a process that ``ddp_spawn`` (or fork) started, the process group's
        end: that process exits next, and a gloo group still alive then may abort it at exit ("terminate
        called without an active exception", SIGABRT, seen in about one run in six). All ranks meet in a
        barrier first, so none leaves while another still talks to it."""
        super().teardown()
        spawned = self._start_method in ("spawn", "fork", "forkserver")
        if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def configure_ddp(self) -> None:
        """Instead of wrapping: every rank takes rank 0's parameters (and buffers), once, before the first step."""
        _sync_module_states(self.model)


def register_strategies() -> None:
    """Point Lightning's ``ddp`` names at ``HandgradDDPStrategy`` (idempotent)."""
    for name, start_method in START_METHODS.items():
        StrategyRegistry.register(
            name,
            HandgradDDPStrategy,
            description=f"DDP for hand-written gradients (no DistributedDataParallel wrapper), start '{start_method}'",
            override=True,
            start_method=start_method,
        )


register_strategies()

__all__ = ["HandgradDDPStrategy", "register_strategies"]
