"""The memory queue (issue 26): a model's own prompt cache gives way, a batch reserves its
padded rows, two models waiting for each other's memory are both served, and memory waits
go by priority. A fake backend, a real clock (waits are bounded by queue_timeout)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_manager import MiB, hold_kv, line, make_kv, state, use

from mlx_server.admission import Priority
from mlx_server.errors import InsufficientMemory
from mlx_server.manager import ModelState


def with_prompt_caches(manager, held: dict[str, int]) -> list[int]:
    """The engine's side: each model's prompt cache in `held`, given back on request."""
    asked: list[int] = []

    async def shrink(nbytes: int) -> int:
        asked.append(nbytes)
        freed = 0
        for name in held:
            take = min(held[name], nbytes - freed)
            held[name] -= take
            freed += take
        return freed

    manager._cache_bytes = lambda name: held.get(name, 0)
    manager._shrink_caches = shrink
    return asked


async def test_a_models_own_prompt_cache_gives_way_to_its_next_request():
    """Before: the cache counted in `used`, nothing shrank it while the request waited, so
    every request without a limit after the first waited queue_timeout and got a 503."""
    manager, backend = make_kv([{"name": "a"}], budget_mb=10, clock=time.monotonic, server={"queue_timeout": 1})
    held = {"a:latest": 0}
    asked = with_prompt_caches(manager, held)
    async with manager.lease("a") as lease:
        assert await manager.reserve(lease, 100, 5000, flexible=True) == 1536 - 100  # 6 MiB beside 4 of weights
    held["a:latest"] = 3 * MiB  # what the engine kept of that request
    async with manager.lease("a") as lease:
        allowed = await asyncio.wait_for(manager.reserve(lease, 100, 5000, flexible=True), 0.5)
    assert allowed == 1436 and asked == [3 * MiB] and held["a:latest"] == 0
    assert manager.waits["memory"] == 0 and not backend.unloads  # given at once: no wait


async def test_prompt_caches_are_asked_for_only_what_is_missing():
    manager, backend = make_kv([{"name": "a"}], budget_mb=10, clock=time.monotonic, server={"queue_timeout": 1})
    held = {"a:latest": 3 * MiB}
    asked = with_prompt_caches(manager, held)
    async with manager.lease("a") as lease:
        await asyncio.wait_for(manager.reserve(lease, 100, 924, flexible=False), 0.5)  # 4 MiB: 1 short
    assert asked == [1 * MiB] and held["a:latest"] == 2 * MiB


async def test_a_short_request_beside_a_long_one_reserves_the_padded_row():
    """A batch cache pads every row to the longest: a 128-token request joining a
    2,048-token one allocates 2 x 2,048 tokens. Before: it reserved 128 and ran."""
    manager, backend = make_kv([{"name": "a", "max_concurrency": 4}], budget_mb=13, clock=time.monotonic, server={"queue_timeout": 5})
    long, release_long, _ = await hold_kv(manager, "a", 100, 1948)  # 8 MiB
    short, release_short, granted = await hold_kv(manager, "a", 100, 28)  # own row 1 MiB; padded 8
    await asyncio.sleep(0.1)
    assert not granted.done() and line(manager, "a").kv_reserved == 8 * MiB
    release_long.set()
    assert await asyncio.wait_for(granted, 1) == 28
    assert line(manager, "a").kv_reserved == 1 * MiB
    release_short.set()
    await asyncio.gather(long, short)
    assert line(manager, "a").kv_reserved == 0


async def test_rows_of_a_batch_are_reserved_at_the_longest_context():
    manager, backend = make_kv([{"name": "a", "max_concurrency": 4}], budget_mb=64)
    first, release_first, _ = await hold_kv(manager, "a", 100, 412)  # 512 tokens: 2 MiB
    second, release_second, _ = await hold_kv(manager, "a", 100, 924)  # 1,024: 4 MiB
    third, release_third, _ = await hold_kv(manager, "a", 10, 20)
    assert line(manager, "a").kv_reserved == 3 * 4 * MiB
    release_second.set()
    await second
    assert line(manager, "a").kv_reserved == 2 * 2 * MiB
    release_first.set()
    release_third.set()
    await asyncio.gather(first, third)


async def test_two_models_each_waiting_for_the_others_memory_are_both_served():
    """a and b are ready; a request on each needs 6 MiB of KV, which fits only without the
    other model. Before: both held their model, both waited, both 503 at the deadline."""
    manager, backend = make_kv([{"name": "a"}, {"name": "b"}], budget_mb=12, clock=time.monotonic, server={"queue_timeout": 3})
    await use(manager, "a")
    await use(manager, "b")
    on_a, release_a, granted_a = await hold_kv(manager, "a", 100, 1436)
    on_b, release_b, granted_b = await hold_kv(manager, "b", 100, 1436)
    assert await asyncio.wait_for(granted_a, 1) == 1436  # the head: b, whose request waits behind, made way
    assert backend.unloads == ["b:latest"] and not granted_b.done()
    release_a.set()
    assert await asyncio.wait_for(granted_b, 1) == 1436  # b loaded again, then idle a made way
    assert backend.unloads == ["b:latest", "a:latest"] and backend.loads["b:latest"] == 2
    release_b.set()
    await asyncio.gather(on_a, on_b)
    assert not backend.violations and state(manager, "b") is ModelState.READY


async def test_a_model_with_a_started_request_is_never_unloaded_for_the_queue():
    manager, backend = make_kv([{"name": "a"}, {"name": "b"}], budget_mb=12, clock=time.monotonic, server={"queue_timeout": 0.3})
    await use(manager, "a")
    await use(manager, "b")
    running_b, release_b, granted_b = await hold_kv(manager, "b", 100, 412)  # started: 2 MiB
    assert granted_b.done()
    with pytest.raises(InsufficientMemory, match="timed out"):
        async with manager.lease("a") as lease:
            await manager.reserve(lease, 100, 1436, flexible=False)  # needs b gone
    assert backend.unloads == [] and state(manager, "b") is ModelState.READY
    release_b.set()
    await running_b


async def test_memory_waits_are_served_by_priority():
    manager, backend = make_kv([{"name": "a", "max_concurrency": 8}], budget_mb=8, clock=time.monotonic, server={"queue_timeout": 5})
    holder, release, _ = await hold_kv(manager, "a", 100, 924)  # 4 MiB: the budget is full
    served: list[str] = []

    async def request(label: str, priority: Priority) -> None:
        async with manager.lease("a", priority=priority) as lease:
            await manager.reserve(lease, 100, 924, flexible=False)  # one at a time fits
            served.append(label)

    waiting = []
    for label, priority in (("low 1", Priority.LOW), ("low 2", Priority.LOW), ("medium", Priority.MEDIUM), ("high", Priority.HIGH)):
        waiting.append(asyncio.create_task(request(label, priority)))
        await asyncio.sleep(0.02)
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, *waiting), 3)
    assert served == ["high", "medium", "low 1", "low 2"]
