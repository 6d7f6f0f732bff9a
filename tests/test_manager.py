"""Residency rules with a fake backend, an injected clock and a fake memory probe."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from mlx_server.config import parse_config
from mlx_server.errors import BadRequest, InsufficientMemory, LoadFailed, QueueFull
from mlx_server.manager import GiB, Loaded, Manager, ModelState, Prepared, pick_victim
from mlx_server.reaper import (
    DarwinPressure,
    HostMemory,
    PressureLevel,
    PsutilPressure,
    Reaper,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """Loads are instant unless gated; every call is checked against the manager's rules."""

    def __init__(self, sizes: dict[str, int] | None = None):
        self.sizes = sizes or {}
        self.configs: dict[str, dict] = {}  # config.json per model: its KV layout
        self.manager: Manager | None = None
        self.loaded: set[str] = set()
        self.loads: Counter[str] = Counter()
        self.unloads: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.violations: list[str] = []

    def size(self, name: str) -> int:
        return self.sizes.get(name.split(":")[0], GiB)

    async def prepare(self, model):
        await asyncio.sleep(0)  # the real one reads files in a worker thread
        return Prepared(Path("/nonexistent"), self.size(model.name), self.configs.get(model.name.split(":")[0], {}))

    async def load(self, model, prepared):
        self.loads[model.name] += 1
        if model.name in self.loaded:
            self.violations.append(f"second copy of {model.name}")
        gate = self.gates.get(model.name)
        if gate is not None:
            await gate.wait()
        if model.name in self.fail:
            raise self.fail[model.name]
        self.loaded.add(model.name)
        return Loaded(tokenizer=object(), size=prepared.size, context_length=4096, details={"family": "fake"})

    async def unload(self, name):
        record = self.manager._records[name]
        if record.leases > record.waiting_for_memory or record.admitted:  # only requests that have not started may lose it
            self.violations.append(f"unloaded {name} with {record.leases} leases, {record.admitted} admitted")
        self.loaded.discard(name)
        self.unloads.append(name)
        await asyncio.sleep(0)
        return self.size(name)


def make(models: list[dict], *, budget_gb: float = 8, clock: Clock | None = None, sizes=None, **sections):
    memory = {"budget_gb": budget_gb, **sections.pop("memory", {})}
    config = parse_config({"models": [{"source": "org/repo", **m} for m in models], "memory": memory, **sections})
    backend = FakeBackend(sizes)
    evictions: list[tuple[str, str]] = []
    waits: Counter[str] = Counter()

    class Observer:
        def model_loaded(self, name, result, seconds):
            pass

        def model_evicted(self, name, reason):
            evictions.append((name.split(":")[0], reason))

        def admission_waited(self, reason):
            waits[reason] += 1

        def slot_granted(self, name, granted):
            pass

    manager = Manager(config, backend, total_memory=64 * GiB, observer=Observer(), clock=clock or Clock())
    backend.manager = manager
    manager.evictions = evictions
    manager.waits = waits
    return manager, backend


def state(manager: Manager, name: str) -> ModelState:
    return manager._records[manager.resolve(name).name].state


async def use(manager: Manager, name: str, **kwargs) -> None:
    async with manager.lease(name, **kwargs):
        pass


async def hold(manager: Manager, name: str) -> tuple[asyncio.Task, asyncio.Event]:
    """Take a lease on `name` and keep it until the returned event is set."""
    release = asyncio.Event()

    async def holder():
        async with manager.lease(name):
            await release.wait()

    task = asyncio.create_task(holder())
    await settle()
    return task, release


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_requests_wait_for_one_load():
    manager, backend = make([{"name": "a", "max_concurrency": 64}])
    backend.gates["a:latest"] = asyncio.Event()
    tasks = [asyncio.create_task(use(manager, "a")) for _ in range(20)]
    await settle()
    assert state(manager, "a") is ModelState.LOADING
    backend.gates["a:latest"].set()
    await asyncio.gather(*tasks)
    assert backend.loads["a:latest"] == 1
    assert state(manager, "a") is ModelState.READY
    assert not backend.violations


