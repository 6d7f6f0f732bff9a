"""The OpenAI Responses API (/v1/responses) against a live daemon, read back with the
official `openai` client's own types (responses.create and responses.stream)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from mlx_server.api.responses import ResponseNotFound, ResponseStore, input_messages, response_tools

pytestmark = pytest.mark.live

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False},
    "strict": True,
}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}, "required": ["answer", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True}]
    with ready_daemon(tmp_path_factory.mktemp("responses"), models) as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_create_with_a_string_input(client):
    r = client.responses.create(model="demo", input="Hello!", max_output_tokens=5, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "demo"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.output_text == message.content[0].text and r.output_text
    assert r.usage.output_tokens == 5 and r.usage.input_tokens > 3 and r.usage.total_tokens == r.usage.input_tokens + 5


def test_items_instructions_and_roles_reach_the_prompt(client):
    items = [
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "user", "content": "Thanks"},
    ]
    bare = client.responses.create(model="demo", input="Thanks", max_output_tokens=1)
    full = client.responses.create(model="demo", input=items, instructions="You are kind.", tools=[WEATHER], max_output_tokens=1)
    assert full.usage.input_tokens > bare.usage.input_tokens + 40
    assert full.instructions == "You are kind." and full.tools[0].name == "get_weather"


def test_tool_choice_required_makes_a_function_call(client):
    r = client.responses.create(model="demo", input="Weather in Paris?", tools=[WEATHER], tool_choice="required", max_output_tokens=60, temperature=0)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and r.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    named = client.responses.create(model="demo", input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0)
    assert [item.type for item in named.output] == ["function_call"]


def test_json_schema_output_parses(client):
    text = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    r = client.responses.create(model="demo", input="Answer", text=text, max_output_tokens=40, temperature=0, reasoning={"effort": "low"}, include=["reasoning.encrypted_content"])
    value = json.loads(r.output_text)
    assert set(value) == {"answer", "ok"} and isinstance(value["answer"], int) and isinstance(value["ok"], bool)


def test_hosted_tools_are_left_out_with_a_warning(client, live):
    body = {"model": "demo", "input": "x", "max_output_tokens": 1, "tools": [{"type": "web_search"}, WEATHER]}
    r = httpx.post(live.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 200
    assert r.json()["warnings"] == ["tools[0]: web_search tools cannot run on this server; left out of the prompt"]


def test_previous_response_id_continues_the_conversation_and_unknown_ids_are_400_as_openai_answers(client):
    first = client.responses.create(model="demo", input="My name is Ada.", max_output_tokens=3)
    second = client.responses.create(model="demo", input="What is my name?", previous_response_id=first.id, max_output_tokens=1)
    alone = client.responses.create(model="demo", input="What is my name?", max_output_tokens=1)
    assert second.usage.input_tokens > alone.usage.input_tokens + 3 and second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).id == first.id
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="demo", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id" and "Previous response with id 'resp_nope' not found" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    unstored = client.responses.create(model="demo", input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_stream_event_sequence(client):
    with client.responses.stream(model="demo", input="Hello!", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"  # cut by the budget
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") < kinds.index("response.output_item.done")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == 6 and final.status == "incomplete"
    text_format = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    with client.responses.stream(model="demo", input="Answer", text=text_format, max_output_tokens=100, temperature=0) as stream:
        done = stream.get_final_response()  # needs response.completed: the grammar ends the answer
    assert set(json.loads(done.output_text)) == {"answer", "ok"} and done.status == "completed"


def test_streamed_function_call(client):
    with client.responses.stream(model="demo", input="Weather?", tools=[WEATHER], tool_choice="required", max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == json.loads(next(e.arguments for e in events if e.type == "response.function_call_arguments.done"))


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "'input' is required"),
        ({"input": [{"type": "image_generation_call"}]}, "'input[0].type'"),
        ({"input": [{"role": "robot", "content": "x"}]}, "'input[0].role'"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "'text.format.type'"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "'reasoning.effort'"),
        ({"input": "x", "max_output_tokens": 0}, "'max_output_tokens'"),
        ({"input": "x", "tool_choice": "required"}, "no tools"),
    ],
)
def test_bad_requests_are_400s_in_openais_shape(live, body, fragment):
    r = httpx.post(live.url + "/v1/responses", json={"model": "demo", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_the_store_is_bounded_in_count_and_age():
    now = [0.0]
    store = ResponseStore(size=2, ttl=10, clock=lambda: now[0])
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
    with pytest.raises(Exception, match="r0"):
        store.get("r0")
    assert store.get("r2").response == {"id": "r2"}
    now[0] = 11
    with pytest.raises(Exception, match="r2"):
        store.get("r2")


def test_the_store_is_bounded_in_bytes_oldest_first():
    store = ResponseStore(max_bytes=1000)
    conversation = [{"role": "user", "content": "x" * 300}]  # 345 bytes of JSON with its response: two fit
    for i in range(4):
        store.put({"id": f"r{i}"}, conversation)
    for evicted in ("r0", "r1"):
        with pytest.raises(ResponseNotFound, match=evicted):
            store.get(evicted)
    assert [store.get(f"r{i}").conversation for i in (2, 3)] == [conversation, conversation]
    store.delete("r2")
    store.put({"id": "r4"}, conversation)
    assert store.get("r3").response == {"id": "r3"}  # the deleted response's bytes were given back
    store.put({"id": "huge"}, [{"role": "user", "content": "x" * 1000}])
    with pytest.raises(ResponseNotFound, match="huge"):
        store.get("huge")
    assert store.get("r3").response == {"id": "r3"}  # too large to keep, so it evicted nothing


def test_function_calls_join_the_assistant_turn_and_outputs_learn_their_names():
    names: dict[str, str] = {}
    items = [
        {"type": "message", "role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ]
    converted = input_messages(items, names)
    assert [m["role"] for m in converted] == ["assistant", "tool"]
    assert [c["function"]["name"] for c in converted[0]["tool_calls"]] == ["f", "g"]
    assert converted[1] == {"role": "tool", "content": "2", "tool_call_id": "b", "name": "g"}
    tools, warnings = response_tools([WEATHER, {"type": "namespace", "name": "x"}])
    assert tools[0]["function"]["name"] == "get_weather" and warnings == ["tools[1]: namespace tools cannot run on this server; left out of the prompt"]
