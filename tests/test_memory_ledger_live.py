"""KV reserved before it is used, on a live daemon: requests wait for memory instead of
failing, one that could never fit is refused at once, idle models make way for busy ones.

Budgets are a few MB, sized from the tiny test model's weights and its KV layout
(4 layers x 2 KV heads x head dim 64 x 2 x float32 = 4 KiB a token, allocated in
256-token steps), so the arithmetic in each test is exact.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import psutil
from test_memory_live import UNENDING, call, health, state_of

from mlx_server.ledger import kv_layout

GiB = 1 << 30
MiB = 1 << 20
NUM_PREDICT = 600  # a short chat prompt + 600 tokens: 768 tokens of cache, 3 MiB
# What the daemon may hold beyond its memory budget, over its RSS when warm with no
# model resident: MLX's buffer cache (bounded below at 16 MiB), the allocator's
# slack, the tokenizer and the grammar matchers' state.
RSS_SLACK = 48 * MiB


def weights_of(model_dir) -> int:
    return (model_dir / "model.safetensors").stat().st_size


def kv_for(model_dir, tokens: int) -> int:
    layout = kv_layout(json.loads((model_dir / "config.json").read_text()))
    assert layout is not None
    return layout.bytes_for(tokens)


def budget_gb(nbytes: int) -> float:
    return nbytes / GiB


def metrics_text(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics").read().decode()


class Stream(threading.Thread):
    """One unending generation (EOS masked by a grammar) of exactly NUM_PREDICT tokens."""

    def __init__(self, url: str, model: str):
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.lines: list[dict] = []
        self.status: int | None = None

    def run(self) -> None:
        body = json.dumps({"model": self.model, "prompt": "tell a long story", "options": {"num_predict": NUM_PREDICT}, **UNENDING})
        request = urllib.request.Request(self.url + "/api/generate", data=body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                self.status = r.status
                for line in r:
                    self.lines.append(json.loads(line))
        except urllib.error.HTTPError as e:
            self.status = e.code
            self.lines.append(json.loads(e.read()))

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.lines and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.lines, f"stream to {self.model} did not start"

    @property
    def served(self) -> bool:
        final = self.lines[-1] if self.lines else {}
        return self.status == 200 and final.get("done") is True and final.get("eval_count") == NUM_PREDICT and not any("error" in x for x in self.lines)


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def test_a_request_that_does_not_fit_waits_for_one_to_finish_and_rss_stays_in_budget(daemon, test_model):
    per_request = kv_for(test_model, NUM_PREDICT + 100)
    assert per_request == 3 * MiB
    budget = weights_of(test_model) + 2 * per_request + per_request // 2  # two fit, a third does not
    d = daemon(
        [{"name": "a", "source": str(test_model)}],
        memory={"budget_gb": budget_gb(budget), "prompt_cache_mb": 0, "mlx_cache_limit_gb": 16 / 1024},
        server={"queue_timeout": 300},
    )
    # Baseline: the daemon with its libraries warm (MLX, the model's code, the grammar
    # engine) and no model resident.
    warm_up = {"model": "a", "prompt": "hi", "stream": False, "keep_alive": 0, "options": {"num_predict": 2}, **UNENDING}
    assert call(d.url, "/api/generate", warm_up)[0] == 200
    deadline = time.monotonic() + 10
    while state_of(d.url, "a:latest")["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    baseline = psutil.Process(d.proc.pid).memory_info().rss
    sampler = RssSampler(d.proc.pid)
    sampler.start()
    first, second = Stream(d.url, "a"), Stream(d.url, "a")
    first.start()
    first.wait_started()
    second.start()
    second.wait_started()
    third = Stream(d.url, "a")
    third.start()
    deadline = time.monotonic() + 30
    while state_of(d.url, "a:latest")["active_requests"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    report = health(d.url)
    assert report["memory"]["reserved_bytes"] == 2 * per_request, report["memory"]
    assert not third.lines and not first.served, "the third request ran before one finished"
    assert 'mlx_server_admission_waits_total{reason="memory"} 1.0' in metrics_text(d.url)  # the third
    assert float(re.search(r'mlx_server_kv_cache_bytes\{model="a:latest"\} (\S+)', metrics_text(d.url)).group(1)) >= 2 * per_request
    for stream in (first, second, third):
        stream.join(300)
    sampler.stop.set()
    sampler.join()
    assert first.served and second.served and third.served, [s.lines[-1:] for s in (first, second, third)]
    assert health(d.url)["memory"]["reserved_bytes"] == 0
    assert sampler.peak - baseline < budget + RSS_SLACK, (sampler.peak - baseline, budget, RSS_SLACK)


def test_a_request_whose_kv_alone_exceeds_the_budget_is_a_400_at_once(daemon, test_model):
    budget = weights_of(test_model) + 4 * MiB  # 1024 tokens of KV at most
    d = daemon([{"name": "a", "source": str(test_model)}], memory={"budget_gb": budget_gb(budget)}, server={"queue_timeout": 60})
    started = time.monotonic()
    status, _, body = call(d.url, "/api/generate", {"model": "a", "prompt": "hi", "stream": False, "options": {"num_predict": 3000}})
    assert status == 400 and "can never fit in memory" in body["error"] and "3000 generated tokens" in body["error"]
    assert time.monotonic() - started < 30  # refused, not queued until queue_timeout
    # Without num_predict the sequence is cut to what fits and stops with done_reason "length".
    status, _, body = call(d.url, "/api/generate", {"model": "a", "prompt": "hi", "stream": False, **UNENDING})
    assert status == 200 and body["done_reason"] == "length"
    assert body["prompt_eval_count"] + body["eval_count"] == 1024


def test_the_idle_model_is_evicted_for_the_busy_ones_new_requests_never_the_busy_one(daemon, test_model, second_model):
    per_request = kv_for(test_model, NUM_PREDICT + 100)
    budget = weights_of(test_model) + weights_of(second_model) + per_request + per_request // 2
    d = daemon(
        [{"name": "idle", "source": str(second_model)}, {"name": "busy", "source": str(test_model)}],
        memory={"budget_gb": budget_gb(budget), "prompt_cache_mb": 0},
        server={"queue_timeout": 300},
    )
    assert call(d.url, "/api/generate", {"model": "idle", "prompt": "hi", "stream": False, "options": {"num_predict": 1}})[0] == 200
    first = Stream(d.url, "busy")
    first.start()
    first.wait_started()
    assert state_of(d.url, "idle:latest")["state"] == "ready"  # both models and one request's KV fit
    second = Stream(d.url, "busy")  # its KV does not fit beside the idle model
    second.start()
    second.wait_started()
    assert state_of(d.url, "idle:latest")["state"] == "unloaded"
    assert state_of(d.url, "busy:latest")["active_requests"] == 2
    first.join(300)
    second.join(300)
    assert first.served and second.served
    metrics = metrics_text(d.url)
    assert 'mlx_server_model_evictions_total{model="idle:latest",reason="lru"} 1.0' in metrics
    assert 'model="busy:latest",reason=' not in metrics