async def test_lru_order_decides_what_goes():
    clock = Clock()
    manager, backend = make([{"name": "a"}, {"name": "b"}, {"name": "c"}], budget_gb=2, clock=clock)
    await use(manager, "a")
    clock.advance(1)
    await use(manager, "b")
    clock.advance(1)
    await use(manager, "a")  # a is now the most recently used
    clock.advance(1)
    await use(manager, "c")
    assert backend.unloads == ["b:latest"]
    assert manager.evictions == [("b", "lru")]
    assert state(manager, "a") is ModelState.READY and state(manager, "c") is ModelState.READY


async def test_pinned_models_are_never_evicted():
    clock = Clock()
    manager, backend = make([{"name": "a", "pinned": True}, {"name": "b"}, {"name": "c"}], budget_gb=2, clock=clock)
    await use(manager, "a")
    clock.advance(1)
    await use(manager, "b")
    clock.advance(1)
    await use(manager, "c")
    assert backend.unloads == ["b:latest"]
    assert pick_victim(list(manager._records.values())) is manager._records["c:latest"]


async def test_max_loaded_models_bounds_the_count():
    manager, backend = make([{"name": "a"}, {"name": "b"}], budget_gb=100, memory={"max_loaded_models": 1})
    await use(manager, "a")
    await use(manager, "b")
    assert backend.unloads == ["a:latest"] and backend.loaded == {"b:latest"}


async def test_busy_models_holding_memory_give_503_with_retry_after_naming_them():
    manager, backend = make([{"name": "a"}, {"name": "b"}], budget_gb=1.5, clock=time.monotonic, server={"queue_timeout": 0.2})
    async with manager.lease("a"):
        with pytest.raises(InsufficientMemory) as e:
            await use(manager, "b")
    assert e.value.status == 503 and e.value.retry_after >= 1
    assert "'a:latest'" in e.value.message and "1 active" in e.value.message
    assert state(manager, "b") is ModelState.UNLOADED  # transient: not marked failed
    await use(manager, "b")  # a is idle now: it is evicted and b loads
    assert backend.unloads == ["a:latest"]


async def test_a_load_waits_for_busy_models_to_finish():
    manager, backend = make([{"name": "a"}, {"name": "b"}], budget_gb=1.5, clock=time.monotonic, server={"queue_timeout": 5})
    holder, release = await hold(manager, "a")
    waiter = asyncio.create_task(use(manager, "b"))
    await asyncio.sleep(0.05)
    assert state(manager, "a") is ModelState.READY and not waiter.done()
    release.set()
    await asyncio.wait_for(waiter, 2)
    await holder
    assert backend.unloads == ["a:latest"] and state(manager, "b") is ModelState.READY


async def test_resident_model_never_waits_behind_another_models_load():
    manager, backend = make([{"name": "a"}, {"name": "b"}])
    await use(manager, "a")
    backend.gates["b:latest"] = asyncio.Event()
    loading_b = asyncio.create_task(use(manager, "b"))
    await settle()
    assert state(manager, "b") is ModelState.LOADING
    await asyncio.wait_for(use(manager, "a"), 0.5)
    backend.gates["b:latest"].set()
    await loading_b


async def test_keep_alive_starts_when_the_last_lease_ends():
    clock = Clock()
    manager, backend = make([{"name": "a", "keep_alive": 60}], clock=clock)
    first = asyncio.Event()

    async def long_request():
        async with manager.lease("a"):
            await first.wait()

    task = asyncio.create_task(long_request())
    await settle()
    await use(manager, "a")  # a short request ends while the long one still runs
    clock.advance(100)
    assert manager.sweep() == []  # still leased: no expiry
    first.set()
    await task
    clock.advance(59)
    assert manager.sweep() == []
    clock.advance(2)
    assert manager.sweep() == ["a:latest"]
    await settle()
    assert manager.evictions == [("a", "keep_alive")]


