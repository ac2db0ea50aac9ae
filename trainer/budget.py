"""When optional work (a figure, a histogram) may run: every so many updates, and within a share of the time.

With the whole dataset a step, an epoch is a single update that may take a millisecond, so "every few
epochs" cannot be counted in epochs. A ``TimeBudget`` counts in updates and in seconds instead: the work
runs at most every ``every_n_steps`` updates, and only while the time it has taken so far, plus what it
took last time, stays within ``max_overhead`` of the time training has run. Before any piece has run, the
next is assumed to take ``first_cost`` seconds: with 0 the first runs at once and its cost is then paid
back before the next; with an estimate, it waits until training has run long enough to pay for it. The
overhead therefore stays below ``max_overhead`` of a run, apart from a first piece run at once and the
work done once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from trainer.module import ConfigError


class TimeBudget:
    """Meter optional work by update count and by its share of wall time.

    Args:
        every_n_steps: at most once per this many updates; 0 turns the work off.
        max_overhead: the share of training time the work may take, in (0, 1].
        key: the config key prefix for error messages, e.g. ``figures``.
        clock: seconds, monotonic (a fake one in tests).
        first_cost: the seconds a piece is assumed to take until one has been timed.

    Raises:
        ConfigError: for a negative ``every_n_steps`` or a ``max_overhead`` outside (0, 1].
    """

    def __init__(
        self,
        every_n_steps: int,
        max_overhead: float,
        key: str = "budget",
        clock: Callable[[], float] = time.perf_counter,
        first_cost: float = 0.0,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(
                f"{key}.every_n_steps = {every_n_steps!r} is invalid: use an integer ≥ 0 (0 turns it off)"
            )
        if not 0.0 < max_overhead <= 1.0:
            raise ConfigError(f"{key}.max_overhead = {max_overhead!r} is invalid: use a share of the time in (0, 1]")
        self.every_n_steps, self.max_overhead, self.clock = every_n_steps, max_overhead, clock
        self.first_cost = first_cost
        self.start()

    def start(self) -> None:
        """Start the clock (at the start of training) and forget any earlier work."""
        self.started = self.clock()
        self.spent = 0.0  # seconds taken by the work so far
        self.last_cost = self.first_cost  # seconds the last piece took: the estimate of the next
        self.last_step: int | None = None
        self.count = 0

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def due(self, step: int) -> bool:
        """Whether the work may run at update ``step``."""
        if not self.enabled:
            return False
        if self.last_step is not None and step - self.last_step < self.every_n_steps:
            return False
        return self.affordable()

    def affordable(self) -> bool:
        """Whether the time spent so far leaves room for another piece (``due`` without the step count)."""
        return self.spent + self.last_cost <= self.max_overhead * (self.clock() - self.started)

    @contextmanager
    def timed(self, step: int) -> Iterator[None]:
        """Time a piece of work done at update ``step`` and charge it to the budget."""
        begin = self.clock()
        try:
            yield
        finally:
            self.last_cost = self.clock() - begin
            self.spent += self.last_cost
            self.last_step = step
            self.count += 1
