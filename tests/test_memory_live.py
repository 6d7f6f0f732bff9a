"""Residency on a live daemon with real models: memory comes back, busy models stay."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from mlx_server.testing import make_test_model

MB = 1_000_000
# A request that cannot end early: the random model could emit EOS at any token, but a
# grammar that needs a million-character string masks EOS until num_predict runs out.
UNENDING = {"format": {"type": "object", "properties": {"text": {"type": "string", "minLength": 10**6}}, "required": ["text"]}}


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    """Two ~117 MB models: big enough that their memory shows clearly in RSS."""
    root = tmp_path_factory.mktemp("big")
    return [make_test_model(root / f"big{i}", hidden=1024, layers=3, vocab_size=1024, seed=i) for i in range(2)]


def call(url: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def health(url: str) -> dict:
    return call(url, "/health")[2]


def state_of(url: str, name: str) -> dict:
    return next(m for m in health(url)["models"] if m["name"] == name)


def rss(daemon) -> int:
    return psutil.Process(daemon.proc.pid).memory_info().rss


def settle_rss(daemon, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return rss(daemon)


def test_swap_under_a_budget_returns_the_first_models_memory(daemon, big_models):
    weights = (big_models[0] / "model.safetensors").stat().st_size
    assert weights > 100 * MB
    d = daemon(
        [{"name": "big0", "source": str(big_models[0])}, {"name": "big1", "source": str(big_models[1])}],
        memory={"budget_gb": 0.15},  # 161 MB: one model fits, two do not
    )
    base = settle_rss(d)
    assert call(d.url, "/api/generate", {"model": "big0", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})[0] == 200
    with_first = settle_rss(d)
    assert with_first - base > 0.9 * weights
    status, _, _ = call(d.url, "/api/generate", {"model": "big1", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert status == 200
    assert state_of(d.url, "big0:latest")["state"] == "unloaded"
    after_swap = settle_rss(d)
    assert after_swap < with_first + 0.1 * weights, "the first model's memory was not returned"
    mlx_loaded = health(d.url)["memory"]["mlx_active_bytes"]
    call(d.url, "/api/generate", {"model": "big1", "keep_alive": 0})
    deadline = time.monotonic() + 10
    while state_of(d.url, "big1:latest")["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    after_unload = settle_rss(d)
    assert after_swap - after_unload >= 0.9 * weights, (after_swap, after_unload)
    assert mlx_loaded - health(d.url)["memory"]["mlx_active_bytes"] >= 0.9 * weights
    metrics = urllib.request.urlopen(d.url + "/metrics").read().decode()
    assert 'mlx_server_model_evictions_total{model="big0:latest",reason="lru"} 1.0' in metrics
    assert 'mlx_server_model_evictions_total{model="big1:latest",reason="manual"} 1.0' in metrics


def test_a_streaming_request_keeps_its_model_while_another_is_requested(daemon, test_model, second_model):
    d = daemon(
        [{"name": "a", "source": str(test_model)}, {"name": "b", "source": str(second_model)}],
        memory={"max_loaded_models": 1},
        server={"queue_timeout": 1},
    )
    lines: list[dict] = []

    def stream_a():
        body = json.dumps({"model": "a", "prompt": "long", "options": {"num_predict": 600}, **UNENDING}).encode()
        request = urllib.request.Request(d.url + "/api/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            for line in r:
                lines.append(json.loads(line))

    streamer = threading.Thread(target=stream_a)
    streamer.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines, "stream did not start"
    status, headers, body = call(d.url, "/api/generate", {"model": "b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "'a:latest'" in body["error"] and "1 active" in body["error"]
    assert state_of(d.url, "a:latest")["state"] == "ready"
    streamer.join(120)
    final = lines[-1]
    assert final["done"] is True and final["eval_count"] == 600 and not any("error" in x for x in lines)
    status, _, _ = call(d.url, "/api/generate", {"model": "b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    assert status == 200 and state_of(d.url, "a:latest")["state"] == "unloaded"


def test_a_memory_hog_makes_the_reaper_unload_idle_models_only(daemon, test_model, second_model, tmp_path):
    hog_bytes = 3 << 30
    vm = psutil.virtual_memory()
    used = 1 - vm.available / vm.total
    high = used + 0.5 * hog_bytes / vm.total
    models = [
        {"name": "idle", "source": str(test_model), "preload": True},
        {"name": "pinned", "source": str(second_model), "preload": True, "pinned": True},
        {"name": "busy", "source": str(test_model), "preload": True},
    ]
    d = daemon(models, memory={"high_water": round(high, 4), "low_water": round(used + 0.25 * hog_bytes / vm.total, 4), "reserve_gb": 0, "check_interval": "200ms"})
    for name in ("idle", "pinned", "busy"):
        d.wait_ready(name)
    done = threading.Event()

    def keep_busy():
        body = json.dumps({"model": "busy", "prompt": "x", "options": {"num_predict": 100_000}, **UNENDING}).encode()
        request = urllib.request.Request(d.url + "/api/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            for _ in r:
                if done.is_set():
                    break

    streamer = threading.Thread(target=keep_busy, daemon=True)
    streamer.start()
    time.sleep(0.5)
    assert health(d.url)["memory"]["pressure"] is False
    hog = subprocess.Popen([sys.executable, "-c", f"import numpy, time; a = numpy.ones({hog_bytes // 8}); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while state_of(d.url, "idle:latest")["state"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        report = health(d.url)
        states = {m["name"]: m["state"] for m in report["models"]}
        assert states == {"idle:latest": "unloaded", "pinned:latest": "ready", "busy:latest": "ready"}
        assert report["status"] == "healthy" and report["memory"]["pressure"] is True  # reported, not punished
        assert state_of(d.url, "busy:latest")["active_requests"] == 1
    finally:
        hog.kill()
        hog.wait()
        done.set()
    metrics = urllib.request.urlopen(d.url + "/metrics").read().decode()
    assert 'mlx_server_model_evictions_total{model="idle:latest",reason="pressure"} 1.0' in metrics
    assert 'model="pinned:latest",reason="pressure"' not in metrics


def test_two_cold_loads_under_a_budget_for_one_are_both_served(daemon, big_models):
    """Issue 15: each load used to wait for the other to make room until queue_timeout."""
    d = daemon(
        [{"name": "big0", "source": str(big_models[0])}, {"name": "big1", "source": str(big_models[1])}],
        memory={"budget_gb": 0.15},  # one fits, two do not
        server={"queue_timeout": 60},
    )
    results: dict[str, int] = {}

    def ask(name: str) -> None:
        results[name] = call(d.url, "/api/generate", {"model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}, timeout=120)[0]

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("big0", "big1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"big0": 200, "big1": 200}
    states = {m["name"]: m["state"] for m in health(d.url)["models"]}
    assert sorted(states.values()) == ["ready", "unloaded"]  # the second loaded after the first was evicted
    first = next(name for name, s in states.items() if s == "unloaded")
    metrics = urllib.request.urlopen(d.url + "/metrics").read().decode()
    assert f'mlx_server_model_evictions_total{{model="{first}",reason="lru"}} 1.0' in metrics
    waits = {reason: float(re.search(rf'mlx_server_admission_waits_total{{reason="{reason}"}} (\S+)', metrics).group(1)) for reason in ("load", "memory")}
    assert waits["load"] + waits["memory"] >= 1, waits  # the second waited for the first's load, then for its request