async def test_request_keep_alive_overrides_and_zero_unloads_at_once():
    clock = Clock()
    manager, backend = make([{"name": "a", "keep_alive": "1h"}], clock=clock)
    await use(manager, "a", keep_alive=5.0)
    snap = next(s for s in manager.snapshot() if s.name == "a:latest")
    assert snap.keep_alive == 5.0 and snap.expires_at is not None
    await use(manager, "a")  # no keep_alive: back to the model's own setting
    assert next(s for s in manager.snapshot() if s.name == "a:latest").keep_alive == 3600.0
    await use(manager, "a", keep_alive=0.0)
    await settle()
    assert state(manager, "a") is ModelState.UNLOADED
    assert manager.evictions == [("a", "keep_alive")]


async def test_forever_and_pinned_never_expire():
    clock = Clock()
    manager, backend = make([{"name": "a", "keep_alive": -1}, {"name": "b", "pinned": True, "keep_alive": 1}], clock=clock)
    await use(manager, "a")
    await use(manager, "b")
    clock.advance(10**9)
    assert manager.sweep() == []
    assert all(s.expires_at is None for s in manager.snapshot())


async def test_manual_unload_waits_for_running_requests():
    manager, backend = make([{"name": "a", "keep_alive": -1}])
    task, release = await hold(manager, "a")
    assert await manager.unload("a") == "scheduled"
    assert state(manager, "a") is ModelState.READY
    release.set()
    await task
    await settle()
    assert state(manager, "a") is ModelState.UNLOADED and not backend.violations
    assert await manager.unload("a") == "not loaded"
    await use(manager, "a")
    assert await manager.unload("a") == "unloaded"
    assert manager.evictions[-1] == ("a", "manual")


async def test_failed_load_keeps_its_reason_and_is_retried_later():
    clock = Clock()
    manager, backend = make([{"name": "a"}], clock=clock)
    backend.fail["a:latest"] = RuntimeError("safetensors header is truncated")
    with pytest.raises(LoadFailed) as e:
        await use(manager, "a")
    assert "safetensors header is truncated" in e.value.message and e.value.status == 503
    snap = manager.snapshot()[0]
    assert snap.state is ModelState.FAILED and "truncated" in snap.error
    with pytest.raises(LoadFailed):  # within the back-off: no new attempt
        await use(manager, "a")
    assert backend.loads["a:latest"] == 1
    del backend.fail["a:latest"]
    clock.advance(31)
    await use(manager, "a")
    assert backend.loads["a:latest"] == 2 and state(manager, "a") is ModelState.READY
    assert manager.snapshot()[0].error is None


async def test_a_model_larger_than_the_budget_fails_fast():
    manager, backend = make([{"name": "big"}], budget_gb=1, sizes={"big": 3 * GiB})
    with pytest.raises(LoadFailed, match="needs 3.00 GiB but the memory budget is 1.00 GiB"):
        await use(manager, "big")
    assert backend.loads["big:latest"] == 0


async def test_queue_bounds_give_503_at_once():
    manager, backend = make([{"name": "a", "max_concurrency": 1}], server={"max_queue": 1, "queue_timeout": 5})
    running, release = await hold(manager, "a")
    queued = asyncio.create_task(use(manager, "a"))
    await settle()
    assert manager.queue_depth() == 1
    with pytest.raises(QueueFull) as e:
        await asyncio.wait_for(use(manager, "a"), 0.5)
    assert e.value.retry_after and "max_queue 1" in e.value.message
    release.set()
    await asyncio.gather(running, queued)
    assert manager.queue_depth() == 0


async def test_waiting_for_a_slot_times_out_with_503():
    manager, backend = make([{"name": "a", "max_concurrency": 1}], clock=time.monotonic, server={"queue_timeout": 0.1})
    task, release = await hold(manager, "a")
    with pytest.raises(QueueFull, match="max_concurrency 1"):
        await use(manager, "a")
    release.set()
    await task


