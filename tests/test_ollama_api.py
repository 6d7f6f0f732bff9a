"""The Ollama API in-process: routes, NDJSON streaming, load/unload, errors, leases."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest
from conftest import make_config

from mlx_server.api.keys import ENGINE

GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture
async def client(app_client, test_model):
    config = make_config(
        [{"name": "demo", "source": str(test_model), "preload": True, "aliases": ["tiny"], "options": {"temperature": 0.5}}],
        defaults={"keep_alive": "5m"},
    )
    client = await app_client(config)
    await wait_state(client, "demo:latest", "ready")
    return client


async def wait_state(client, name: str, wanted: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = await (await client.get("/health")).json()
        model = next(m for m in health["models"] if m["name"] == name)
        if model["state"] == wanted:
            return model
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never became {wanted}: {model}")


async def ndjson(response) -> list[dict]:
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    body = await response.text()
    assert body.endswith("\n") and "\n\n" not in body, "NDJSON must never contain a blank line"
    return [json.loads(line) for line in body.splitlines()]


def check_final(chunk: dict) -> None:
    assert chunk["done"] is True and chunk["done_reason"] in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(chunk[key], int) and chunk[key] >= 0, key
    assert chunk["created_at"].endswith("Z") and "T" in chunk["created_at"]


async def test_root_version_and_head(client):
    r = await client.get("/")
    assert r.status == 200 and await r.text() == "Ollama is running"
    assert (await client.head("/")).status == 200
    assert "version" in await (await client.get("/api/version")).json()


async def test_tags_show_ps(client, test_model):
    tags = await (await client.get("/api/tags")).json()
    (entry,) = tags["models"]
    assert entry["name"] == "demo:latest" and entry["size"] == (test_model / "model.safetensors").stat().st_size
    assert entry["details"]["family"] == "llama" and len(entry["digest"]) == 64
    show = await (await client.post("/api/show", json={"model": "tiny"})).json()
    assert show["model_info"]["general.architecture"] == "llama"
    assert show["model_info"]["llama.embedding_length"] == 256
    assert "tools" in show["capabilities"] and "<|im_start|>" in show["template"]
    assert "temperature 0.5" in show["parameters"]
    ps = await (await client.get("/api/ps")).json()
    (running,) = ps["models"]
    assert running["name"] == "demo:latest" and running["size"] > 9_000_000 and running["size_vram"] == 0
    assert running["context_length"] == 4096 and running["details"]["parameter_size"].endswith("M")
    assert running["expires_at"].endswith("Z") and running["active_requests"] == 0


async def test_generate_streams_ndjson_and_matches_non_streaming(client):
    body = {"model": "demo", "prompt": "Why is the sky blue?", "options": GREEDY}
    chunks = await ndjson(await client.post("/api/generate", json=body))
    assert all(c["model"] == "demo" for c in chunks)
    assert all(c["done"] is False for c in chunks[:-1]) and len(chunks) > 2
    check_final(chunks[-1])
    assert chunks[-1]["eval_count"] == 12 and chunks[-1]["done_reason"] == "length"
    streamed = "".join(c["response"] for c in chunks)
    single = await (await client.post("/api/generate", json={**body, "stream": False})).json()
    check_final(single)
    assert single["response"] == streamed
    assert isinstance(single["context"], list) and len(single["context"]) == single["prompt_eval_count"] + 12


async def test_generate_system_raw_and_context(client):
    base = {"model": "demo", "stream": False, "options": GREEDY}
    plain = await (await client.post("/api/generate", json={**base, "prompt": "hi"})).json()
    with_system = await (await client.post("/api/generate", json={**base, "prompt": "hi", "system": "Be brief."})).json()
    raw = await (await client.post("/api/generate", json={**base, "prompt": "hi", "raw": True})).json()
    assert with_system["prompt_eval_count"] > plain["prompt_eval_count"] > raw["prompt_eval_count"]
    follow = await (await client.post("/api/generate", json={**base, "prompt": "more", "context": plain["context"]})).json()
    assert follow["prompt_eval_count"] > len(plain["context"])


async def test_chat_streams_with_template_roles_and_turns(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And now?"},
    ]
    chunks = await ndjson(await client.post("/api/chat", json={"model": "demo", "messages": messages, "options": GREEDY}))
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    check_final(chunks[-1])
    one_turn = await (await client.post("/api/chat", json={"model": "demo", "messages": messages[1:2], "options": GREEDY, "stream": False})).json()
    assert chunks[-1]["prompt_eval_count"] > one_turn["prompt_eval_count"]
    assert one_turn["message"]["content"] and one_turn["done"] is True


async def test_tokens_leave_while_generation_is_still_running(client):
    """Real streaming: the first line arrives while the request still holds its lease."""
    body = {"model": "demo", "prompt": "stream please", "options": {"num_predict": 400, "temperature": 0}}
    async with client.post("/api/generate", json=body) as r:
        first = json.loads(await r.content.readline())
        assert first["done"] is False
        health = await (await client.get("/health")).json()
        assert health["models"][0]["active_requests"] == 1
        rest = (await r.read()).decode().splitlines()
    assert json.loads(rest[-1])["done"] is True and len(rest) > 100


async def test_stop_option_and_num_predict(client):
    full = await (await client.post("/api/generate", json={"model": "demo", "prompt": "x", "stream": False, "options": {"temperature": 0, "num_predict": 30}})).json()
    stop = full["response"][5:8]
    cut = await (await client.post("/api/generate", json={"model": "demo", "prompt": "x", "stream": False, "options": {"temperature": 0, "num_predict": 30, "stop": [stop]}})).json()
    assert cut["done_reason"] == "stop" and cut["response"] == full["response"][: full["response"].index(stop)]


async def test_empty_prompt_loads_and_keep_alive_zero_unloads(client):
    r = await (await client.post("/api/generate", json={"model": "demo", "keep_alive": 0})).json()
    assert r["done"] is True and r["done_reason"] == "unload"
    await wait_state(client, "demo:latest", "unloaded")
    assert (await (await client.get("/api/ps")).json())["models"] == []
    r = await (await client.post("/api/chat", json={"model": "demo", "messages": [], "keep_alive": "10m"})).json()
    assert r["done_reason"] == "load" and r["message"]["content"] == ""
    (running,) = (await (await client.get("/api/ps")).json())["models"]
    assert running["name"] == "demo:latest"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "invalid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"\xff\xfe", 400, "not valid UTF-8"),
        (b"", 400, "body is empty"),
        (json.dumps({"prompt": "hi"}).encode(), 400, "'model' is required"),
        (json.dumps({"model": 5, "prompt": "hi"}).encode(), 400, "'model' must be a string"),
        (json.dumps({"model": "demo", "prompt": 5}).encode(), 400, "'prompt' must be a string"),
        (json.dumps({"model": "demo", "prompt": "a", "stream": "yes"}).encode(), 400, "'stream' must be a boolean"),
        (json.dumps({"model": "demo", "prompt": "a", "options": {"temperature": "hot"}}).encode(), 400, "option 'temperature' must be a number"),
        (json.dumps({"model": "demo", "prompt": "a", "options": {"num_predict": -7}}).encode(), 400, "option 'num_predict'"),
        (json.dumps({"model": "demo", "prompt": "a", "keep_alive": "soon"}).encode(), 400, "'keep_alive'"),
        (json.dumps({"model": "demo", "prompt": "a", "context": ["x"]}).encode(), 400, "'context'"),
        (json.dumps({"model": "demo", "prompt": "a", "template": "{{ .Prompt }}"}).encode(), 400, "'template'"),
        (json.dumps({"model": "demo", "prompt": "a", "suffix": "b"}).encode(), 400, "does not support insert"),
        (json.dumps({"model": "demo", "prompt": "a", "options": {"num_ctx": 4}}).encode(), 400, "context window is 4 tokens"),
        (json.dumps({"model": "llama3", "prompt": "hi"}).encode(), 404, "model 'llama3' not found"),
    ],
)
async def test_bad_generate_requests_name_what_is_wrong(client, body, status, fragment):
    r = await client.post("/api/generate", data=body, headers={"Content-Type": "application/json"})
    assert r.status == status
    error = (await r.json())["error"]
    assert fragment in error


async def test_bad_chat_messages_name_the_message(client):
    for messages, fragment in [
        ("hi", "'messages' must be an array"),
        ([{"role": "wizard", "content": "x"}], "'messages[0].role' must be one of"),
        ([{"role": "user", "content": 7}], "'messages[0].content' must be a string"),
        ([1], "'messages[0]' must be an object"),
    ]:
        r = await client.post("/api/chat", json={"model": "demo", "messages": messages})
        assert r.status == 400 and fragment in (await r.json())["error"]
    r = await client.post("/api/chat", json={"model": "nope:7b", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 404 and (await r.json())["error"] == "model 'nope:7b' not found"


async def test_unknown_routes_and_methods_are_json_errors(client):
    r = await client.get("/api/nothing")
    assert r.status == 404 and "no route" in (await r.json())["error"]
    r = await client.get("/api/generate")
    assert r.status == 405 and "not allowed" in (await r.json())["error"]


async def test_disconnect_mid_stream_releases_the_lease(client):
    body = {"model": "demo", "prompt": "never ending", "options": {"num_predict": 100_000}}
    for _ in range(5):
        response = await client.post("/api/generate", json=body)
        await response.content.readline()
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = await (await client.get("/health")).json()
        if health["models"][0]["active_requests"] == 0 and client.app[ENGINE].stats.models["demo:latest"].sequences == 0:
            break
        await asyncio.sleep(0.02)
    assert health["models"][0]["active_requests"] == 0
    assert client.app[ENGINE].stats.models["demo:latest"].sequences == 0


async def test_health_answers_quickly_while_generating(client):
    body = {"model": "demo", "prompt": "busy", "options": {"num_predict": 2000}}
    streams = [asyncio.create_task(client.post("/api/generate", json=body)) for _ in range(4)]
    await asyncio.sleep(0.2)
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        assert (await client.get("/health")).status == 200
        timings.append(time.perf_counter() - started)
    for task in streams:
        (await task).close()
    assert statistics.median(timings) < 0.1, timings
