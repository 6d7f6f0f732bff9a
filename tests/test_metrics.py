"""/metrics in-process: every family of DESIGN.md, bounded labels, live gauges, promtool."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_config
from mlx_server.metrics import OTHER, LiveModel, LiveReading, Metrics
from prometheus_tools import promtool_check, samples, value

DESIGN_FAMILIES = {
    "mlx_server_requests_total": "counter",
    "mlx_server_request_duration_seconds": "histogram",
    "mlx_server_time_to_first_token_seconds": "histogram",
    "mlx_server_prompt_tokens_total": "counter",
    "mlx_server_generated_tokens_total": "counter",
    "mlx_server_active_requests": "gauge",
    "mlx_server_queue_depth": "gauge",
    "mlx_server_model_loaded": "gauge",
    "mlx_server_model_memory_bytes": "gauge",
    "mlx_server_model_loads_total": "counter",
    "mlx_server_model_load_duration_seconds": "histogram",
    "mlx_server_model_evictions_total": "counter",
    "mlx_server_system_memory_available_bytes": "gauge",
    "mlx_server_mlx_active_memory_bytes": "gauge",
    "mlx_server_mlx_cache_memory_bytes": "gauge",
}
DEMO = "demo:latest"


@pytest.fixture
async def client(app_client, test_model):
    config = make_config([{"name": "demo", "source": str(test_model), "preload": True, "max_concurrency": 1, "keep_alive": -1}])
    client = await app_client(config)
    await wait_health(client, lambda m: m["state"] == "ready")
    return client


def queued(text: str) -> float:
    """sum(mlx_server_queue_depth): the waiting requests of every priority."""
    return sum(v for (name, _), v in samples(text).items() if name == "mlx_server_queue_depth")


async def wait_health(client, predicate, timeout: float = 30) -> dict:
    """The demo model's /health entry once `predicate` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        model = next(m for m in (await (await client.get("/health")).json())["models"] if m["name"] == DEMO)
        if predicate(model):
            return model
        assert time.monotonic() < deadline, f"/health never satisfied the test: {model}"
        await asyncio.sleep(0.02)


async def scrape(client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await response.text()


def families(exposition: str) -> dict[str, str]:
    """{family name as exposed: type}; the parser drops a counter's `_total`."""
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in text_string_to_metric_families(exposition)}


async def generate(client, model: str = "demo", num_predict: int = 8, **extra) -> dict:
    body = {"model": model, "prompt": "hello", "stream": False, "options": {"temperature": 0, "num_predict": num_predict}} | extra
    response = await client.post("/api/generate", json=body)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_every_design_family_with_values_from_real_traffic(client, test_model):
    weights = sum(f.stat().st_size for f in test_model.glob("*.safetensors"))
    answer = await generate(client)
    text = await scrape(client)
    assert families(text).items() >= DESIGN_FAMILIES.items()
    assert value(text, "mlx_server_generated_tokens_total", model=DEMO) == answer["eval_count"] > 0
    assert value(text, "mlx_server_prompt_tokens_total", model=DEMO) == answer["prompt_eval_count"] > 0
    assert value(text, "mlx_server_requests_total", endpoint="/api/generate", model=DEMO, status="200") == 1
    assert value(text, "mlx_server_request_duration_seconds_count", endpoint="/api/generate") == 1
    assert value(text, "mlx_server_time_to_first_token_seconds_count", model=DEMO) == 1
    assert value(text, "mlx_server_model_loads_total", model=DEMO, result="success") == 1
    assert value(text, "mlx_server_model_load_duration_seconds_count", model=DEMO) == 1
    assert value(text, "mlx_server_model_loaded", model=DEMO) == 1
    assert value(text, "mlx_server_model_memory_bytes", model=DEMO) >= 0.99 * weights
    assert value(text, "mlx_server_active_requests", model=DEMO) == 0
    assert queued(text) == 0
    assert value(text, "mlx_server_system_memory_available_bytes") > 0
    assert value(text, "mlx_server_mlx_active_memory_bytes") >= 0.99 * weights
    assert value(text, "mlx_server_mlx_cache_memory_bytes") >= 0


async def test_buckets_fit_llm_latencies(client):
    await generate(client)
    text = await scrape(client)

    def bounds(family: str) -> list[float]:
        return sorted({float(dict(ls)["le"]) for (n, ls) in samples(text) if n == family + "_bucket"})

    ttft = bounds("mlx_server_time_to_first_token_seconds")
    assert ttft[0] <= 0.025 and ttft[-2] >= 30 and ttft[-1] == float("inf")
    duration = bounds("mlx_server_request_duration_seconds")
    assert duration[0] <= 0.1 and duration[-2] >= 300  # a long generation takes minutes
    load = bounds("mlx_server_model_load_duration_seconds")
    assert load[0] <= 0.5 and load[-2] >= 120  # a 32B model from a cold disk