async def test_race_thousands_of_leases_against_eviction_passes():
    """No unload ever happens under a lease; no model is ever loaded twice."""
    clock = Clock()
    names = ["a", "b", "c"]
    manager, backend = make([{"name": n, "keep_alive": 0, "max_concurrency": 16} for n in names], budget_gb=2, clock=clock, server={"queue_timeout": 30})
    rng = random.Random(7)
    done = asyncio.Event()
    served = Counter()

    async def client(i: int):
        for _ in range(150):
            name = rng.choice(names)
            async with manager.lease(name, keep_alive=rng.choice([0.0, 0.001, None])) as lease:
                served[lease.name] += 1
                assert manager._records[lease.name].state is ModelState.READY
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(0)

    async def evictor():
        while not done.is_set():
            await manager.evict_idle(rng.choice(["pressure", "manual"]), enough=lambda: rng.random() < 0.5)
            clock.advance(0.01)
            manager.sweep()
            await asyncio.sleep(0)

    eviction_task = asyncio.create_task(evictor())
    await asyncio.gather(*(client(i) for i in range(20)))
    done.set()
    await eviction_task
    assert sum(served.values()) == 3000
    assert not backend.violations, backend.violations[:5]
    assert len(backend.unloads) > 100  # the evictor really competed with the leases
    assert all(r.leases == 0 and r.admitted == 0 and len(r.slots) == 0 for r in manager._records.values())


async def test_reaper_unloads_idle_models_until_below_low_water():
    clock = Clock()
    manager, backend = make(
        [{"name": "idle1"}, {"name": "idle2"}, {"name": "pinned", "pinned": True}, {"name": "busy"}],
        budget_gb=100, clock=clock, memory={"high_water": 0.9, "low_water": 0.8, "reserve_gb": 0},
    )
    total = 100 * GiB
    used = {"value": 50 * GiB}

    def probe() -> HostMemory:
        resident = sum(backend.size(n) * 10 for n in backend.loaded)  # each model "uses" 10 GiB
        return HostMemory(total, total - used["value"] - resident)

    for name in ("idle1", "idle2", "pinned"):
        await use(manager, name)
        clock.advance(1)
    reaper = Reaper(manager, manager.config.memory, PsutilPressure(manager.config.memory, probe))
    task, release = await hold(manager, "busy")
    assert await reaper.check() == []  # 50 + 40 = 90% used: not above high water
    assert not reaper.pressure
    used["value"] = 55 * GiB  # another program takes 5 GiB: 95%
    assert await reaper.check() == ["idle1:latest", "idle2:latest"]  # 75% after two unloads
    assert reaper.pressure is True
    assert {"pinned:latest", "busy:latest"} <= backend.loaded
    used["value"] = 95 * GiB  # nothing idle is left: pinned and busy stay
    assert await reaper.check() == []
    assert {"pinned:latest", "busy:latest"} <= backend.loaded
    assert ("idle1", "pressure") in manager.evictions
    release.set()
    await task
    assert not backend.violations


async def test_reaper_treats_available_below_reserve_as_pressure():
    manager, backend = make([{"name": "a"}], memory={"high_water": 0.99, "low_water": 0.5, "reserve_gb": 4})
    await use(manager, "a")
    memory = {"available": 3 * GiB}

    def probe() -> HostMemory:
        return HostMemory(1000 * GiB, memory["available"] + (0 if backend.loaded else 600 * GiB))

    reaper = Reaper(manager, manager.config.memory, PsutilPressure(manager.config.memory, probe))
    assert await reaper.check() == ["a:latest"]


# -- issue 15: residency faults ------------------------------------------------------


