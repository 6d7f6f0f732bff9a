"""What Claude Code needs of /v1/messages beyond the basics (issue 14): system turns
inside `messages`, Anthropic's wording for a prompt over the context, pings while a
prompt prefills, and token counts that load nothing."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import make_config
from mlx_server.api import anthropic

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
async def client(app_client, test_model):
    config = make_config([{"name": "demo", "source": str(test_model), "context_length": 64}])
    return await app_client(config)


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_system_messages_inside_messages_keep_their_place():
    converted = anthropic.anthropic_messages(
        [{"role": "user", "content": "a"}, {"role": "system", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": "b"}],
        "top",
    )
    assert [m["role"] for m in converted] == ["system", "user", "system", "user"]
    assert converted[2]["content"] == "be brief"


async def test_a_system_message_inside_messages_is_answered(client):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "c"}]
    r = await client.post("/v1/messages", json={"model": "demo", "max_tokens": 3, "messages": messages})
    assert r.status == 200, await r.text()
    r = await client.post("/v1/messages", json={"model": "demo", "max_tokens": 3, "messages": [{"role": "tool", "content": "x"}]})
    assert r.status == 400 and "'user', 'assistant' or 'system'" in await r.text()


async def test_a_prompt_over_the_context_gets_anthropics_wording(client):
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}]
    r = await client.post("/v1/messages", json={"model": "demo", "max_tokens": 3, "messages": long})
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: ") and error["message"].endswith(" tokens > 64 maximum")


async def test_with_pings_fills_silences_and_loses_nothing():
    async def slow():
        for i in range(3):
            await asyncio.sleep(0.05 if i == 1 else 0)
            yield i

    got = [item async for item in anthropic.with_pings(slow(), 0.01)]
    assert [g for g in got if g is not None] == [0, 1, 2]
    assert None in got[1 : got.index(1)]


async def test_a_stream_pings_while_waiting_for_tokens(client, monkeypatch):
    monkeypatch.setattr(anthropic, "PING_SECONDS", 0.0005)
    r = await client.post("/v1/messages", json={"model": "demo", "max_tokens": 4, "messages": USER, "stream": True})
    kinds = [kind for kind, _ in events(await r.text())]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "ping" in kinds
    assert all(data == {"type": "ping"} for kind, data in events(await r.text()) if kind == "ping")


async def test_count_tokens_loads_nothing(client):
    r = await client.post("/v1/messages/count_tokens", json={"model": "demo", "messages": USER, "system": "s"})
    assert r.status == 200 and (await r.json())["input_tokens"] > 3
    assert (await (await client.get("/api/ps")).json())["models"] == []
    r = await client.post("/v1/messages", json={"model": "demo", "max_tokens": 1, "messages": USER, "system": "s"})
    assert (await r.json())["usage"]["input_tokens"] == (await (await client.post("/v1/messages/count_tokens", json={"model": "demo", "messages": USER, "system": "s"})).json())["input_tokens"]
