"""A hung rank of a live 2-rank group on loopback: alive but not answering (SIGSTOP).

Its heartbeat stops, so within HEARTBEAT_TIMEOUT the group fails as if the rank had
died: the running request ends with an error naming the rank, /health shows the model
failed with that reason, no process of the group is left, and a request after the
back-off gets a fresh group. In-process, so that the manager's back-off can be made
short; the heartbeat's bound is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import psutil
import pytest
from conftest import make_config

from mlx_server import manager
from mlx_server.group.process import HEARTBEAT_TIMEOUT, rank_args

NOTICED = HEARTBEAT_TIMEOUT + 5.0  # the bound, a last heartbeat's age, the watcher's poll and stopping the group
BACK_OFF = 1.0


@pytest.fixture
async def client(app_client, test_model, monkeypatch):
    monkeypatch.setattr(manager, "RETRY_FAILED_AFTER", BACK_OFF)  # the back-off is not what this tests
    return await app_client(make_config([{"name": "pair", "source": str(test_model), "distributed": {"ranks": 2}}]))


async def generate(client, num_predict: int) -> dict:
    options = {"num_predict": num_predict, "temperature": 0}  # greedy: the answer does not depend on a draw
    response = await client.post("/api/generate", json={"model": "pair", "prompt": "hi", "stream": False, "options": options})
    assert response.status == 200, await response.text()
    return await response.json()


async def pair_health(client) -> dict:
    body = await (await client.get("/health")).json()
    return next(m for m in body["models"] if m["name"] == "pair:latest")


def group_processes() -> list[psutil.Process]:
    """This process's group processes (the launcher and the ranks), by their command lines."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        args = rank_args(process.info["cmdline"] or [])
        if args.get("--daemon-pid") == str(os.getpid()) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


async def rest(response) -> list[dict]:
    return [json.loads(line) async for line in response.content]


async def within(seconds: float, predicate, what: str) -> float:
    """How long `predicate` took to hold, polled; fails after `seconds`."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < seconds, f"not within {seconds:.0f}s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def assert_failed_and_gone(client, rank: int) -> None:
    health = await pair_health(client)
    assert health["state"] == "failed" and "group" not in health
    assert f"rank {rank} (pid" in health["error"] and "stopped answering" in health["error"]

    async def gone() -> bool:
        return not group_processes()

    await within(30, gone, "every process of the hung group gone")


async def test_a_rank_stopped_mid_stream_fails_the_request_then_a_fresh_group_serves(client):
    await generate(client, 1)
    pids = [r["pid"] for r in (await pair_health(client))["group"]["ranks"]]
    response = await client.post("/api/generate", json={"model": "pair", "prompt": "Count:", "options": {"temperature": 0, "num_predict": 3000}})
    assert json.loads(await response.content.readline())["done"] is False
    os.kill(pids[1], signal.SIGSTOP)
    stopped = time.monotonic()
    lines = await asyncio.wait_for(rest(response), NOTICED)  # without a heartbeat: for ever
    took = time.monotonic() - stopped
    error = lines[-1]["error"]
    assert "failed mid-request" in error and f"rank 1 (pid {pids[1]}" in error and "stopped answering" in error
    print(f"rank 1 stopped mid-stream: the request failed after {took:.1f}s")
    await assert_failed_and_gone(client, 1)

    await asyncio.sleep(BACK_OFF)
    answer = await generate(client, 4)
    assert answer["eval_count"] == 4, answer
    fresh = await pair_health(client)
    assert fresh["state"] == "ready" and not {r["pid"] for r in fresh["group"]["ranks"]} & set(pids)


async def test_rank_0_stopped_while_idle_fails_the_group_within_the_bound(client):
    await generate(client, 1)
    pids = [r["pid"] for r in (await pair_health(client))["group"]["ranks"]]
    os.kill(pids[0], signal.SIGSTOP)

    async def failed() -> bool:
        return (await pair_health(client))["state"] == "failed"

    took = await within(NOTICED, failed, "the model failed")
    print(f"rank 0 stopped while idle: the model failed after {took:.1f}s")
    await assert_failed_and_gone(client, 0)
