"""Admission to a model's running slots: high before medium before low, with aging.

Each model has `max_concurrency` slots. A request that finds them all taken waits in
its model's `SlotQueue`; when a slot frees, the waiter with the best *effective*
priority goes next, and among equals the one that came first (FIFO within a level).
Waiting raises a request's effective priority one level per `aging` seconds, so a
`low` request competes as `high` after 2 x aging and is then ahead of every request
that came after it: low never starves.

The queue lives on the event loop and is changed only between awaits (no locks).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .errors import BadRequest, brief

DEFAULT_AGING = 30.0  # seconds of waiting that raise a request one priority level
PRIORITY_HEADER = "X-Request-Priority"


class Priority(IntEnum):
    """Lower values are admitted first."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2

    @property
    def label(self) -> str:
        return self.name.lower()


DEFAULT_PRIORITY = Priority.MEDIUM
PRIORITY_NAMES = tuple(p.label for p in Priority)


def parse_priority(value: Any, *, param: str = "priority") -> Priority:
    """`high`, `medium` or `low` (any case); a 400 naming `param` and the value otherwise."""
    if isinstance(value, str) and value.strip().lower() in PRIORITY_NAMES:
        return Priority[value.strip().upper()]
    raise BadRequest(f"'{param}' must be one of {', '.join(PRIORITY_NAMES)}, got {brief(value)}", param=param)


def effective_priority(priority: Priority, since: float, now: float, aging: float) -> int:
    """The level a request competes at after waiting since `since`: one level up per
    `aging` seconds (0 = high). Slot queues and the memory queue order by it."""
    return max(0, int(priority) - math.floor((now - since) / aging))


@dataclass(frozen=True, slots=True)
class Granted:
    """A slot was taken: how long the request waited for it, and at which priority."""

    priority: Priority
    waited: float


@dataclass(slots=True)
class _Waiter:
    priority: Priority
    since: float
    order: int  # arrival order: breaks ties between equal times
    granted: asyncio.Future


class SlotQueue:
    """`capacity` running slots and the requests waiting for one."""

    def __init__(self, capacity: int, *, aging: float = DEFAULT_AGING, clock: Callable[[], float]):
        if capacity < 1 or aging <= 0:
            raise ValueError("capacity must be at least 1 and aging positive")
        self.capacity = capacity
        self.aging = aging
        self.running = 0
        self._clock = clock
        self._waiters: list[_Waiter] = []
        self._arrivals = itertools.count()

    def waiting(self) -> dict[Priority, int]:
        """Waiting requests by the priority they asked for (aging does not move them here)."""
        counts = dict.fromkeys(Priority, 0)
        for w in self._waiters:
            counts[w.priority] += 1
        return counts

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """A new request would wait."""
        return self.running >= self.capacity or bool(self._waiters)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited so far; 0 when none waits."""
        now = self._clock()
        return max((now - w.since for w in self._waiters), default=0.0)

    def effective(self, priority: Priority, since: float, now: float) -> int:
        """The level a request competes at after waiting since `since` (0 = high)."""
        return effective_priority(priority, since, now, self.aging)

    async def acquire(self, priority: Priority, timeout: float) -> Granted:
        """Take a slot, waiting up to `timeout` seconds; TimeoutError when none came."""
        if not self.full:
            self.running += 1
            return Granted(priority, 0.0)
        waiter = _Waiter(priority, self._clock(), next(self._arrivals), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that races a grant
            async with asyncio.timeout(max(0.0, timeout)):
                await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release()  # granted as it gave up: the slot goes to the next one
            else:
                waiter.granted.cancel()
                if waiter in self._waiters:  # a release may have dropped it already
                    self._waiters.remove(waiter)
            raise
        return Granted(priority, self._clock() - waiter.since)

    def release(self) -> None:
        """A running request ended: its slot goes to the next waiter, if any."""
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the best waiters. A waiter whose task was cancelled has its
        future cancelled at once but leaves the list only when that task runs: it is skipped
        here, or its slot would be taken by nobody, for good."""
        now = self._clock()
        while self.running < self.capacity and self._waiters:
            waiter = min(self._waiters, key=lambda w: (self.effective(w.priority, w.since, now), w.since, w.order))
            self._waiters.remove(waiter)
            if waiter.granted.done():
                continue
            self.running += 1
            waiter.granted.set_result(None)
