"""The old MLX API Server's callers, unchanged, against a live daemon.

The client sends exactly what those callers send: `/api/generate` bodies with
`prompt`, `max_tokens`, `temperature`, sometimes `category`, never `stream` or
`model`, and the `X-Request-Priority` header; `/health`, `/queue/stats` and
`/api/models/{name}`. Ollama bodies keep Ollama's behaviour.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import httpx
import pytest

from mlx_server.testing import DaemonProcess, write_config

pytestmark = pytest.mark.live

# A request that cannot end early: the random model could emit EOS at any token, but a
# grammar that needs a million-character string masks EOS until the token budget runs out.
UNENDING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 10**6}}, "required": ["text"]}
CHAT = "chat-model:latest"
CODER = "coder:latest"


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model, second_model):
    """`chat-model` (one slot, the default) and `coder` (the `coding` category)."""
    config = write_config(
        tmp_path_factory.mktemp("old-api") / "models.yaml",
        [
            {"name": "chat-model", "source": str(test_model), "max_concurrency": 1, "preload": True, "keep_alive": -1},
            {"name": "coder", "source": str(second_model), "preload": True, "keep_alive": -1, "priority": "low"},
        ],
        default_model="chat-model",
        categories={"coding": "coder", "fast": "chat-model"},
    )
    with DaemonProcess(config) as daemon:
        daemon.wait_ready("chat-model")
        daemon.wait_ready("coder")
        yield daemon


def post(live, body: dict, priority: str | None = None, path: str = "/api/generate") -> httpx.Response:
    headers = {"X-Request-Priority": priority} if priority else {}
    return httpx.post(live.url + path, json=body, headers=headers, timeout=120)


def test_the_old_callers_body_gets_one_json_answer_from_the_default_model(live):
    r = post(live, {"prompt": "Hello there", "max_tokens": 8, "temperature": 0.7}, "high")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    answer = r.json()
    assert isinstance(answer["response"], str) and answer["model"] == CHAT and answer["done"] is True
    assert 1 <= answer["eval_count"] <= 8


def test_max_tokens_bounds_eval_count_exactly(live):
    r = post(live, {"prompt": "Count", "max_tokens": 16, "temperature": 0.2, "format": UNENDING})
    assert r.status_code == 200 and r.json()["eval_count"] == 16  # not the 3,654 it used to be


def test_a_category_picks_its_configured_model(live):
    r = post(live, {"prompt": "def add(a, b):", "category": "coding", "max_tokens": 4}, "low")
    assert r.status_code == 200 and r.json()["model"] == CODER and r.json()["done"] is True
    r = post(live, {"prompt": "hi", "category": "FAST", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == CHAT


def test_chat_without_a_model_goes_to_the_default_model(live):
    r = post(live, {"messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 2}}, "high", path="/api/chat")
    assert r.status_code == 200 and r.json()["model"] == CHAT and r.json()["message"]["role"] == "assistant"


def test_stream_true_gives_ndjson_pieces_then_done(live):
    with httpx.stream("POST", live.url + "/api/generate", json={"prompt": "Tell me", "max_tokens": 6, "stream": True, "format": UNENDING},
                      headers={"X-Request-Priority": "medium"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    pieces, last = lines[:-1], lines[-1]
    assert pieces and all(p["done"] is False and isinstance(p["response"], str) for p in pieces)
    assert last["done"] is True and last["eval_count"] == 6
    assert "".join(p["response"] for p in pieces).startswith("{")


def test_an_ollama_body_keeps_ollama_behaviour(live):
    """No old-server field and a model: streamed by default, num_predict from options."""
    with httpx.stream("POST", live.url + "/api/generate", json={"model": "chat-model", "prompt": "hi", "format": UNENDING, "options": {"num_predict": 3}},
                      timeout=120) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) == 4 and lines[-1]["done"] is True and lines[-1]["eval_count"] == 3 and "context" in lines[-1]


def test_mistakes_are_400s_and_404s_that_say_what_to_do(live):
    r = post(live, {"prompt": "hi", "category": "poetry", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"] == "unknown category 'poetry': models.yaml maps these categories: coding, fast; or name a 'model'"
    r = post(live, {"prompt": "hi", "model": "gpt-4", "max_tokens": 2})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]  # never answered by another model
    r = post(live, {"prompt": "hi", "max_tokens": 2}, "urgent")
    assert r.status_code == 400 and r.json()["error"] == "'X-Request-Priority' must be one of high, medium, low, got 'urgent'"
    r = post(live, {"prompt": "hi", "max_tokens": 2, "priority": "asap"})
    assert r.status_code == 400 and r.json()["error"] == "'priority' must be one of high, medium, low, got 'asap'"
    r = post(live, {"prompt": "hi", "max_tokens": "lots"})
    assert r.status_code == 400 and "'max_tokens'" in r.json()["error"]
    r = post(live, {"prompt": "hi", "temperature": -1})
    assert r.status_code == 400 and "'temperature'" in r.json()["error"]


def test_health_speaks_the_old_servers_fields(live):
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "healthy"
    assert health["active_requests"] == 0 and health["max_concurrent"] == 1 + 8
    memory = health["memory"]
    assert 0 < memory["used_percent"] < 100 and 0 < memory["available_gb"] < memory["total_gb"]
    cached = {m["name"]: m for m in health["cached_models"]}
    assert cached[CHAT] == {"name": CHAT, "active_requests": 0, "is_loading": False} and CODER in cached
    assert health["loading_models"] == [] and health["active_model_requests"] == {}
    assert {m["name"] for m in health["models"]} == {CHAT, CODER}  # today's fields stay


def test_model_check_and_queue_stats(live):
    assert httpx.get(live.url + "/api/models/chat-model").json() == {"name": "chat-model", "exists": True, "loaded": True, "model": CHAT, "state": "ready"}
    assert httpx.get(live.url + "/api/models/nope").json() == {"name": "nope", "exists": False, "loaded": False}
    stats = httpx.get(live.url + "/queue/stats").json()
    assert stats["queue_length"] == 0 and stats["by_priority"] == {"high": 0, "medium": 0, "low": 0}
    assert {m["name"] for m in stats["models"]} == {CHAT, CODER}


async def wait_for_queue(client: httpx.AsyncClient, want: dict[str, int]) -> None:
    for _ in range(600):
        by_priority = (await client.get("/queue/stats")).json()["by_priority"]
        if all(by_priority[k] == v for k, v in want.items()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"queue never reached {want}: {by_priority}")


async def test_a_high_request_is_served_before_five_waiting_lows(live):
    """max_concurrency 1: a stream holds the slot, five lows queue, then one high; the
    slot is freed and the completion times the daemon stamped give the order served."""
    async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
        holder = {"model": "chat-model", "prompt": "hold", "format": UNENDING, "options": {"num_predict": 100_000}}
        async with client.stream("POST", "/api/generate", json=holder) as held:
            lines = held.aiter_lines()
            assert json.loads(await anext(lines))["done"] is False  # running: the slot is taken
            tasks: dict[str, asyncio.Task] = {}
            for i in range(5):
                tasks[f"low{i}"] = asyncio.create_task(client.post("/api/generate", json={"prompt": f"background job {i}", "max_tokens": 3},
                                                                   headers={"X-Request-Priority": "low"}))
                await wait_for_queue(client, {"low": i + 1})
            tasks["high"] = asyncio.create_task(client.post("/api/generate", json={"prompt": "the user is waiting", "max_tokens": 3},
                                                            headers={"X-Request-Priority": "high"}))
            await wait_for_queue(client, {"high": 1, "low": 5})
        # leaving the block closes the stream: the holder's lease ends and the slot is free
        answers = {name: (await task) for name, task in tasks.items()}
        metrics = (await client.get("/metrics")).text
        waits = (await client.get("/queue/stats")).json()["waits"]
    assert all(r.status_code == 200 and r.json()["model"] == CHAT for r in answers.values())
    finished = sorted(answers, key=lambda name: datetime.fromisoformat(answers[name].json()["created_at"]))
    assert finished == ["high", "low0", "low1", "low2", "low3", "low4"]
    assert 'mlx_server_queue_wait_seconds_count{priority="high"}' in metrics
    assert 'mlx_server_queue_depth{priority="low"} 0.0' in metrics
    assert waits["high"]["served"] >= 1 and waits["low"]["served"] >= 5
    assert 0 < waits["high"]["mean_seconds"] <= waits["low"]["mean_seconds"]  # waited, but less than the lows