async def test_two_cold_loads_under_a_budget_for_one_are_both_served_one_after_the_other():
    manager, backend = make([{"name": "a"}, {"name": "b"}], budget_gb=1.5, clock=time.monotonic, server={"queue_timeout": 5})
    await use(manager, "a")
    await use(manager, "b")  # both sizes are known now, as after any earlier load
    await manager.unload("b")
    backend.gates["a:latest"] = asyncio.Event()
    both = asyncio.gather(use(manager, "a"), use(manager, "b"))
    await settle()
    assert state(manager, "a") is ModelState.LOADING
    backend.gates["a:latest"].set()
    await asyncio.wait_for(both, 2)  # before the fix: each waited for the other until queue_timeout
    assert backend.unloads[-1] == "a:latest" and manager.evictions[-1] == ("a", "lru")
    assert state(manager, "b") is ModelState.READY and not backend.violations
    # a's load was admitted, so b took the load turn at once and waited for a's memory
    assert manager.waits["memory"] == 1 and manager.waits["load"] == 0


async def test_a_request_for_a_loading_model_waits_for_that_load_only():
    manager, backend = make([{"name": "a"}, {"name": "b"}, {"name": "c"}], budget_gb=8)
    backend.gates["a:latest"] = asyncio.Event()
    loading_a = asyncio.create_task(use(manager, "a"))
    await settle()
    other_b = asyncio.create_task(use(manager, "b"))  # admitted beside a's load, read meanwhile
    second_a = asyncio.create_task(use(manager, "a"))
    await asyncio.wait_for(other_b, 1)
    assert not second_a.done() and state(manager, "a") is ModelState.LOADING
    backend.gates["a:latest"].set()
    await asyncio.wait_for(asyncio.gather(loading_a, second_a), 2)
    assert backend.loads == Counter({"a:latest": 1, "b:latest": 1})


async def test_a_long_load_holds_the_load_turn_only_while_it_is_admitted():
    """Issue 26: a group's start (up to 900 s) held the one-at-a-time load turn while it
    read, so every other cold load waited behind it; now the turn covers admission, and
    a load that fits beside the admitted one goes on while that one reads."""
    manager, backend = make([{"name": "a"}, {"name": "b"}], clock=time.monotonic, server={"queue_timeout": 0.5})
    backend.gates["a:latest"] = asyncio.Event()
    loading_a = asyncio.create_task(use(manager, "a"))
    await settle()
    await asyncio.wait_for(use(manager, "b"), 0.4)
    assert state(manager, "a") is ModelState.LOADING and state(manager, "b") is ModelState.READY
    assert manager.ledger().used == 2 * GiB  # a's weights counted while they are read
    backend.gates["a:latest"].set()
    await loading_a


async def test_a_load_that_does_not_fit_beside_one_being_read_times_out_naming_who_holds_memory():
    manager, backend = make([{"name": "a"}, {"name": "b"}], budget_gb=1.5, clock=time.monotonic, server={"queue_timeout": 0.2})
    backend.gates["a:latest"] = asyncio.Event()
    loading_a = asyncio.create_task(use(manager, "a"))
    await settle()
    with pytest.raises(InsufficientMemory, match="held by 'a:latest'") as e:
        await use(manager, "b")
    assert e.value.status == 503 and e.value.retry_after
    assert state(manager, "b") is ModelState.UNLOADED
    backend.gates["a:latest"].set()
    await loading_a


async def test_manual_unload_of_a_loading_model_is_not_undone_by_the_waiting_request():
    manager, backend = make([{"name": "a", "keep_alive": -1}])
    backend.gates["a:latest"] = asyncio.Event()
    waiting = asyncio.create_task(use(manager, "a"))
    await settle()
    assert state(manager, "a") is ModelState.LOADING
    assert await manager.unload("a") == "scheduled"
    backend.gates["a:latest"].set()
    await waiting  # it is served, then the model goes
    await settle()
    assert state(manager, "a") is ModelState.UNLOADED
    assert manager.evictions == [("a", "manual")]


async def test_manual_unload_of_a_busy_model_survives_a_later_request():
    manager, backend = make([{"name": "a", "keep_alive": -1}])
    task, release = await hold(manager, "a")
    assert await manager.unload("a") == "scheduled"
    await use(manager, "a", keep_alive=-1.0)  # a later request may not cancel the unload
    assert state(manager, "a") is ModelState.READY
    release.set()
    await task
    await settle()
    assert state(manager, "a") is ModelState.UNLOADED and manager.evictions == [("a", "manual")]


