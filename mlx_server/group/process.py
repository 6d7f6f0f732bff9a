"""A launched group: `mlx.launch` in its own session, its ranks, and their end.

The launcher runs in a new session, so its process group holds it, the shells it
starts and every local rank (and the ssh clients of remote ones, whose ranks get a
hangup when those close): stopping the group is one `killpg`, then a bounded wait
until every local process is gone. A watcher notices a rank or the launcher dying
and reports it once, unless the group is being stopped on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..config import DistributedConfig
from .protocol import GroupInfo, RankInfo, decode, encode

log = logging.getLogger("mlx_server.group")

START_TIMEOUT = 900.0  # longest every rank may take to load its shard
STOP_TIMEOUT = 10.0  # after SIGTERM, before SIGKILL
WATCH_INTERVAL = 0.25
TAIL_BYTES = 4000
TAIL_LINES = 6
LOG_BYTES = 256_000  # how far back the ranks' output is read for the launcher's first report of a failed rank
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAUNCHER_RANK_END = re.compile(r"Node with rank (?P<rank>\d+) (?P<how>exited with code -?\d+|was killed)")
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # mlx.launch, with this interpreter


class GroupFailed(RuntimeError):
    """The group did not start, or a rank died; the message has the ranks' last output."""


@dataclass(frozen=True, slots=True)
class RankStatus:
    rank: int
    host: str
    pid: int
    state: str  # "up" | "down"
    shard_bytes: int


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """What /health, /api/ps and metrics show of a group."""

    hosts: tuple[str, ...]
    backend: str
    mode: str
    state: str  # "starting" | "up" | "stopping" | "failed"
    ranks: tuple[RankStatus, ...]

    @property
    def ranks_up(self) -> int:
        return sum(r.state == "up" for r in self.ranks)

    def to_json(self) -> dict:
        return {
            "hosts": list(self.hosts),
            "backend": self.backend,
            "mode": self.mode,
            "state": self.state,
            "ranks_up": self.ranks_up,
            "ranks": [{"rank": r.rank, "host": r.host, "pid": r.pid, "state": r.state, "shard_bytes": r.shard_bytes} for r in self.ranks],
        }


