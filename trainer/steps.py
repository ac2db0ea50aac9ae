"""Several updates per ``training_step`` call, for models so small that the loop costs more than the math.

Like Keras's ``steps_per_execution``: with ``model.steps_per_call: k`` the data module hands each
``training_step`` call the next k batches at once (a ``StepGroup``), and the step makes one update per
batch. The updates, their order and their batches are exactly those of k = 1; what changes is that
Lightning's per-call work (hooks, progress, logging bookkeeping) is paid once per k updates.

What stays the same:
- ``trainer.global_step`` counts updates: each ``optimizer.step()`` call counts one, as always.
- ``train/cost`` is logged at every update, at the same step as with k = 1; the k costs of a call stay
  on the device and are written in one go at the end of the call (one host sync per k updates).
- The convergence callback sees every update's cost (``outputs["costs"]``).
- ``trainer.max_steps`` is never overshot: the last call makes only the updates that are left.

What an epoch is:
- With mini-batches, a call never crosses the end of an epoch: an epoch of M batches is ⌈M / k⌉ calls,
  the last one shorter, so validation, the epoch's mean cost and shuffling happen as with k = 1.
- With the whole training set as the batch (gradient descent, M = 1), every epoch is the same single
  update, so a call makes k of them: one of Lightning's epochs (one call) is then k passes over the
  data, and validation runs every k updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch import Tensor


class StepGroup:
    """The batches of one ``training_step`` call, one (x, y) per update.

    Deliberately not a list or tuple: Lightning leaves it as it is instead of walking it to move each
    tensor to the device (they are there already: the data modules keep their data on the device).
    """

    __slots__ = ("batches",)

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)

    def __repr__(self) -> str:
        return f"StepGroup({len(self.batches)} batches)"


class StepGroups:
    """Groups the batches of an epoch iterable (``IndexBatches``) k at a time: one group per call.

    Args:
        batches: yields the batches of one epoch per ``iter()``, has ``len()`` and, for resuming,
            ``state_dict()`` / ``load_state_dict()``.
        steps_per_call: k ≥ 1, the updates per call.
    """

    def __init__(self, batches: Any, steps_per_call: int) -> None:
        if not isinstance(steps_per_call, int) or isinstance(steps_per_call, bool) or steps_per_call < 1:
            raise ValueError(f"steps_per_call = {steps_per_call!r} is invalid: use an integer ≥ 1")
        self.batches = batches
        self.steps_per_call = steps_per_call

    @property
    def full_batch(self) -> bool:
        """One batch per epoch: the whole training set each update."""
        return len(self.batches) == 1

    def __len__(self) -> int:
        m = len(self.batches)
        return 1 if m == 1 else math.ceil(m / self.steps_per_call)

    def __iter__(self) -> Iterator[StepGroup]:
        if self.full_batch:
            # Every epoch is the same one batch: k epochs of gradient descent make one call.
            k = self.steps_per_call
            if hasattr(self.batches, "repeat_epochs"):
                yield StepGroup([self.batches.repeat_epochs(k)] * k)  # one look-up for the k equal batches
            else:
                yield StepGroup([next(iter(self.batches)) for _ in range(k)])
            return
        epoch = iter(self.batches)
        while group := list(islice(epoch, self.steps_per_call)):
            yield StepGroup(group)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


__all__ = ["StepGroup", "StepGroups"]
