"""Faults: broken model directories, errors inside a request, kill -9, disconnect storms."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import make_config
from engine_helpers import fail_nth_call
from mlx_server.testing import DaemonProcess, write_config


def post(url: str, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, test_model):
    root = tmp_path_factory.mktemp("broken")
    dirs = {}
    for name in ("truncated", "no-tokenizer", "bad-arch", "bad-config"):
        dirs[name] = shutil.copytree(test_model, root / name)
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (dirs["no-tokenizer"] / "tokenizer.json").unlink()
    (dirs["no-tokenizer"] / "tokenizer_config.json").unlink()
    config = json.loads((dirs["bad-arch"] / "config.json").read_text())
    (dirs["bad-arch"] / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    (dirs["bad-config"] / "config.json").write_text("{ this is not json")
    return dirs


def test_broken_model_directories_fail_with_reasons_and_the_daemon_serves_the_rest(daemon, test_model, broken_models):
    models = [{"name": name, "source": str(path), "preload": True} for name, path in broken_models.items()]
    d = daemon([{"name": "good", "source": str(test_model), "preload": True}, *models])
    d.wait_ready("good")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {m["name"]: m for m in health(d.url)["models"]}
        if all(states[f"{n}:latest"]["state"] == "failed" for n in broken_models):
            break
        time.sleep(0.1)
    report = health(d.url)
    states = {m["name"]: m for m in report["models"]}
    assert states["good:latest"]["state"] == "ready" and report["status"] == "degraded"
    reasons = {n: states[f"{n}:latest"].get("error", "") for n in broken_models}
    assert all(states[f"{n}:latest"]["state"] == "failed" for n in broken_models), reasons
    assert "tokenizer" in reasons["no-tokenizer"]
    assert "no_such_architecture" in reasons["bad-arch"]
    assert "config.json" in reasons["bad-config"]
    assert reasons["truncated"]  # the safetensors reader's own words
    for name in broken_models:
        status, body = post(d.url, "/api/generate", {"model": name, "prompt": "hi"})
        assert status == 503 and "failed to load" in body["error"]
    status, body = post(d.url, "/api/generate", {"model": "good", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
    assert status == 200 and body["eval_count"] == 3


async def test_an_mlx_error_mid_stream_is_an_error_line_and_the_next_request_works(app_client, test_model, monkeypatch):
    client = await app_client(make_config([{"name": "demo", "source": str(test_model), "preload": True}]))
    body = {"model": "demo", "prompt": "hi", "options": {"num_predict": 50}}
    warm = await client.post("/api/generate", json={**body, "stream": False})
    assert warm.status == 200

    # A lone request decodes on its own single stream, not in the batch.
    from mlx_server.engine.single import SingleStream

    restore = fail_nth_call(monkeypatch, SingleStream, "next", 6, RuntimeError("[metal::malloc] Resource limit exceeded (simulated)"))
    response = await client.post("/api/generate", json=body)
    assert response.status == 200
    lines = [json.loads(x) for x in (await response.text()).splitlines()]
    assert lines[0]["done"] is False and "Resource limit exceeded" in lines[-1]["error"]
    assert all("error" not in x for x in lines[:-1])
    restore()
    after = await client.post("/api/generate", json={**body, "stream": False})
    assert after.status == 200 and (await after.json())["done"] is True
    assert (await (await client.get("/health")).json())["models"][0]["active_requests"] == 0


def test_kill_9_under_load_then_restart_preloads_by_itself(tmp_path, test_model):
    config = write_config(tmp_path / "models.yaml", [{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1}])
    first = DaemonProcess(config).start()
    try:
        first.wait_ready("demo")
        sock = socket.create_connection(("127.0.0.1", first.port))
        request = json.dumps({"model": "demo", "prompt": "x", "options": {"num_predict": 100000}})
        sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(request)}\r\n\r\n{request}".encode())
        assert b"200 OK" in sock.recv(4096)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        sock.close()
    finally:
        first.stop()
    second = DaemonProcess(config, port=first.port).start()
    try:
        second.wait_ready("demo", timeout=30)
        status, body = post(second.url, "/api/generate", {"model": "demo", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert status == 200 and body["eval_count"] == 2
    finally:
        second.stop()


def test_a_thousand_disconnects_leak_no_lease_and_no_memory(daemon, test_model):
    d = daemon([{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1, "max_concurrency": 64}],
               memory={"prompt_cache_mb": 0})
    d.wait_ready("demo")
    process = psutil.Process(d.proc.pid)
    body = json.dumps({"model": "demo", "prompt": "disconnect me", "options": {"num_predict": 100000}})
    raw = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()

    def storm(n: int) -> None:
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            sock.sendall(raw)
            if i % 2:  # half leave mid-stream, half before the first token (mid-prompt)
                assert sock.recv(1024)
            sock.close()

    storm(100)  # warm-up: allocator pools reach their working size
    time.sleep(1.0)
    baseline_rss = process.memory_info().rss
    baseline_mlx = health(d.url)["memory"]["mlx_active_bytes"]
    storm(1000)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        model = health(d.url)["models"][0]
        if model["active_requests"] == 0 and model["queued"] == 0:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    report = health(d.url)
    assert report["models"][0]["active_requests"] == 0 and report["queue_depth"] == 0
    assert report["memory"]["mlx_active_bytes"] <= baseline_mlx * 1.05 + (1 << 20)
    assert process.memory_info().rss <= baseline_rss * 1.10, (baseline_rss, process.memory_info().rss)
    status, out = post(d.url, "/api/generate", {"model": "demo", "prompt": "still here?", "stream": False, "options": {"num_predict": 4}})
    assert status == 200 and out["eval_count"] == 4