def launch_command(dist: DistributedConfig, model_path: Path, port: int, ring_port: int) -> list[str]:
    """The `mlx.launch` command line that starts the ranks of `dist` on `model_path`."""
    python = dist.python or sys.executable
    command = [sys.executable, "-c", LAUNCH, "--backend", dist.backend, "--starting-port", str(ring_port), "--python", python]
    if dist.hostfile:
        command += ["--hostfile", dist.hostfile]
    elif dist.hosts:
        command += ["--hosts", ",".join(dist.hosts)]
    else:
        command += ["--hosts", "127.0.0.1", "-n", str(dist.ranks)]
    for key, value in dist.env.items():
        command += ["--env", f"{key}={value}"]
    return command + ["--", "-m", "mlx_server.group.rank", "--model", str(model_path), "--mode", dist.mode,
                      "--backend", dist.backend, "--port", str(port), "--daemon-pid", str(os.getpid())]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports (the ring backend's rank ports)."""
    for _ in range(200):
        first = random.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise GroupFailed(f"no {count} consecutive free ports for the ring backend")


class GroupProcess:
    """One launch of one model's group; not restarted (a new load makes a new one)."""

    def __init__(self, name: str, dist: DistributedConfig, model_path: Path, on_death: Callable[[str], None]):
        self.name = name
        self.dist = dist
        self.model_path = model_path
        self.port = 0
        self.info: GroupInfo | None = None
        self.state = "starting"
        self.failure: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._on_death = on_death
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task | None = None  # the launcher's wait(); done once it exited
        self._log: Path | None = None
        self._watcher: asyncio.Task | None = None

    # -- start ------------------------------------------------------------------

    async def start(self) -> GroupInfo:
        """Launch every rank and return once rank 0 answers (all shards are loaded)."""
        self.port = free_ports(1)
        command = launch_command(self.dist, self.model_path, self.port, free_ports(self.dist.ranks))
        fd, log_path = tempfile.mkstemp(prefix="mlx-server-group-", suffix=".log")
        self._log = Path(log_path)
        log.info("model '%s': launching %d ranks (%s, %s): %s", self.name, self.dist.ranks, self.dist.backend, self.dist.mode, " ".join(command))
        try:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
                )
            finally:
                os.close(fd)
            self._exited = asyncio.get_running_loop().create_task(self._proc.wait())
            self.info = await self._wait_ready()
        except BaseException:
            await self.stop()  # also removes the log file
            raise
        self.state = "up"
        _lower_priority(self._proc.pid)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.info

    async def _wait_ready(self) -> GroupInfo:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise GroupFailed(f"the group exited with code {self._proc.returncode} while loading: {self.tail()}")
            info = await self._ask_info()
            if info is not None:
                return info
            await asyncio.wait({self._exited}, timeout=WATCH_INTERVAL)
        raise GroupFailed(f"not every rank had loaded its shard after {START_TIMEOUT:.0f}s: {self.tail()}")

    async def _ask_info(self) -> GroupInfo | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2.0)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(encode({"op": "info"}))
            line = await asyncio.wait_for(reader.readline(), 10.0)
            return GroupInfo.from_json(decode(line)) if line else None
        except (OSError, TimeoutError, ValueError, KeyError, TypeError):
            return None
        finally:
            writer.close()

    # -- watch ------------------------------------------------------------------

    def local_pids(self) -> list[int]:
        """The ranks running on this machine (all of them for `ranks: N`)."""
        if self.info is None:
            return []
        here = socket.gethostname()
        return [r.pid for r in self.info.ranks if r.host == here]

    async def _watch(self) -> None:
        while self._proc.returncode is None and not self._gone_ranks():
            await asyncio.wait({self._exited}, timeout=WATCH_INTERVAL)
        await asyncio.sleep(WATCH_INTERVAL)  # let the launcher write why
        reason = f"{self._cause()}: {self.tail()}"
        self.state = "failed"
        if not self.failure.done():
            self.failure.set_result(reason)
        log.error("model '%s': distributed group failed: %s", self.name, reason)
        self._watcher = None  # stop() must not cancel the task that runs it
        self._on_death(reason)  # failed first: no request is sent to what is left of the group
        await self.stop()

    def _gone_ranks(self) -> list[RankInfo]:
        local = set(self.local_pids())
        return [r for r in self.info.ranks if r.pid in local and not _alive(r.pid)]

    def _cause(self) -> str:
        """The rank that ended the group. mlx.launch stops every rank once one fails and
        reports each end in order, so its first failure report names the cause even when
        the launcher exited before the watcher saw that rank go."""
        failed = _LAUNCHER_RANK_END.search(self._output())
        gone = self._gone_ranks()
        if failed is not None:
            number, how = int(failed["rank"]), failed["how"]
        elif gone:
            number, how = gone[0].rank, "exited"
        else:
            return f"the group's launcher exited with code {self._proc.returncode}"
        rank = next((r for r in self.info.ranks if r.rank == number), None)
        where = f" (pid {rank.pid} on {rank.host})" if rank else ""
        return f"rank {number}{where} {how}"

    # -- stop -------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every rank and return once no local process of the group is left."""
        if self.state != "failed":
            self.state = "stopping"
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        proc = self._proc
        if proc is not None and self._exited is not None:
            pids = self.local_pids()
            _signal_group(proc.pid, signal.SIGTERM)
            if not await self._gone(proc, pids, STOP_TIMEOUT):
                log.warning("model '%s': group did not stop within %.0fs; killing it", self.name, STOP_TIMEOUT)
                _signal_group(proc.pid, signal.SIGKILL)
                for pid in pids:  # a rank that left the process group
                    with suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                await self._gone(proc, pids, STOP_TIMEOUT)
        if self.state == "stopping":
            self.state = "stopped"
        if not self.failure.done():
            self.failure.set_result("the group was stopped")
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    async def _gone(self, proc: asyncio.subprocess.Process, pids: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None and not any(_alive(p) for p in pids) and not _group_alive(proc.pid):
                return True
            await asyncio.wait({self._exited}, timeout=0.1)
        return False

    # -- reading ----------------------------------------------------------------

    def tail(self) -> str:
        """The last lines the ranks and the launcher wrote, repeats and colours dropped,
        and each Python traceback cut to its exception line: mlx.launch's own traceback
        when it stops a rank that had not yet written its pid file would otherwise push
        the failed rank's words out."""
        text = self._output()
        window = text[-TAIL_BYTES:]
        lines: list[str] = []
        in_traceback = False
        for line in window.splitlines()[1 if len(window) < len(text) else 0 :]:  # the first may be cut
            if line.startswith("Traceback (most recent call last)"):
                in_traceback = True
                continue
            if in_traceback and line[:1].isspace():  # a frame; the exception line ends the traceback
                continue
            in_traceback = False
            line = line.strip()
            if line and (not lines or lines[-1] != line):
                lines.append(line)
        return " | ".join(lines[-TAIL_LINES:]) or "(no output)"

    def _output(self) -> str:
        """The last LOG_BYTES of what the launcher and the ranks wrote, colours dropped."""
        if self._log is None:
            return ""
        try:
            with open(self._log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_BYTES))
                return _ANSI.sub("", f.read().decode(errors="replace"))
        except OSError:
            return ""

    def status(self) -> GroupStatus:
        ranks: tuple[RankStatus, ...] = ()
        if self.info is not None:
            local = set(self.local_pids())
            up = self.state == "up"
            ranks = tuple(
                RankStatus(r.rank, r.host, r.pid, "up" if up and (r.pid not in local or _alive(r.pid)) else "down", r.shard_bytes)
                for r in self.info.ranks
            )
        hosts = self.dist.hosts or (tuple(sorted({r.host for r in ranks})) if ranks else ("127.0.0.1",))
        return GroupStatus(hosts, self.dist.backend, self.dist.mode, self.state, ranks)


def _lower_priority(pid: int) -> None:
    """mlx.launch (0.32) polls its ranks' pipes without blocking, about a third of a core
    for as long as the group runs; at the lowest priority that only uses idle time. The
    ranks started before this and keep their own priority."""
    with suppress(psutil.Error):
        psutil.Process(pid).nice(19)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_alive(p.pid) for p in psutil.process_iter() if _pgid(p.pid) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