async def test_the_reaper_cannot_evict_at_the_hand_off_to_a_queued_request():
    manager, backend = make([{"name": "a", "max_concurrency": 1}])
    release = asyncio.Event()
    evicted: list[str] = []

    async def holder():
        async with manager.lease("a"):
            await release.wait()
        # The lease is gone, the queued request has not run yet: the hand-off.
        evicted.extend(await manager.evict_idle("pressure", enough=lambda: False))

    running = asyncio.create_task(holder())
    await settle()
    queued = asyncio.create_task(use(manager, "a"))
    await settle()
    release.set()
    await asyncio.gather(running, queued)
    assert evicted == [] and backend.loads["a:latest"] == 1 and not backend.violations


async def test_keep_alive_expires_while_a_preload_is_still_loading():
    clock = Clock()
    manager, backend = make([{"name": "b", "keep_alive": 5}, {"name": "slow", "preload": True}], clock=clock)
    await use(manager, "b")
    clock.advance(10)
    backend.gates["slow:latest"] = asyncio.Event()
    runner = asyncio.create_task(manager.run())
    try:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if state(manager, "b") is ModelState.UNLOADED:
                break
        assert state(manager, "slow") is ModelState.LOADING
        assert state(manager, "b") is ModelState.UNLOADED and manager.evictions == [("b", "keep_alive")]
        backend.gates["slow:latest"].set()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if state(manager, "slow") is ModelState.READY:
                break
        assert state(manager, "slow") is ModelState.READY
    finally:
        runner.cancel()
        await manager.close()


# -- issue 16: KV reserved before a request runs ----------------------------------------

MiB = 1 << 20
# 4 layers x 2 KV heads x head dim 64 x 2 x 4 bytes = 4 KiB a token: 1 MiB per 256-token step
LAYOUT = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "torch_dtype": "float32"}


def make_kv(models: list[dict], *, budget_mb: float, **kwargs):
    manager, backend = make(models, budget_gb=budget_mb / 1024, sizes={m["name"]: 4 * MiB for m in models}, **kwargs)
    backend.configs = {m["name"]: LAYOUT for m in models}
    return manager, backend


async def hold_kv(manager: Manager, name: str, prompt: int, max_tokens: int, *, flexible: bool = False):
    """A request that reserves its KV and runs until released; returns (task, release, its token budget)."""
    release = asyncio.Event()
    granted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def request():
        async with manager.lease(name) as lease:
            granted.set_result(await manager.reserve(lease, prompt, max_tokens, flexible=flexible))
            await release.wait()

    task = asyncio.create_task(request())
    await settle()
    return task, release, granted


def line(manager: Manager, name: str):
    return next(m for m in manager.ledger().models if m.name == f"{name}:latest")


async def test_a_reservation_counts_in_the_ledger_until_the_request_ends():
    manager, backend = make_kv([{"name": "a"}], budget_mb=16)
    task, release, granted = await hold_kv(manager, "a", 100, 412)
    assert granted.result() == 412
    assert line(manager, "a").kv_reserved == 2 * MiB  # 512 tokens x 4 KiB
    assert manager.ledger().used == 6 * MiB and manager.ledger().reserved == 2 * MiB
    snap = next(s for s in manager.snapshot() if s.name == "a:latest")
    assert snap.memory.kv == 2 * MiB and snap.size == 6 * MiB
    release.set()
    await task
    assert line(manager, "a").kv_reserved == 0 and manager.ledger().used == 4 * MiB


