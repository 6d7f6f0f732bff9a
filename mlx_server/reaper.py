"""Host memory pressure -> unload idle models. It observes and asks; it never touches MLX.

Pressure is reported, not punished: /health stays "healthy" when another program fills
RAM, because clients that see "down" stop sending work the daemon could still do.

Where pressure comes from depends on the host, behind one small interface
(`PressureSignal`) that tests replace:
- macOS: the kernel's own verdict, `sysctl kern.memorystatus_vm_pressure_level`
  (1 normal, 2 warning, 4 critical), plus this process's physical footprint (what
  Activity Monitor shows, MLX's wired buffers included). The kernel revises its level
  slowly, so on warning the reaper unloads one idle model per pass; on critical every
  idle model until the level is back to normal.
- elsewhere: psutil's used fraction against `high_water` / `low_water` and `reserve_gb`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import psutil

from .config import MemoryConfig
from .manager import GiB, Manager

log = logging.getLogger("mlx_server.reaper")

PRESSURE_SYSCTL = "kern.memorystatus_vm_pressure_level"


class PressureLevel(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class HostMemory:
    total: int
    available: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.available / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class PressureReading:
    level: PressureLevel
    relieved: bool  # low enough to stop unloading
    host: HostMemory
    footprint: int | None = None  # this process's physical footprint (macOS); None where unknown


class PressureSignal(Protocol):
    source: str  # what the level comes from, for /health
    settles_at_once: bool  # whether the next reading already reflects an unload

    def read(self) -> PressureReading: ...


def read_host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(vm.total, vm.available)


def under_pressure(memory: HostMemory, config: MemoryConfig) -> bool:
    return memory.used_fraction > config.high_water or memory.available < config.reserve_gb * GiB


def relieved(memory: HostMemory, config: MemoryConfig) -> bool:
    return memory.used_fraction < config.low_water and memory.available >= config.reserve_gb * GiB


class PsutilPressure:
    """Linux and the rest: the used fraction against the water marks (with hysteresis)."""

    source = "psutil"
    settles_at_once = True

    def __init__(self, config: MemoryConfig, probe: Callable[[], HostMemory] = read_host_memory):
        self._config = config
        self._probe = probe

    def read(self) -> PressureReading:
        host = self._probe()
        level = PressureLevel.WARNING if under_pressure(host, self._config) else PressureLevel.NORMAL
        return PressureReading(level, relieved(host, self._config), host)


def sysctl_pressure_level(raw: int) -> PressureLevel:
    """The kernel's documented values: 1 normal, 2 warning, 4 critical."""
    if raw >= 4:
        return PressureLevel.CRITICAL
    if raw >= 2:
        return PressureLevel.WARNING
    return PressureLevel.NORMAL


class DarwinPressure:
    """macOS: the kernel's pressure level and this process's physical footprint."""

    source = "sysctl"
    settles_at_once = False

    def __init__(
        self,
        probe: Callable[[], HostMemory] = read_host_memory,
        sysctl: Callable[[str], int] | None = None,
        footprint: Callable[[], int | None] | None = None,
    ):
        self._probe = probe
        self._sysctl = sysctl or read_sysctl_int
        self._footprint = footprint or read_footprint

    def read(self) -> PressureReading:
        level = sysctl_pressure_level(self._sysctl(PRESSURE_SYSCTL))
        return PressureReading(level, level is PressureLevel.NORMAL, self._probe(), self._footprint())


def make_pressure_signal(config: MemoryConfig, probe: Callable[[], HostMemory] = read_host_memory) -> PressureSignal:
    return DarwinPressure(probe) if sys.platform == "darwin" else PsutilPressure(config, probe)


# --- macOS system calls (ctypes; no subprocess per reading) -------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def read_sysctl_int(name: str) -> int:
    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if _libc().sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sysctlbyname({name}): {os.strerror(errno)}")
    return value.value


class _RusageInfoV0(ctypes.Structure):
    """<sys/resource.h> struct rusage_info_v0."""

    _fields_ = [
        ("ri_uuid", ctypes.c_uint8 * 16),
        ("ri_user_time", ctypes.c_uint64),
        ("ri_system_time", ctypes.c_uint64),
        ("ri_pkg_idle_wkups", ctypes.c_uint64),
        ("ri_interrupt_wkups", ctypes.c_uint64),
        ("ri_pageins", ctypes.c_uint64),
        ("ri_wired_size", ctypes.c_uint64),
        ("ri_resident_size", ctypes.c_uint64),
        ("ri_phys_footprint", ctypes.c_uint64),
        ("ri_proc_start_abstime", ctypes.c_uint64),
        ("ri_proc_exit_abstime", ctypes.c_uint64),
    ]


RUSAGE_INFO_V0 = 0


def read_footprint() -> int | None:
    """This process's physical footprint (proc_pid_rusage); None if the call fails."""
    info = _RusageInfoV0()
    try:
        if _libc().proc_pid_rusage(os.getpid(), RUSAGE_INFO_V0, ctypes.byref(info)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int(info.ri_phys_footprint)


# --- the loop ---------------------------------------------------------------------


class Reaper:
    def __init__(self, manager: Manager, config: MemoryConfig, signal: PressureSignal):
        self._manager = manager
        self._config = config
        self._signal = signal
        self.last = signal.read()
        self.pressure = False

    @property
    def source(self) -> str:
        return self._signal.source

    def read(self) -> PressureReading:
        """A fresh reading (also what /health and /metrics show)."""
        self.last = self._signal.read()
        return self.last

    async def check(self) -> list[str]:
        """One pass: under pressure, unload idle models until relieved; returns their names."""
        reading = self.read()
        pressure = reading.level is not PressureLevel.NORMAL
        if pressure != self.pressure:
            log.warning(
                "memory pressure %s (%s: %s): %.0f%% of host memory used, %.2f GiB available%s",
                "started" if pressure else "ended", self._signal.source, reading.level,
                100 * reading.host.used_fraction, reading.host.available / GiB, _footprint_note(reading),
            )
            self.pressure = pressure
        if not pressure:
            return []
        checks = 0

        def enough() -> bool:
            nonlocal checks
            checks += 1  # call n comes after n - 1 unloads
            now = self.read()
            if now.relieved:
                return True
            # A slow signal (the kernel's) lags behind an unload: on warning, one per pass.
            return not self._signal.settles_at_once and now.level is PressureLevel.WARNING and checks > 1

        evicted = await self._manager.evict_idle("pressure", enough=enough)
        if evicted:
            log.warning(
                "memory pressure (%s): unloaded %s; now %s, %.0f%% used%s",
                reading.level, ", ".join(evicted), self.last.level, 100 * self.last.host.used_fraction, _footprint_note(self.last),
            )
        return evicted

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("reaper pass failed")
            await asyncio.sleep(self._config.check_interval)


def _footprint_note(reading: PressureReading) -> str:
    return "" if reading.footprint is None else f", this process's footprint {reading.footprint / GiB:.2f} GiB"