async def test_gauges_are_read_at_scrape_time(client):
    """active_requests and queue_depth while a stream runs and another request waits."""
    body = {"model": "demo", "prompt": "hello", "options": {"temperature": 0, "num_predict": 400}}
    first = await client.post("/api/generate", json=body)
    assert json.loads(await first.content.readline())["done"] is False
    text = await scrape(client)
    assert value(text, "mlx_server_active_requests", model=DEMO) == 1
    assert queued(text) == 0

    second = asyncio.create_task(generate(client))  # max_concurrency 1: it waits
    await wait_health(client, lambda m: m["queued"] == 1)
    text = await scrape(client)
    assert queued(text) == 1 and value(text, "mlx_server_queue_depth", priority="medium") == 1  # the default priority
    lines = (await first.text()).splitlines()
    assert json.loads(lines[-1])["done"] is True
    await second
    text = await scrape(client)
    assert value(text, "mlx_server_active_requests", model=DEMO) == 0
    assert queued(text) == 0
    assert value(text, "mlx_server_queue_wait_seconds_count", priority="medium") == 3

    response = await client.post("/api/generate", json={"model": "demo", "keep_alive": 0})
    assert response.status == 200
    await wait_health(client, lambda m: m["state"] == "unloaded")
    text = await scrape(client)
    assert value(text, "mlx_server_model_loaded", model=DEMO) == 0
    assert value(text, "mlx_server_model_memory_bytes", model=DEMO) == 0
    assert value(text, "mlx_server_model_evictions_total", model=DEMO, reason="manual") == 1


async def test_unknown_models_and_paths_create_no_series(client):
    """A client inventing names finds one "other" series, however many names it invents."""
    await generate(client)
    for i in range(20):  # every kind of request once, so that its series exist
        assert (await client.post("/api/generate", json={"model": f"nope-{i}", "prompt": "x"})).status == 404
        assert (await client.post("/api/chat", json={"model": f"other-{i}", "messages": []})).status == 404
        assert (await client.get(f"/api/invented-{i}")).status == 404
    await scrape(client)
    before = samples(await scrape(client))
    for i in range(20, 400):
        assert (await client.post("/api/generate", json={"model": f"nope-{i}", "prompt": "x"})).status == 404
        assert (await client.post("/api/chat", json={"model": f"other-{i}", "messages": []})).status == 404
        assert (await client.get(f"/api/invented-{i}")).status == 404
    after = samples(await scrape(client))
    assert after.keys() == before.keys()
    models = {dict(ls).get("model") for (_, ls) in after} - {None}
    assert models == {DEMO, OTHER}
    assert value(await scrape(client), "mlx_server_requests_total", endpoint="/api/generate", model=OTHER, status="404") == 400
    assert "nope" not in "".join(str(k) for k in after)


def test_a_million_invented_names_stay_one_series():
    metrics = Metrics(["demo:latest", "qwen2.5-coder:32b"], ["/api/chat"])
    metrics.bind_live(lambda: LiveReading([LiveModel("demo:latest", True, 1, 0)]))
    metrics.observe_request("/api/invented", "nope", 404, 0.01)
    metrics.observe_generation("nope", 1, 1, 0.01)
    metrics.model_loaded("nope", "error", 0.1)
    metrics.model_evicted("nope", "lru")
    series = len(samples(metrics.exposition().decode()))
    for i in range(1_000_000):
        metrics.observe_request(f"/api/x{i % 1000}", f"invented-{i}", 404, 0.001)
    for i in range(10_000):
        metrics.observe_generation(f"invented-{i}", 1, 1, 0.01)
        metrics.model_loaded(f"invented-{i}", "error", 0.1)
        metrics.model_evicted(f"invented-{i}", "lru")
    text = metrics.exposition().decode()
    assert len(samples(text)) == series
    assert value(text, "mlx_server_requests_total", endpoint=OTHER, model=OTHER, status="404") == 1_000_001


def test_model_label_is_the_configured_name():
    metrics = Metrics(["demo:latest", "qwen2.5-coder:32b"], [])
    assert metrics.model_label("demo") == "demo:latest"
    assert metrics.model_label("DEMO:Latest") == "demo:latest"
    assert metrics.model_label(" qwen2.5-coder:32b ") == "qwen2.5-coder:32b"
    assert metrics.model_label("qwen2.5-coder") == OTHER  # :latest is implied, and not this model
    assert metrics.model_label(None) == OTHER
    assert metrics.model_label("") == OTHER


async def test_promtool_accepts_the_exposition(client):
    await generate(client)
    await client.post("/api/generate", json={"model": "missing", "prompt": "x"})
    await client.post("/api/generate", json={"model": "demo", "keep_alive": 0})
    await wait_health(client, lambda m: m["state"] == "unloaded")
    response = await client.get("/metrics")
    promtool_check(await response.read())


def test_prompt_cache_spills_and_drops_are_counters_per_model():
    metrics = Metrics(["demo:latest"], [])
    metrics.bind_live(lambda: LiveReading([LiveModel("demo:latest", True, 1, 0)], cache_spills={"demo:latest": 2}, cache_drops={}))
    text = metrics.exposition().decode()
    assert "# TYPE mlx_server_prompt_cache_spills_total counter" in text
    assert value(text, "mlx_server_prompt_cache_spills_total", model="demo:latest") == 2
    assert value(text, "mlx_server_prompt_cache_drops_total", model="demo:latest") == 0


def test_pressure_level_and_cached_prompt_tokens_are_exported():
    metrics = Metrics(["demo:latest"], [])
    metrics.bind_live(lambda: LiveReading([LiveModel("demo:latest", True, 1, 0)], pressure_level=2))
    metrics.observe_generation("demo", 100, 5, 0.1, cached_tokens=64)
    metrics.observe_generation("demo", 50, 5, 0.1)
    text = metrics.exposition().decode()
    assert value(text, "mlx_server_memory_pressure_level") == 2
    assert value(text, "mlx_server_prompt_cached_tokens_total", model="demo:latest") == 64
    assert value(text, "mlx_server_prompt_tokens_total", model="demo:latest") == 150