async def test_a_request_that_does_not_fit_waits_and_runs_when_another_finishes():
    manager, backend = make_kv([{"name": "a", "max_concurrency": 8}], budget_mb=9, clock=time.monotonic, server={"queue_timeout": 5})
    first, release_first, _ = await hold_kv(manager, "a", 100, 412)
    second, release_second, _ = await hold_kv(manager, "a", 100, 412)
    third, release_third, granted = await hold_kv(manager, "a", 100, 412)  # 4 + 3 x 2 MiB > 9
    await asyncio.sleep(0.05)
    assert not granted.done() and manager.waits["memory"] == 1
    release_first.set()
    assert await asyncio.wait_for(granted, 1) == 412
    release_second.set()
    release_third.set()
    await asyncio.gather(first, second, third)
    assert manager.ledger().reserved == 0


async def test_waiting_for_memory_times_out_with_a_503_that_says_why():
    manager, backend = make_kv([{"name": "a"}], budget_mb=7, clock=time.monotonic, server={"queue_timeout": 0.2})
    task, release, _ = await hold_kv(manager, "a", 100, 412)
    with pytest.raises(InsufficientMemory) as e:
        async with manager.lease("a") as lease:
            await manager.reserve(lease, 100, 412, flexible=False)
    assert e.value.status == 503 and e.value.retry_after >= 1
    assert "KV cache of a 512-token request to 'a:latest'" in e.value.message and "timed out" in e.value.message
    release.set()
    await task


async def test_a_request_that_could_never_fit_is_a_400_at_once():
    manager, backend = make_kv([{"name": "a"}], budget_mb=8, clock=time.monotonic, server={"queue_timeout": 30})
    async with manager.lease("a") as lease:
        with pytest.raises(BadRequest, match="can never fit in memory") as e:
            await asyncio.wait_for(manager.reserve(lease, 100, 5000, flexible=False), 0.5)
    assert e.value.status == 400


async def test_without_num_predict_the_reservation_is_cut_to_what_can_ever_fit():
    manager, backend = make_kv([{"name": "a"}], budget_mb=8)
    async with manager.lease("a") as lease:
        allowed = await manager.reserve(lease, 100, 5000, flexible=True)
        assert allowed == 1024 - 100  # 4 MiB left beside the weights: 1024 tokens of KV
        assert line(manager, "a").kv_reserved == 4 * MiB
    async with manager.lease("a") as lease:
        with pytest.raises(BadRequest):  # not even the prompt fits
            await manager.reserve(lease, 2000, 100, flexible=True)


async def test_an_idle_model_is_evicted_for_a_busy_ones_kv_never_the_busy_one():
    clock = Clock()
    manager, backend = make_kv([{"name": "a"}, {"name": "b", "max_concurrency": 4}], budget_mb=10, clock=clock)
    await use(manager, "a")
    clock.advance(1)
    first, release_first, granted = await hold_kv(manager, "b", 100, 412)  # 4 + 4 + 2 = 10: fits
    assert granted.result() == 412 and state(manager, "a") is ModelState.READY
    second, release_second, granted = await hold_kv(manager, "b", 100, 412)  # 12: a must go
    assert granted.result() == 412
    assert backend.unloads == ["a:latest"] and manager.evictions == [("a", "lru")]
    release_first.set()
    release_second.set()
    await asyncio.gather(first, second)
    assert not backend.violations


async def test_a_load_waits_for_another_models_reserved_kv():
    manager, backend = make_kv([{"name": "a"}, {"name": "b"}], budget_mb=10, clock=time.monotonic, server={"queue_timeout": 5})
    holder, release, _ = await hold_kv(manager, "a", 100, 1436)  # 4 + 6 MiB: the budget is full
    loading_b = asyncio.create_task(use(manager, "b"))
    await asyncio.sleep(0.05)
    assert state(manager, "b") is ModelState.LOADING and not backend.loads["b:latest"]
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, loading_b), 2)
    assert backend.unloads == [] and manager.ledger().used == 8 * MiB  # both fit once a's KV is gone


# -- the reaper on macOS: the kernel's pressure level ---------------------------------------


class FakeKernel:
    """Speaks `sysctl kern.memorystatus_vm_pressure_level` as documented: 1, 2 or 4."""

    def __init__(self):
        self.level = 1
        self.asked: list[str] = []

    def sysctl(self, name: str) -> int:
        self.asked.append(name)
        return self.level


