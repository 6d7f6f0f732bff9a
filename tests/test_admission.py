"""The admission queue: priority order, FIFO within a level, aging, and no leaked slots."""

from __future__ import annotations

import asyncio

import pytest

from mlx_server.admission import Priority, SlotQueue, parse_priority
from mlx_server.errors import BadRequest

HIGH, MEDIUM, LOW = Priority.HIGH, Priority.MEDIUM, Priority.LOW


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Run:
    """Requests against one SlotQueue, recording the order in which they got their slot."""

    def __init__(self, capacity: int = 1, aging: float = 30.0):
        self.clock = Clock()
        self.queue = SlotQueue(capacity, aging=aging, clock=self.clock)
        self.served: list[str] = []
        self.tasks: list[asyncio.Task] = []

    async def take(self, name: str, priority: Priority, timeout: float = 5.0) -> None:
        granted = await self.queue.acquire(priority, timeout)
        self.served.append(name)
        assert granted.priority is priority

    async def arrive(self, name: str, priority: Priority) -> None:
        self.tasks.append(asyncio.create_task(self.take(name, priority)))
        await settle()

    async def release_all(self) -> None:
        """Free one slot at a time, letting the next waiter in, until nobody waits."""
        while len(self.queue):
            self.queue.release()
            await settle()
        await asyncio.gather(*self.tasks)


async def test_a_free_slot_is_taken_at_once():
    run = Run(capacity=2)
    await run.take("a", LOW)
    await run.take("b", LOW)
    assert run.queue.running == 2 and run.queue.full and len(run.queue) == 0


async def test_high_goes_before_waiting_lows_and_fifo_within_a_level():
    run = Run()
    await run.take("holder", LOW)
    for i in range(5):
        await run.arrive(f"low{i}", LOW)
    await run.arrive("medium", MEDIUM)
    await run.arrive("high0", HIGH)
    await run.arrive("high1", HIGH)
    assert run.queue.waiting() == {HIGH: 2, MEDIUM: 1, LOW: 5}
    await run.release_all()
    assert run.served == ["holder", "high0", "high1", "medium", "low0", "low1", "low2", "low3", "low4"]


async def test_a_new_request_never_jumps_ahead_of_waiters_when_a_slot_frees():
    run = Run()
    await run.take("holder", MEDIUM)
    await run.arrive("waiting", LOW)
    run.queue.release()  # the slot goes straight to the waiter...
    await run.arrive("late-high", HIGH)  # ...so a later arrival waits, high or not
    assert run.served == ["holder", "waiting"] and run.queue.waiting()[HIGH] == 1
    await run.release_all()


async def test_aging_raises_a_low_one_level_per_step_so_it_never_starves():
    run = Run(aging=30.0)
    await run.take("holder", HIGH)
    await run.arrive("old-low", LOW)
    run.clock.now += 31  # one step: old-low competes as medium
    await run.arrive("medium", MEDIUM)
    await run.arrive("high", HIGH)
    assert run.queue.effective(LOW, run.clock.now - 31, run.clock.now) == int(MEDIUM)
    run.clock.now += 30  # two steps: old-low competes as high, ahead of every later arrival
    await run.arrive("late-high", HIGH)
    await run.release_all()
    assert run.served == ["holder", "old-low", "medium", "high", "late-high"]  # medium aged to high too


async def test_before_the_aging_step_a_waiting_low_stays_behind_a_later_high():
    run = Run(aging=30.0)
    await run.take("holder", HIGH)
    await run.arrive("low", LOW)
    run.clock.now += 29
    await run.arrive("high", HIGH)
    await run.release_all()
    assert run.served == ["holder", "high", "low"]


async def test_a_timed_out_waiter_leaves_the_queue_and_holds_no_slot():
    run = Run()
    await run.take("holder", LOW)
    with pytest.raises(TimeoutError):
        await run.queue.acquire(HIGH, 0.01)
    assert len(run.queue) == 0 and run.queue.running == 1
    run.queue.release()
    assert run.queue.running == 0 and not run.queue.full


async def test_a_cancelled_waiter_leaves_the_queue():
    run = Run()
    await run.take("holder", LOW)
    await run.arrive("gone", HIGH)
    run.tasks.pop().cancel()
    await settle()
    assert len(run.queue) == 0
    await run.arrive("next", LOW)
    await run.release_all()
    assert run.served == ["holder", "next"]


