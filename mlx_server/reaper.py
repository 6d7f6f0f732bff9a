"""Host memory pressure -> unload idle models. It observes and asks; it never touches MLX.

Pressure is reported, not punished: /health stays "healthy" when another program fills
RAM, because clients that see "down" stop sending work the daemon could still do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from .config import MemoryConfig
from .manager import GiB, Manager

log = logging.getLogger("mlx_server.reaper")


@dataclass(frozen=True, slots=True)
class HostMemory:
    total: int
    available: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.available / self.total if self.total else 0.0


def read_host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(vm.total, vm.available)


def under_pressure(memory: HostMemory, config: MemoryConfig) -> bool:
    return memory.used_fraction > config.high_water or memory.available < config.reserve_gb * GiB


def relieved(memory: HostMemory, config: MemoryConfig) -> bool:
    return memory.used_fraction < config.low_water and memory.available >= config.reserve_gb * GiB


class Reaper:
    def __init__(self, manager: Manager, config: MemoryConfig, probe: Callable[[], HostMemory] = read_host_memory):
        self._manager = manager
        self._config = config
        self._probe = probe
        self.last = probe()
        self.pressure = False

    def read(self) -> HostMemory:
        """A fresh reading of host memory (also what /health and /metrics show)."""
        self.last = self._probe()
        return self.last

    async def check(self) -> list[str]:
        """One pass: under pressure, unload idle models until relieved; returns their names."""
        self.read()
        pressure = under_pressure(self.last, self._config)
        if pressure != self.pressure:
            log.warning(
                "host memory pressure %s: %.0f%% used, %.2f GiB available",
                "started" if pressure else "ended", 100 * self.last.used_fraction, self.last.available / GiB,
            )
            self.pressure = pressure
        if not pressure:
            return []

        def enough() -> bool:
            return relieved(self.read(), self._config)

        evicted = await self._manager.evict_idle("pressure", enough=enough)
        if evicted:
            log.warning("memory pressure: unloaded %s; now %.0f%% used", ", ".join(evicted), 100 * self.last.used_fraction)
        return evicted

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("reaper pass failed")
            await asyncio.sleep(self._config.check_interval)
