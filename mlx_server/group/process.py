"""A launched group: `mlx.launch` in its own session, its ranks, and their end.

The launcher runs in a new session, so its process group holds it, the shells it
starts and every local rank (and the ssh clients of remote ones, whose ranks get a
hangup when those close). Stopping the group signals that process group and the
group's processes as psutil saw them (a rank started over ssh is outside it), then
waits until they are gone. A watcher notices a rank or the launcher dying, or a rank
whose heartbeat stopped (a stopped process, a hang that holds the GIL, a Mac asleep or
cut off), and reports it once, unless the group is being stopped on purpose; a hung
group is then stopped as a dead one is.

The launcher's stdout, where every rank's heartbeat arrives (protocol.py), comes to the
daemon through a pipe and goes on to the group's log less the heartbeats; its stderr,
the watchdog's output and that log are one file.

Every rank's command line names the model and the daemon (`--name`, `--daemon-pid`),
so what a daemon now gone left of a group can be found and stopped (`stop_leftovers`):
by the group's watchdog as soon as its daemon is gone, whatever the ranks are doing
(loading their shards, for minutes), and by a daemon starting that model's group.
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
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..config import DistributedConfig
from .protocol import HEARTBEAT, GroupInfo, RankInfo, decode, encode

log = logging.getLogger("mlx_server.group")

START_TIMEOUT = 900.0  # longest every rank may take to load its shard
STOP_TIMEOUT = 10.0  # after SIGTERM, before SIGKILL
WATCH_INTERVAL = 0.25
# A rank whose heartbeat (every HEARTBEAT_SECONDS) was not seen for this long is hung and
# the group fails as if it had died: ten beats missed is no busy machine's hiccup (the
# launcher that passes them on runs at the lowest priority), and a request stuck behind
# the hung rank fails within about this long instead of never.
HEARTBEAT_TIMEOUT = 10.0
OUTPUT_LINE_BYTES = 1 << 16  # the launcher's output is passed to the log by lines, up to this long
TAIL_BYTES = 4000
TAIL_LINES = 6
LOG_BYTES = 256_000  # how far back the ranks' output is read for the launcher's first report of a failed rank
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAUNCHER_RANK_END = re.compile(r"Node with rank (?P<rank>\d+) (?P<how>exited with code -?\d+|was killed)")
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # mlx.launch, with this interpreter
RANK_MODULE = "mlx_server.group.rank"
WATCHDOG = "import sys; from mlx_server.group.process import watchdog; watchdog(sys.argv[1], *map(int, sys.argv[2:]))"
WATCHDOG_SECONDS = 1.0  # how often a group's watchdog looks for its daemon and its launcher


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


def launch_command(dist: DistributedConfig, model_path: Path, port: int, ring_port: int, name: str) -> list[str]:
    """The `mlx.launch` command line that starts the ranks of model `name` (`dist`) on `model_path`."""
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
    return command + ["--", "-m", RANK_MODULE, "--model", str(model_path), "--mode", dist.mode, "--backend", dist.backend,
                      "--port", str(port), "--name", name, "--daemon-pid", str(os.getpid())]


def rank_args(cmdline: list[str]) -> dict[str, str]:
    """The `--flag value` pairs a launcher's or a rank's command line passes to the rank
    module; empty for any other process."""
    if RANK_MODULE not in cmdline:
        return {}
    tail = cmdline[cmdline.index(RANK_MODULE) + 1 :]
    return dict(zip(tail[::2], tail[1::2]))


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports free now: rank 0's port, then the
    ring backend's rank ports, picked as one block so that they differ from each other.

    They are released before the ranks bind them, so another process may take one in
    between: that cannot be avoided, as `mlx.launch` takes port numbers, not sockets.
    The block lies below the ephemeral ranges (Linux from 32768, macOS from 49152), so
    the kernel never hands these ports to outgoing connections, and a port taken anyway
    fails the group at once: rank 0 binds its port before loading, mlx's ring backend
    fails on a port it cannot bind, and the next load picks new ports.
    """
    for _ in range(200):
        first = random.randrange(20000, 32768 - count)
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
        self._launcher: psutil.Process | None = None  # the same process, as psutil sees it
        self._exited: asyncio.Task | None = None  # the launcher's wait(); done once it exited
        self._watchdog: asyncio.subprocess.Process | None = None
        self._ranks: dict[int, psutil.Process] = {}  # the local ranks, by pid, seen as ours once up
        self._log: Path | None = None
        self._relay: asyncio.Task | None = None  # the launcher's stdout into the log; done once it exited
        self._heard: dict[int, float] = {}  # rank -> when its heartbeat was last seen (monotonic)
        self._watcher: asyncio.Task | None = None

    # -- start ------------------------------------------------------------------

    async def start(self) -> GroupInfo:
        """Launch every rank and return once rank 0 answers (all shards are loaded)."""
        stopped = await asyncio.to_thread(stop_leftovers, self.name)
        if stopped:
            log.warning("model '%s': stopped %d processes of its group that a previous daemon left running", self.name, stopped)
        self.port = free_ports(1 + self.dist.ranks)
        command = launch_command(self.dist, self.model_path, self.port, self.port + 1, self.name)
        fd, log_path = tempfile.mkstemp(prefix="mlx-server-group-", suffix=".log")
        os.close(fd)
        self._log = Path(log_path)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)  # the relay writes to it too
        log.info("model '%s': launching %d ranks (%s, %s): %s", self.name, self.dist.ranks, self.dist.backend, self.dist.mode, " ".join(command))
        try:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=fd, start_new_session=True
                )
                self._launcher = psutil.Process(self._proc.pid)
                self._relay = asyncio.get_running_loop().create_task(self._relay_output(self._proc.stdout, self._log))
                self._exited = asyncio.get_running_loop().create_task(self._proc.wait())
                self._watchdog = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", WATCHDOG, self.name, str(os.getpid()), str(self._proc.pid),
                    stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                )
            finally:
                os.close(fd)
            self.info = await self._wait_ready()
        except BaseException:
            await self.stop()  # also removes the log file
            raise
        self.state = "up"
        self._heard = dict.fromkeys((r.rank for r in self.info.ranks), time.monotonic())  # each has the bound to beat first
        _lower_priority(self._launcher)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.info

    async def _wait_ready(self) -> GroupInfo:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                await asyncio.wait({self._relay}, timeout=WATCH_INTERVAL)  # what remote ranks wrote, into the log
                raise GroupFailed(f"the group exited with code {self._proc.returncode} while loading: {self.tail()}")
            info = await self._ask_info()
            if info is not None and (ranks := self._own_ranks(info)) is not None:
                self._ranks = ranks
                return info
            await asyncio.wait({self._exited}, timeout=WATCH_INTERVAL)
        raise GroupFailed(f"not every rank had loaded its shard after {START_TIMEOUT:.0f}s: {self.tail()}")

    def _own_ranks(self, info: GroupInfo) -> dict[int, psutil.Process] | None:
        """The local ranks of `info` whose command lines carry this group's port and this
        daemon's pid, by pid; None unless rank 0 is one: another process answered on
        the port (rank 0, failing to bind it, ends the group)."""
        ours = {}
        for pid in self.local_pids(info):
            with suppress(psutil.Error):
                process = psutil.Process(pid)
                args = rank_args(process.cmdline())
                if args.get("--port") == str(self.port) and args.get("--daemon-pid") == str(os.getpid()):
                    ours[pid] = process
        return ours if info.ranks and info.ranks[0].pid in ours else None

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

    def local_pids(self, info: GroupInfo | None = None) -> list[int]:
        """The ranks running on this machine (all of them for `ranks: N`), of `info` or the group's."""
        if info is None:
            info = self.info
        if info is None:
            return []
        here = socket.gethostname()
        return [r.pid for r in info.ranks if r.host == here]

    async def _relay_output(self, stdout: asyncio.StreamReader, path: Path) -> None:
        """Pass the launcher's stdout on to the log by whole lines, less the heartbeats,
        noting when each rank's was seen."""

        def heard(match: re.Match[bytes]) -> bytes:
            self._heard[int(match[1])] = time.monotonic()
            return b""

        pending = b""
        while chunk := await stdout.read(OUTPUT_LINE_BYTES):
            pending += chunk
            cut = pending.rfind(b"\n") + 1 or (len(pending) if len(pending) >= OUTPUT_LINE_BYTES else 0)
            _append(path, HEARTBEAT.sub(heard, pending[:cut]))
            pending = pending[cut:]
        _append(path, pending)

    async def _watch(self) -> None:
        while self._proc.returncode is None and not self._gone_ranks() and not self._silent_ranks():
            await asyncio.wait({self._exited}, timeout=WATCH_INTERVAL)
        await asyncio.wait({self._relay}, timeout=WATCH_INTERVAL)  # let the launcher write why
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
        return [r for r in self.info.ranks if r.pid in local and not _running(self._ranks.get(r.pid))]

    def _silent_ranks(self) -> list[RankInfo]:
        now = time.monotonic()
        return [r for r in self.info.ranks if now - self._heard[r.rank] > HEARTBEAT_TIMEOUT]

    def _cause(self) -> str:
        """The rank that ended the group. mlx.launch stops every rank once one fails and
        reports each end in order, so its first failure report names the cause even when
        the launcher exited before the watcher saw that rank go. A hung rank is not ended:
        every silent one is named (all of them when it is the launcher that hangs)."""
        failed = _LAUNCHER_RANK_END.search(self._output())
        gone = self._gone_ranks()
        if failed is not None:
            return f"{self._rank_name(int(failed['rank']))} {failed['how']}"
        if gone:
            return f"{self._rank_name(gone[0].rank)} exited"
        if silent := self._silent_ranks():
            names = " and ".join(self._rank_name(r.rank) for r in silent)
            return f"{names} stopped answering: no heartbeat for {HEARTBEAT_TIMEOUT:.0f}s"
        return f"the group's launcher exited with code {self._proc.returncode}"

    def _rank_name(self, number: int) -> str:
        rank = next((r for r in self.info.ranks if r.rank == number), None)
        return f"rank {number}" + (f" (pid {rank.pid} on {rank.host})" if rank else "")

    # -- stop -------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every rank and return once no local process of the group is left."""
        if self.state != "failed":
            self.state = "stopping"
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._launcher is not None and self._exited is not None:
            processes = self._processes()
            self._signal(signal.SIGTERM, processes)
            self._signal(signal.SIGCONT, processes)  # a stopped rank acts on SIGTERM once continued
            if not await self._ended(processes, STOP_TIMEOUT):
                log.warning("model '%s': group did not stop within %.0fs; killing it", self.name, STOP_TIMEOUT)
                self._signal(signal.SIGKILL, processes)
                await self._ended(processes, STOP_TIMEOUT)
        if self._relay is not None:
            await asyncio.wait({self._relay}, timeout=WATCH_INTERVAL)  # the launcher's last words, into the log
            self._relay.cancel()
        if self._watchdog is not None and self._watchdog.returncode is None:
            self._watchdog.kill()  # our child, not yet reaped: its pid is still its own
            await self._watchdog.wait()
        if self.state == "stopping":
            self.state = "stopped"
        if not self.failure.done():
            self.failure.set_result("the group was stopped")
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    def _processes(self) -> list[psutil.Process]:
        """The launcher's descendants now (shells, local ranks, ssh clients) and the ranks
        seen at start (one started over ssh is not a descendant); not the launcher."""
        found = dict(self._ranks)
        with suppress(psutil.Error):
            found.update((p.pid, p) for p in self._launcher.children(recursive=True))
        return list(found.values())

    def _signal(self, sig: int, processes: Iterable[psutil.Process]) -> None:
        """Signal the launcher's process group (which also holds what it starts after
        `_processes` looked) while the launcher, and so that group's id, is still ours,
        and each of `processes` unless its pid now belongs to another process."""
        if _running(self._launcher):
            _signal_group(self._launcher.pid, sig)
        for process in processes:
            with suppress(psutil.Error):
                process.send_signal(sig)

    async def _ended(self, processes: list[psutil.Process], timeout: float) -> bool:
        """Whether the launcher and `processes` all ended within `timeout`. The launcher is
        awaited rather than waited for by psutil: it is asyncio's child, and asyncio reaps it."""
        (_, alive), _ = await asyncio.gather(
            asyncio.to_thread(psutil.wait_procs, processes, timeout), asyncio.wait({self._exited}, timeout=timeout)
        )
        return not alive and self._exited.done()

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
                RankStatus(r.rank, r.host, r.pid, "up" if up and (r.pid not in local or _running(self._ranks.get(r.pid))) else "down", r.shard_bytes)
                for r in self.info.ranks
            )
        hosts = self.dist.hosts or (tuple(sorted({r.host for r in ranks})) if ranks else ("127.0.0.1",))
        return GroupStatus(hosts, self.dist.backend, self.dist.mode, self.state, ranks)


