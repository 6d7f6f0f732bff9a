"""The Anthropic Messages API against a live daemon, with the official `anthropic` client.

The daemon has an API key, as a Docker-facing one would: the client sends it as
`x-api-key`, the way Claude Code does through ANTHROPIC_BASE_URL.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

pytestmark = pytest.mark.live

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello! How can I help you today?"}]
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True}]
    with ready_daemon(tmp_path_factory.mktemp("anthropic"), models, server={"api_key": KEY}) as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key=KEY, timeout=60, max_retries=0)


def test_message_shape_with_real_token_counts(client):
    m = client.messages.create(model="demo", max_tokens=6, messages=HELLO, **GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "demo"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 6
    assert m.usage.input_tokens == client.messages.count_tokens(model="demo", messages=HELLO).input_tokens


def test_system_as_a_string_or_blocks_is_the_same_prompt(client):
    bare = client.messages.count_tokens(model="demo", messages=HELLO).input_tokens
    text = client.messages.create(model="demo", max_tokens=1, system="You are terse.", messages=HELLO)
    blocks = client.messages.create(model="demo", max_tokens=1, system=[{"type": "text", "text": "You are terse."}], messages=HELLO)
    assert text.usage.input_tokens == blocks.usage.input_tokens > bare


def test_streaming_event_sequence(live):
    body = {"model": "demo", "max_tokens": 5, "messages": HELLO, "stream": True, "temperature": 0}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in filter(None, raw.split("\n\n")):
        name_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        events.append(data)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[0]["message"]["usage"]["input_tokens"] > 5
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == 5


def test_the_sdk_stream_matches_the_whole_message(client):
    whole = client.messages.create(model="demo", max_tokens=8, messages=HELLO, **GREEDY)
    with client.messages.stream(model="demo", max_tokens=8, messages=HELLO, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stop_sequences_name_the_one_that_matched(client):
    text = client.messages.create(model="demo", max_tokens=16, messages=HELLO, **GREEDY).content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    m = client.messages.create(model="demo", max_tokens=16, messages=HELLO, stop_sequences=["zzzz-never", stop], **GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)]


def test_a_conversation_with_assistant_turns(client):
    turns = HELLO + [{"role": "assistant", "content": [{"type": "text", "text": "Why is the sky blue?"}]}, {"role": "user", "content": "Write a haiku about the sea."}]
    m = client.messages.create(model="demo", max_tokens=2, messages=turns)
    assert m.usage.input_tokens > client.messages.count_tokens(model="demo", messages=HELLO).input_tokens + 10


def test_an_unknown_model_is_404_in_anthropics_error_shape(client, live):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus-4", max_tokens=5, messages=HELLO)
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "model 'claude-opus-4' not found"}}
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-opus-4", messages=HELLO)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"messages": HELLO}, "'max_tokens' is required"),
        ({"max_tokens": 0, "messages": HELLO}, "'max_tokens' must be at least 1"),
        ({"max_tokens": 5, "messages": [{"role": "developer", "content": "x"}]}, "'messages[0].role'"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "text only"),
        ({"max_tokens": 5, "messages": HELLO, "system": 5}, "'system' must be a string"),
        ({"max_tokens": 5, "messages": HELLO, "thinking": {"type": "sometimes"}}, "'thinking.type'"),
        ({"max_tokens": 5, "messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"max_tokens": 5, "messages": HELLO, "stop_sequences": "END"}, "'stop_sequences' must be an array"),
    ],
)
def test_bad_requests_are_400s_in_anthropics_shape(live, body, fragment):
    r = httpx.post(live.url + "/v1/messages", json={"model": "demo"} | body, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


def test_count_tokens_checks_its_body_too(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.count_tokens(model="demo", messages=[])
    assert "'messages' must be a non-empty array" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.count_tokens(model="demo", messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}])
    assert "'messages[0].content[0].content'" in e.value.message


def test_the_api_key_is_required(live):
    wrong = anthropic.Anthropic(base_url=live.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model="demo", max_tokens=1, messages=HELLO)
    assert e.value.body["error"]["type"] == "authentication_error"