async def test_a_waiter_granted_as_it_is_cancelled_passes_the_slot_on():
    run = Run()
    await run.take("holder", LOW)
    await run.arrive("granted-then-gone", HIGH)
    await run.arrive("next", LOW)
    gone = run.tasks.pop(0)
    run.queue.release()  # grants "granted-then-gone" ...
    gone.cancel()  # ... which is cancelled before it runs again
    await settle()
    assert run.served == ["holder", "next"] and run.queue.running == 1 and len(run.queue) == 0
    await asyncio.gather(*run.tasks)


async def test_a_waiter_cancelled_before_a_release_is_not_granted():
    """Cancel, then a release in the same loop turn (a client gone as another request ends):
    the cancelled waiter's future is already cancelled but it is still listed; it must not
    take the slot, or the slot leaks for good."""
    run = Run()
    await run.take("holder", LOW)
    await run.arrive("gone", HIGH)
    gone = run.tasks.pop()
    gone.cancel()
    run.queue.release()  # before "gone" runs and removes itself
    await settle()
    assert gone.cancelled()
    assert run.queue.running == 0 and len(run.queue) == 0 and not run.queue.full
    await run.arrive("next", LOW)
    await asyncio.gather(*run.tasks)
    assert run.served == ["holder", "next"] and run.queue.running == 1
    run.queue.release()
    assert run.queue.running == 0


async def test_a_manager_lease_cancelled_as_another_ends_leaves_the_model_evictable():
    """Through the manager at max_concurrency 1: the waiter's cancel and the holder's end in
    one loop turn leave no slot taken, so keep_alive is armed and the model can go."""
    from test_manager import hold, make

    manager, _ = make([{"name": "a", "max_concurrency": 1, "keep_alive": "5m"}])
    running, release = await hold(manager, "a")

    async def waiter() -> None:
        async with manager.lease("a"):
            pass

    queued = asyncio.create_task(waiter())
    await settle()
    release.set()  # the holder runs first and releases its slot ...
    queued.cancel()  # ... while the waiter, cancelled, has not run yet
    results = await asyncio.gather(running, queued, return_exceptions=True)
    assert results[0] is None and isinstance(results[1], asyncio.CancelledError)
    await settle()
    record = manager._records["a:latest"]
    assert record.slots.running == 0 and len(record.slots) == 0 and record.leases == 0
    assert not record.protected and record.expires_at is not None
    assert await manager.unload("a") == "unloaded"


def test_priority_names_parse_in_any_case_and_bad_ones_are_named():
    assert parse_priority("HIGH") is HIGH and parse_priority(" low ") is LOW and parse_priority("medium") is MEDIUM
    for bad in ("urgent", "", 1, None):
        with pytest.raises(BadRequest, match="'X-Request-Priority' must be one of high, medium, low") as e:
            parse_priority(bad, param="X-Request-Priority")
        assert e.value.param == "X-Request-Priority"


# --- through the manager: leases, the model's default priority, loads -------------------------


async def test_manager_leases_admit_by_priority_and_the_models_default():
    from test_manager import hold, make

    manager, _ = make([{"name": "a", "max_concurrency": 1, "priority": "high"}])
    running, release = await hold(manager, "a")
    served: list[str] = []

    async def request(name: str, priority: Priority | None) -> None:
        async with manager.lease("a", priority=priority):
            served.append(name)

    tasks = []
    for name, priority in (("low", LOW), ("medium", MEDIUM), ("default-high", None), ("high", HIGH)):
        tasks.append(asyncio.create_task(request(name, priority)))
        await settle()
    (queue,) = manager.queue_snapshot()
    assert queue.waiting == {HIGH: 2, MEDIUM: 1, LOW: 1} and queue.running == 1 and manager.queue_depth() == 4
    release.set()
    await asyncio.gather(running, *tasks)
    assert served == ["default-high", "high", "medium", "low"]
    assert manager.queue_depth() == 0


async def test_a_high_request_never_waits_behind_another_models_load():
    """b loads for a low request (its load gated); a high request for ready a goes at once."""
    from test_manager import make, state, use

    from mlx_server.manager import ModelState

    manager, backend = make([{"name": "a"}, {"name": "b"}])
    await use(manager, "a")
    backend.gates["b:latest"] = asyncio.Event()
    loading = asyncio.create_task(use(manager, "b", priority=LOW))
    await settle()
    assert state(manager, "b") is ModelState.LOADING
    await asyncio.wait_for(use(manager, "a", priority=HIGH), 0.5)
    (_, b) = manager.queue_snapshot()
    assert b.waiting_for_load == {HIGH: 0, MEDIUM: 0, LOW: 1}
    backend.gates["b:latest"].set()
    await loading
