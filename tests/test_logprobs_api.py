"""logprobs / top_logprobs on /api/generate, /api/chat (Ollama's shape) and the OpenAI
routes (OpenAI's shapes). The engine is replaced by one that emits synthetic events,
so these check the API side only: the request reaches the engine with the right
`logprobs`, and each API formats what comes back in its own shape."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import make_config

from mlx_server.api.keys import ENGINE
from mlx_server.jobs import DoneEvent, GenerationJob, TextEvent, TokenLogprob, TopLogprob
from mlx_server.logprobs import LogprobTap, chat_logprobs, completion_logprobs, ollama_logprobs

HEL = TokenLogprob("Hel", 7, -0.5, (TopLogprob("Hel", 7, -0.5), TopLogprob("He", 6, -1.5)))
LO = TokenLogprob("lo", 9, -0.25, (TopLogprob("lo", 9, -0.25), TopLogprob("p", 3, -2.0)))
EVENTS = [TextEvent("Hel", (HEL,)), TextEvent("lo", (LO,)), DoneEvent("stop", 5, 0, 2, (7, 9), 0.01, 0.01)]


@pytest.fixture
async def client(app_client, test_model):
    client = await app_client(make_config([{"name": "demo", "source": str(test_model)}]))
    engine = client.app[ENGINE]
    requests = []

    def generate(request):
        requests.append(request)
        job = GenerationJob(request, asyncio.get_running_loop())
        for event in EVENTS:
            job.queue.put_nowait(event)
        return job

    engine.generate = generate
    client.requests = requests
    return client


def test_formatting_in_each_apis_shape():
    assert ollama_logprobs([HEL]) == [
        {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108], "top_logprobs": [
            {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]}, {"token": "He", "logprob": -1.5, "bytes": [72, 101]}]}
    ]
    assert chat_logprobs([HEL, LO])["content"][1]["top_logprobs"][1] == {"token": "p", "logprob": -2.0, "bytes": [112]}
    assert chat_logprobs([])["refusal"] is None
    assert completion_logprobs([HEL, LO], 3) == {
        "tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"Hel": -0.5, "He": -1.5}, {"lo": -0.25, "p": -2.0}], "text_offset": [3, 6],
    }


async def test_the_tap_hands_out_each_token_once():
    async def events():
        for e in EVENTS:
            yield e

    tap = LogprobTap()
    seen = []
    async for _ in tap.tap(events()):
        seen.append(tap.take())
    assert seen == [[HEL], [LO], []] and tap.all == [HEL, LO]


async def test_ollama_generate_and_chat(client):
    r = await client.post("/api/generate", json={"model": "demo", "prompt": "hi", "stream": False, "logprobs": True, "top_logprobs": 2})
    body = await r.json()
    assert client.requests[-1].logprobs == 2
    assert body["response"] == "Hello" and [e["token"] for e in body["logprobs"]] == ["Hel", "lo"]
    assert body["logprobs"][0]["top_logprobs"][1]["token"] == "He"
    r = await client.post("/api/chat", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert client.requests[-1].logprobs == 0
    assert [line["logprobs"][0]["token"] for line in lines[:-1]] == ["Hel", "lo"] and lines[-1]["logprobs"] == []
    r = await client.post("/api/chat", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert client.requests[-1].logprobs is None and "logprobs" not in await r.json()


async def test_openai_chat(client):
    messages = [{"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json={"model": "demo", "messages": messages, "logprobs": True, "top_logprobs": 1})
    choice = (await r.json())["choices"][0]
    assert client.requests[-1].logprobs == 1
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["Hel", "lo"]
    r = await client.post("/v1/chat/completions", json={"model": "demo", "messages": messages, "logprobs": True, "stream": True})
    chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    tokens = [e["token"] for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert tokens == ["Hel", "lo"]
    r = await client.post("/v1/chat/completions", json={"model": "demo", "messages": messages})
    assert (await r.json())["choices"][0]["logprobs"] is None and client.requests[-1].logprobs is None


async def test_openai_completions(client):
    r = await client.post("/v1/completions", json={"model": "demo", "prompt": "Say", "logprobs": 2, "echo": True})
    choice = (await r.json())["choices"][0]
    assert client.requests[-1].logprobs == 2
    assert choice["text"] == "SayHello" and choice["logprobs"]["text_offset"] == [3, 6]
    r = await client.post("/v1/completions", json={"model": "demo", "prompt": "Say", "logprobs": 0, "stream": True})
    chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    pieces = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [p["tokens"] for p in pieces] == [["Hel"], ["lo"]] and [p["text_offset"] for p in pieces] == [[0], [3]]


@pytest.mark.parametrize(
    "path, extra, fragment",
    [
        ("/api/generate", {"prompt": "x", "logprobs": True, "top_logprobs": 21}, "'top_logprobs'"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs 'logprobs': true"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "'logprobs' must be a boolean"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "from 0 to 5"),
    ],
)
async def test_bad_logprob_requests(client, path, extra, fragment):
    r = await client.post(path, json={"model": "demo", **extra})
    assert r.status == 400 and fragment in await r.text()
