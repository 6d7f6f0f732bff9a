"""A group's processes from launch to end: ranks that outlive their daemon, what a dead
daemon left of a group, a port taken between being picked and bound, and a stop that
must not signal a pid the group no longer owns.

The model here never finishes loading: its weights file is a FIFO nobody writes, so
every rank waits in `mx.load` as long as a test needs, as it would for the minutes a
large shard takes. Fakes stand in for ranks where only their command lines matter.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
from test_group_live import wait_until

from mlx_server.config import DistributedConfig
from mlx_server.group import process as group_process
from mlx_server.group.process import RANK_MODULE, STOP_TIMEOUT, GroupFailed, GroupProcess, rank_args

LAUNCH_TIMEOUT = 180.0  # two ranks importing mlx on a busy two-core machine
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def loading_model(tmp_path: Path, test_model: Path) -> Path:
    """The test model, but with weights that block whoever opens them."""
    path = tmp_path / "loading"
    path.mkdir()
    for file in test_model.iterdir():
        if file.suffix == ".safetensors":
            os.mkfifo(path / file.name)
        else:
            (path / file.name).symlink_to(file)
    return path


@pytest.fixture(autouse=True)
def no_rank_left(tmp_path: Path):
    """Kill what still runs the rank module on this test's files: only a failing test leaves any."""
    yield
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in rank_args(p.info["cmdline"] or []).get("--model", "")]
    for p in left:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)


def test_a_daemon_killed_while_its_ranks_load_leaves_no_rank_behind(daemon, loading_model, tmp_path):
    process = daemon([{"name": "big", "source": str(loading_model), "preload": True, "distributed": {"ranks": 2}}],
                     env={"TMPDIR": str(tmp_path)})  # where the group's log goes

    def loading() -> int:
        return sum(log.read_text(errors="replace").count("loading its shard") for log in tmp_path.glob("mlx-server-group-*.log"))

    wait_until(lambda: loading() == 2, LAUNCH_TIMEOUT, "both ranks loading their shards")
    started = psutil.Process(process.proc.pid).children(recursive=True)  # the launcher, its ranks, the watchdog
    assert sum(rank_args(p.cmdline()).get("--daemon-pid") == str(process.proc.pid) for p in started) == 3
    process.kill()  # SIGKILL: no shutdown, no unload
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left behind by a killed daemon: {[p.cmdline()[:3] for p in alive]}"


async def test_starting_a_group_first_stops_what_a_dead_daemon_left_of_it(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def rank_of(name: str, daemon_pid: int) -> subprocess.Popen:
        return subprocess.Popen([*SLEEP, "-m", RANK_MODULE, "--model", str(tmp_path), "--name", name, "--daemon-pid", str(daemon_pid)])

    left = rank_of("big:latest", gone.pid)
    of_a_live_daemon = rank_of("big:latest", os.getpid())
    of_another_model = rank_of("small:latest", gone.pid)
    group = GroupProcess("big:latest", DistributedConfig(ranks=2, python="/nonexistent/bin/python"), tmp_path, lambda reason: None)
    with pytest.raises(GroupFailed):
        await group.start()
    assert left.poll() is not None, "the leftover rank of a dead daemon still runs"
    assert of_a_live_daemon.poll() is None and of_another_model.poll() is None


async def test_a_port_taken_after_it_was_picked_fails_the_start_at_once(loading_model, monkeypatch):
    taken: list[socket.socket] = []
    pick = group_process.free_ports

    def picked_then_taken(count: int) -> int:
        """The ports as picked, then the first taken by someone who never answers."""
        first = pick(count)
        if not taken:
            taken.append(socket.create_server(("127.0.0.1", first)))
        return first

    monkeypatch.setattr(group_process, "free_ports", picked_then_taken)
    group = GroupProcess("big:latest", DistributedConfig(ranks=2), loading_model, lambda reason: None)
    try:
        with pytest.raises(GroupFailed) as failed:
            await asyncio.wait_for(group.start(), LAUNCH_TIMEOUT)
        assert f"127.0.0.1:{taken[0].getsockname()[1]} is taken" in str(failed.value)
    finally:
        taken[0].close()


# A launcher whose one child answers as rank 0 and names `innocent`, a process that is no
# rank of the group, as rank 1: what a rank's pid looks like once another process has it.
FAKE_RANK0 = """
import json, os, socket, sys
innocent, args = int(sys.argv[1]), dict(zip(sys.argv[4::2], sys.argv[5::2]))
ranks = [{"rank": r, "host": socket.gethostname(), "pid": pid, "shard_bytes": 1} for r, pid in enumerate((os.getpid(), innocent))]
server = socket.create_server(("127.0.0.1", int(args["--port"])))
while True:
    connection, _ = server.accept()
    with connection:
        connection.makefile("rb").readline()
        connection.sendall(json.dumps({"ranks": ranks}).encode() + b"\\n")
"""
FAKE_LAUNCHER = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {FAKE_RANK0!r}, *sys.argv[1:]])"


async def test_stop_signals_no_process_that_is_not_the_groups(monkeypatch, tmp_path):
    innocent = subprocess.Popen(SLEEP)
    launch = group_process.launch_command

    def fake_launch(*args) -> list[str]:
        command = launch(*args)
        return [sys.executable, "-c", FAKE_LAUNCHER, str(innocent.pid), *command[command.index("--") + 1 :]]

    monkeypatch.setattr(group_process, "launch_command", fake_launch)
    group = GroupProcess("big:latest", DistributedConfig(ranks=2), tmp_path, lambda reason: None)
    try:
        await group.start()
        status = group.status()
        started = time.monotonic()
        await group.stop()
        assert innocent.poll() is None, "stop() killed a process that merely has a rank's pid"
        assert time.monotonic() - started < STOP_TIMEOUT
        assert [r.state for r in status.ranks] == ["up", "down"]  # not the group's: shown down, never signalled
    finally:
        innocent.kill()
        innocent.wait()