async def test_reaper_on_macos_unloads_one_idle_model_per_pass_on_warning_and_all_on_critical():
    clock = Clock()
    manager, backend = make([{"name": n} for n in ("a", "b", "c", "d")] + [{"name": "pinned", "pinned": True}], clock=clock)
    for name in ("a", "b", "c", "d", "pinned"):
        await use(manager, name)
        clock.advance(1)
    busy, release = await hold(manager, "d")
    kernel = FakeKernel()
    signal = DarwinPressure(lambda: HostMemory(64 * GiB, 8 * GiB), sysctl=kernel.sysctl, footprint=lambda: 5 * GiB)
    reaper = Reaper(manager, manager.config.memory, signal)
    assert await reaper.check() == [] and not reaper.pressure
    assert kernel.asked[-1] == "kern.memorystatus_vm_pressure_level"
    kernel.level = 2  # warning: the kernel revises slowly, so one model per pass
    assert await reaper.check() == ["a:latest"]
    assert reaper.pressure and reaper.last.level is PressureLevel.WARNING and reaper.last.footprint == 5 * GiB
    assert await reaper.check() == ["b:latest"]
    kernel.level = 4  # critical: every idle model
    assert await reaper.check() == ["c:latest"]
    assert backend.loaded == {"d:latest", "pinned:latest"}  # busy and pinned stay
    kernel.level = 1
    assert await reaper.check() == [] and not reaper.pressure
    assert [reason for _, reason in manager.evictions] == ["pressure"] * 3
    release.set()
    await busy
    assert not backend.violations


async def test_reaper_on_macos_stops_once_the_kernel_says_normal():
    manager, backend = make([{"name": "a"}, {"name": "b"}])
    await use(manager, "a")
    await use(manager, "b")
    kernel = FakeKernel()
    kernel.level = 4

    def sysctl(name: str) -> int:
        if backend.unloads:  # the first unload was enough
            kernel.level = 1
        return kernel.sysctl(name)

    reaper = Reaper(manager, manager.config.memory, DarwinPressure(lambda: HostMemory(GiB, GiB // 2), sysctl=sysctl, footprint=lambda: None))
    assert await reaper.check() == ["a:latest"]
    assert backend.loaded == {"b:latest"}


async def test_the_devices_recommended_working_set_caps_the_budget():
    config = parse_config({"models": [{"name": "a", "source": "org/repo"}], "memory": {"budget_gb": 100}})
    backend = FakeBackend({"a": 4 * MiB})
    backend.configs = {"a": LAYOUT}
    manager = Manager(config, backend, total_memory=128 * GiB, device_limit=lambda: 8 * MiB)
    backend.manager = manager
    assert manager.ledger().ceiling == 8 * MiB
    async with manager.lease("a") as lease:
        assert await manager.reserve(lease, 100, 5000, flexible=True) == 1024 - 100  # 4 MiB of KV beside 4 MiB of weights


async def test_a_reservation_waiting_on_a_prompt_cache_runs_once_the_engine_reports_it_smaller():
    config = parse_config({"models": [{"name": "a", "source": "org/repo"}], "memory": {"budget_gb": 10 / 1024}, "server": {"queue_timeout": 5}})
    backend = FakeBackend({"a": 4 * MiB})
    backend.configs = {"a": LAYOUT}
    prompt_cache = {"bytes": 5 * MiB}
    manager = Manager(config, backend, total_memory=64 * GiB, cache_bytes=lambda name: prompt_cache["bytes"])
    backend.manager = manager
    async with manager.lease("a") as lease:
        waiting = asyncio.create_task(manager.reserve(lease, 100, 412, flexible=False))  # 4 + 5 + 2 > 10
        await asyncio.sleep(0.1)
        assert not waiting.done()
        prompt_cache["bytes"] = 1 * MiB  # the engine trimmed it; nobody told the manager
        assert await asyncio.wait_for(waiting, 2) == 412
