"""The ledger on the real model without `torch_dtype` in its config.json (issue 24): the
model computes in float32 (its GGUF scales were widened), the config's missing dtype
hinted float16, so three requests each reserved half of what their caches took and all
three streamed under a budget for two. Now the KV dtype comes from the loaded weights:
the third waits until one of the first two ends."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from mlx_server.ledger import kv_layout
from mlx_server.testing import DaemonProcess, write_config

pytestmark = [pytest.mark.real, pytest.mark.live]

GiB = 1 << 30
NUM_PREDICT = 2000


class Stream(threading.Thread):
    """One streamed /api/generate, read until its first line arrives and then until told to stop."""

    def __init__(self, url: str, prompt: str):
        super().__init__(daemon=True)
        self.url, self.prompt = url, prompt
        self.first_line = threading.Event()
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        body = {"model": "demo", "prompt": self.prompt, "options": {"num_predict": NUM_PREDICT, "temperature": 0}}
        with httpx.stream("POST", self.url + "/api/generate", json=body, timeout=300) as response:
            if response.status_code != 200:
                self.error = f"{response.status_code}: {response.read()[:300]!r}"
                self.first_line.set()
                return
            for _ in response.iter_lines():
                self.first_line.set()
                if self.stop.is_set():
                    return  # leaving the block closes the connection: the daemon cancels the request


def test_three_long_requests_under_a_budget_for_two_the_third_waits(real_model, tmp_path):
    model = tmp_path / "demo-without-dtype"
    model.mkdir()
    for item in real_model.iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    config = json.loads((real_model / "config.json").read_text())
    del config["torch_dtype"]
    (model / "config.json").write_text(json.dumps(config))
    float32 = kv_layout(config | {"torch_dtype": "float32"})
    per_request = float32.bytes_for(64 + NUM_PREDICT)  # a short prompt plus the answer, as float32
    budget = (real_model / "model.safetensors").stat().st_size + 2.5 * per_request
    models = [{"name": "demo", "source": str(model), "preload": True, "keep_alive": -1, "context_length": 8192}]
    path = write_config(tmp_path / "models.yaml", models, memory={"budget_gb": budget / GiB, "prompt_cache_mb": 1}, server={"queue_timeout": "300s"})
    with DaemonProcess(path) as daemon:
        daemon.wait_ready("demo", timeout=300)
        streams = [Stream(daemon.url, f"Count slowly from {i} to a thousand.") for i in range(3)]
        for stream in streams:
            stream.start()
            time.sleep(0.5)
        first, second, third = streams
        assert first.first_line.wait(180) and second.first_line.wait(180), "the first two never started"
        assert first.error is None and second.error is None, (first.error, second.error)
        time.sleep(3)
        assert not third.first_line.is_set(), "the third streamed beside two under a budget for two"
        health = httpx.get(daemon.url + "/health").json()
        (line,) = [m["memory"] for m in health["models"]]
        assert 2 * float32.bytes_for(NUM_PREDICT) <= line["kv_reserved_bytes"] <= 2 * per_request  # float32, both rows
        assert health["memory"]["used_bytes"] <= budget
        first.stop.set()
        assert third.first_line.wait(180) and third.error is None, third.error
        for stream in streams:
            stream.stop.set()
        for stream in streams:
            stream.join(60)
