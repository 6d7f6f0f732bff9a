"""The memory ledger and the pressure signal through the app, in-process."""

from __future__ import annotations

import json

from conftest import make_config
from engine_helpers import fail_nth_call

from mlx_server.reaper import DarwinPressure, HostMemory

GiB = 1 << 30


async def test_health_reports_the_kernels_pressure_level_and_the_ledger(app_client, test_model):
    kernel = {"level": 2}
    pressure = DarwinPressure(lambda: HostMemory(64 * GiB, 20 * GiB), sysctl=lambda name: kernel["level"], footprint=lambda: 3 * GiB)
    client = await app_client(make_config([{"name": "demo", "source": str(test_model), "preload": True}]), pressure=pressure)
    ready = await client.post("/api/generate", json={"model": "demo", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert ready.status == 200
    memory = (await (await client.get("/health")).json())["memory"]
    assert memory["pressure_level"] == "warning" and memory["pressure_source"] == "sysctl"
    assert memory["footprint_bytes"] == 3 * GiB and memory["pressure"] is True
    kernel["level"] = 4
    body = await (await client.get("/health")).json()
    assert body["memory"]["pressure_level"] == "critical" and body["status"] == "healthy"  # reported, not punished
    line = body["models"][0]["memory"]
    assert line["weights_bytes"] > 0 and line["kv_reserved_bytes"] == 0
    assert body["memory"]["used_bytes"] >= line["total_bytes"] and body["memory"]["reserved_bytes"] == 0
    ps = await (await client.get("/api/ps")).json()
    assert ps["models"][0]["memory"]["weights_bytes"] == line["weights_bytes"]


async def test_an_allocation_failure_fails_only_its_request_and_returns_its_reservation(app_client, test_model, monkeypatch):
    client = await app_client(make_config([{"name": "demo", "source": str(test_model), "preload": True}]))
    body = {"model": "demo", "prompt": "hi", "options": {"num_predict": 50}}
    assert (await client.post("/api/generate", json={**body, "stream": False})).status == 200

    # A lone request decodes on its own single stream, not in the batch.
    from mlx_server.engine.single import SingleStream

    restore = fail_nth_call(monkeypatch, SingleStream, "next", 4, MemoryError("CPU allocation failed (simulated)"))
    response = await client.post("/api/generate", json=body)
    lines = [json.loads(x) for x in (await response.text()).splitlines()]
    assert response.status == 200 and "error" in lines[-1] and all("error" not in x for x in lines[:-1])
    restore()
    health = await (await client.get("/health")).json()
    assert health["memory"]["reserved_bytes"] == 0 and health["models"][0]["memory"]["kv_reserved_bytes"] == 0
    after = await client.post("/api/generate", json={**body, "stream": False})
    assert after.status == 200 and (await after.json())["eval_count"] > 0