def watchdog(name: str, daemon_pid: int, launcher_pid: int) -> None:
    """A group's watchdog, in a session of its own: once the daemon is gone (killed
    outright, say, while the ranks load), stop what is left of the group; once the
    launcher is gone, the group has ended and so does the watchdog. A process, not a
    thread in each rank: such a thread cannot run while MLX holds the GIL in a call
    that blocks (`mx.load` on a slow file, a ring waiting for a peer)."""
    started = psutil.Process().create_time()
    try:
        launcher = psutil.Process(launcher_pid)
    except psutil.NoSuchProcess:
        return
    while _running(launcher) and not _daemon_gone(daemon_pid, started):
        time.sleep(WATCHDOG_SECONDS)
    if _daemon_gone(daemon_pid, started):
        stop_leftovers(name)


def stop_leftovers(name: str) -> int:
    """Stop the launcher and ranks of model `name` that a daemon now gone left running,
    and what they started; returns how many processes there were. The group's watchdog
    does it at once; a daemon starting that group does it again, for a watchdog that was
    killed too. A process counts only when it is this user's, carries the rank module's
    `--name` and `--daemon-pid`, and that pid is no process, or one started after it."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline", "uids", "create_time"]):
        args = rank_args(process.info["cmdline"] or [])
        if args.get("--name") != name or process.info["uids"] is None or process.info["uids"].real != os.getuid():
            continue
        with suppress(ValueError, psutil.Error):
            if _daemon_gone(int(args.get("--daemon-pid", "0")), process.info["create_time"]):
                found[process.pid] = process
                found.update((p.pid, p) for p in process.children(recursive=True))
    processes = list(found.values())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with suppress(psutil.Error):
                process.send_signal(sig)
        _, processes = psutil.wait_procs(processes, STOP_TIMEOUT)
        if not processes:
            break
    return len(found)


def _daemon_gone(daemon_pid: int, started: float) -> bool:
    """Whether the daemon `daemon_pid` that a process started at `started` names is gone:
    no such process, a zombie, or a later one that took its pid."""
    if daemon_pid <= 0:
        return False  # no daemon (a rank started by hand): not a leftover of one
    try:
        daemon = psutil.Process(daemon_pid)
        return daemon.create_time() > started or not _running(daemon)
    except psutil.NoSuchProcess:
        return True


def _running(process: psutil.Process | None) -> bool:
    """Alive, and still the process `process` was (psutil compares start times); a zombie has ended."""
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _lower_priority(launcher: psutil.Process) -> None:
    """mlx.launch (0.32) polls its ranks' pipes without blocking, about a third of a core
    for as long as the group runs; at the lowest priority that only uses idle time. The
    ranks started before this and keep their own priority."""
    with suppress(psutil.Error):
        launcher.nice(19)


def _append(path: Path, data: bytes) -> None:
    if data:
        with open(path, "ab") as out:
            out.write(data)


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
