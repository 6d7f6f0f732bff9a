"""The manager's side of a distributed model that breaks while loaded (`Manager.fail`),
and the backend dispatch, with fakes: no ranks, no MLX."""

from __future__ import annotations

import asyncio

import pytest
from test_manager import make, state, use

from mlx_server.config import DistributedConfig
from mlx_server.errors import LoadFailed
from mlx_server.group.backend import DispatchBackend
from mlx_server.group.process import GroupProcess
from mlx_server.group.protocol import GroupInfo, RankInfo
from mlx_server.manager import RETRY_FAILED_AFTER, ModelState


async def test_a_ready_model_that_fails_is_failed_then_reloaded_after_the_back_off():
    manager, backend = make([{"name": "big", "keep_alive": 60}])
    clock = manager._clock
    await use(manager, "big")
    leased = asyncio.Event()
    release = asyncio.Event()

    async def running_request():
        async with manager.lease("big"):
            leased.set()
            await release.wait()

    task = asyncio.create_task(running_request())
    await leased.wait()
    manager.fail("big:latest", "distributed group failed: rank 1 exited")
    assert state(manager, "big") is ModelState.FAILED
    assert manager.ledger().used == 0  # its memory is no longer charged
    release.set()
    await task  # the lease ends on a failed model: no keep_alive armed, no unload asked
    assert backend.unloads == [] and manager._records["big:latest"].expires_at is None
    snapshot = next(s for s in manager.snapshot() if s.name == "big:latest")
    assert snapshot.error == "distributed group failed: rank 1 exited"

    with pytest.raises(LoadFailed, match="rank 1 exited"):
        await use(manager, "big")
    clock.advance(RETRY_FAILED_AFTER + 1)
    await use(manager, "big")
    assert state(manager, "big") is ModelState.READY and backend.loads["big:latest"] == 2


async def test_fail_ignores_a_model_that_is_not_ready():
    manager, _ = make([{"name": "big"}])
    manager.fail("big:latest", "late report")
    manager.fail("nobody:latest", "unknown name")
    assert state(manager, "big") is ModelState.UNLOADED


class Recorder:
    def __init__(self, label: str, calls: list):
        self.label, self.calls = label, calls

    async def prepare(self, model):
        self.calls.append((self.label, "prepare", model.name))

    async def load(self, model, prepared):
        self.calls.append((self.label, "load", model.name))

    async def unload(self, name):
        self.calls.append((self.label, "unload", name))
        return 0


async def test_dispatch_sends_distributed_models_to_the_group_backend():
    from conftest import make_config

    config = make_config([
        {"name": "local", "source": "o/r"},
        {"name": "split", "source": "o/r", "distributed": {"ranks": 2}},
    ])
    calls: list = []
    local, split = config.models
    dispatch = DispatchBackend(Recorder("engine", calls), Recorder("group", calls), {split.name})
    for model in (local, split):
        await dispatch.prepare(model)
        await dispatch.load(model, None)
        await dispatch.unload(model.name)
    assert calls == [
        ("engine", "prepare", "local:latest"), ("engine", "load", "local:latest"), ("engine", "unload", "local:latest"),
        ("group", "prepare", "split:latest"), ("group", "load", "split:latest"), ("group", "unload", "split:latest"),
    ]


async def test_the_launchers_first_report_names_the_rank_that_ended_the_group(tmp_path):
    """mlx.launch stops rank 0 once rank 1 dies, and may exit before the watcher sees
    rank 1 go: its first report of a failed rank is the cause, not the last one."""
    log = tmp_path / "group.log"
    log.write_text(
        "\x1b[33m[WARN] Node with rank 1 exited with code -9\x1b[0m\n"
        "RuntimeError: [ring] connection to a peer was lost\n"
        "\x1b[33m[WARN] Node with rank 0 exited with code -15\x1b[0m\n"
    )
    group = GroupProcess("pair:latest", DistributedConfig(ranks=2), tmp_path, on_death=lambda reason: None)
    group.info = GroupInfo((RankInfo(0, "mac1", 101, 1), RankInfo(1, "mac1", 102, 1)))
    group._log = log
    assert group._cause() == "rank 1 (pid 102 on mac1) exited with code -9"


async def test_the_tail_cuts_tracebacks_to_their_exception_line(tmp_path):
    """mlx.launch's traceback when it stops a rank that had not written its pid file yet
    must not push the failed rank's own words out of the tail."""
    log = tmp_path / "group.log"
    log.write_text(
        "\x1b[33m[WARN] Node with rank 1 exited with code 127\x1b[0m\n"
        "/bin/bash: line 1: /nonexistent/bin/python: No such file or directory\n"
        "Exception in thread Thread-2 (_thread_fn):\nTraceback (most recent call last):\n"
        + "".join(f'  File "launch.py", line {n}, in terminate\n    command.terminate()\n' for n in range(6))
        + "subprocess.CalledProcessError: Command 'rm None' returned non-zero exit status 1.\n"
    )
    group = GroupProcess("pair:latest", DistributedConfig(ranks=2), tmp_path, on_death=lambda reason: None)
    group._log = log
    assert group.tail() == (
        "[WARN] Node with rank 1 exited with code 127 | /bin/bash: line 1: /nonexistent/bin/python: No such file or directory"
        " | Exception in thread Thread-2 (_thread_fn): | subprocess.CalledProcessError: Command 'rm None' returned non-zero exit status 1."
    )
