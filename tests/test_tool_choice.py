"""`tool_choice` "required" / a named tool: the answer is forced to one tool call of
the model's own format, on OpenAI chat, Anthropic and (tests/test_responses_api.py)
Responses. The random-weight model never calls a tool by itself, so every call
here is the grammar's doing."""

from __future__ import annotations

import json

import pytest

from conftest import make_config
from mlx_server.errors import BadRequest
from mlx_server.structured import ToolCallConstraint

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def client(app_client, test_model):
    return await app_client(make_config([{"name": "demo", "source": str(test_model)}]))


def test_forcing_needs_the_named_tool_among_the_tools():
    with pytest.raises(BadRequest, match="no tools were given"):
        ToolCallConstraint([], None)
    with pytest.raises(BadRequest, match="'nope', which is not among"):
        ToolCallConstraint([WEATHER], "nope")


@pytest.mark.parametrize("choice, name", [("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")])
async def test_openai_chat_tool_choice_forces_a_call(client, choice, name):
    body = {"model": "demo", "messages": USER, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 60, "temperature": 0}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200, await r.text()
    choice0 = (await r.json())["choices"][0]
    (call,) = choice0["message"]["tool_calls"]
    assert choice0["finish_reason"] == "tool_calls"
    assert call["function"]["name"] in ((name,) if name else ("get_weather", "get_time"))
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    else:
        assert arguments == {}


async def test_openai_chat_streams_the_forced_call(client):
    body = {"model": "demo", "messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "stream": True, "temperature": 0}
    r = await client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
async def test_anthropic_tool_choice_forces_a_tool_use_block(client, choice):
    tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}, {"name": "noop", "input_schema": {"type": "object"}}]
    body = {"model": "demo", "max_tokens": 60, "messages": USER, "tools": tools, "tool_choice": choice, "temperature": 0}
    r = await client.post("/v1/messages", json=body)
    assert r.status == 200, await r.text()
    message = await r.json()
    uses = [b for b in message["content"] if b["type"] == "tool_use"]
    assert len(uses) == 1 and message["stop_reason"] == "tool_use"
    if choice["type"] == "tool":
        assert uses[0]["name"] == "get_weather" and isinstance(uses[0]["input"]["city"], str)


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "no tools were given"),
        ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "tool_choice": "sometimes"}, "'tool_choice' must be"),
        ("/v1/messages", {"max_tokens": 5, "messages": USER, "tool_choice": {"type": "any"}}, "no tools were given"),
        ("/v1/messages", {"max_tokens": 5, "messages": USER, "tools": [{"name": "t"}], "tool_choice": {"type": "tool", "name": "u"}}, "'u'"),
        ("/v1/messages", {"max_tokens": 5, "messages": USER, "tools": [{"name": "t"}], "tool_choice": {"type": "maybe"}}, "'tool_choice' must be"),
    ],
)
async def test_bad_tool_choices_are_400s_that_say_why(client, path, body, fragment):
    r = await client.post(path, json={"model": "demo", **body})
    assert r.status == 400
    assert fragment in await r.text()
