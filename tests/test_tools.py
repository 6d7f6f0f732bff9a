"""Tool calling: extraction from real tokenizer output, each API's shape checked with
the official clients' own types, and tools reaching the chat template on a live daemon.

Random weights never emit a tool call by themselves, so the extraction is fed text
streamed token by token through the test model's own detokenizer, as the engine does.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from pydantic import TypeAdapter

from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_server.api.anthropic import BlockEvents, message_body
from mlx_server.api.ollama import answer_fields, piece_fields
from mlx_server.api.openai import chat_completion_body, chunk_delta
from mlx_server.jobs import DoneEvent
from mlx_server.errors import BadRequest
from mlx_server.prompts import chat_prompt
from mlx_server.tools import CONTENT, THINKING, TOOL_CALL, OutputParser, Piece, Reply, function_tools, starts_in_thinking

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
DONE = DoneEvent("stop", 20, 0, 9, (), 0.01, 0.02)


@pytest.fixture(scope="module")
def tokenizer(test_model):
    return load_tokenizer(Path(test_model))


def streamed(tokenizer, text: str) -> list[str]:
    """`text` as the engine streams it: token by token through the detokenizer."""
    detokenizer = tokenizer.detokenizer
    segments = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return [s for s in segments if s]


def parse(parser: OutputParser, segments: list[str]) -> list[Piece]:
    """Everything the parser gives, with text pieces of one kind in a row joined."""
    out: list[Piece] = []
    for piece in [p for s in segments for p in parser.feed(s)] + parser.finish():
        if out and piece.kind == out[-1].kind != TOOL_CALL:
            out[-1] = Piece(piece.kind, out[-1].text + piece.text)
        else:
            out.append(piece)
    return out


def reply_of(found: list[Piece]) -> Reply:
    reply = Reply(done=DONE)
    for piece in found:
        reply.add(piece)
    return reply


# --- extraction ------------------------------------------------------------------------


def test_the_test_model_gets_mlx_lms_json_tool_parser(tokenizer):
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert tokenizer.tool_parser is not None


def test_content_and_a_tool_call_are_split_and_the_markers_never_leak(tokenizer):
    segments = streamed(tokenizer, "Let me check." + CALL_TEXT + " Done")
    assert any("<tool_call>" in s for s in segments)  # the real detokenizer emits the marker as text
    found = parse(OutputParser(tokenizer, tools=[WEATHER]), segments)
    assert [p.kind for p in found] == [CONTENT, TOOL_CALL, CONTENT]
    assert found[0].text == "Let me check." and found[2].text == " Done"
    call = found[1].call
    assert call.name == "get_weather" and call.arguments == {"city": "Paris", "unit": "celsius"}
    assert all("tool_call" not in p.text for p in found)


def test_markers_split_into_single_characters_are_still_found(tokenizer):
    text = "Hi " + CALL_TEXT + CALL_TEXT.replace("Paris", "Rome")
    found = parse(OutputParser(tokenizer, tools=[WEATHER]), list(text))
    assert [p.kind for p in found] == [CONTENT, TOOL_CALL, TOOL_CALL]
    assert [p.call.arguments["city"] for p in found[1:]] == ["Paris", "Rome"]
    assert found[1].call.id != found[2].call.id


def test_a_tool_call_that_does_not_parse_is_kept_as_content(tokenizer):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    found = parse(OutputParser(tokenizer, tools=[WEATHER]), streamed(tokenizer, "a " + broken))
    assert all(p.kind == CONTENT for p in found)
    assert "".join(p.text for p in found) == "a " + broken


def test_a_tool_call_cut_off_at_the_end_is_parsed_if_complete_else_kept(tokenizer):
    complete = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    found = parse(OutputParser(tokenizer, tools=[WEATHER]), streamed(tokenizer, complete))
    assert [p.kind for p in found] == [TOOL_CALL] and found[0].call.arguments == {"city": "Oslo"}
    cut = '<tool_call>\n{"name": "get_weather", "argu'
    found = parse(OutputParser(tokenizer, tools=[WEATHER]), streamed(tokenizer, cut))
    assert [(p.kind, p.text) for p in found] == [(CONTENT, cut)]


def test_without_tools_the_text_is_left_alone(tokenizer):
    found = parse(OutputParser(tokenizer), streamed(tokenizer, "x " + CALL_TEXT))
    assert [p.kind for p in found] == [CONTENT]
    assert found[0].text == "x " + CALL_TEXT


def test_a_held_back_partial_marker_is_released_when_it_is_not_one(tokenizer):
    parser = OutputParser(tokenizer, tools=[WEATHER])
    assert parser.feed("a <tool") == [Piece(CONTENT, "a ")]
    assert parser.feed("box> b") == [Piece(CONTENT, "<toolbox> b")]
    assert parser.finish() == []


class ThinkingTokenizer:
    """The test tokenizer as a reasoning model's: <think> markers, found in prompts by id."""

    has_thinking = True
    think_start, think_end = "<think>", "</think>"

    def __init__(self, inner):
        self.inner = inner
        self.has_tool_calling = inner.has_tool_calling
        self.tool_call_start, self.tool_call_end = inner.tool_call_start, inner.tool_call_end
        self.tool_parser = inner.tool_parser

    def rfind_think_start(self, prompt):
        return max((i for i, t in enumerate(prompt) if t == -1), default=-1)

    def rfind_think_end(self, prompt):
        return max((i for i, t in enumerate(prompt) if t == -2), default=-1)


def test_thinking_is_separated_from_content_and_tool_calls(tokenizer):
    thinking = ThinkingTokenizer(tokenizer)
    text = "<think>\nThe user wants weather.</think>\n\nSure." + CALL_TEXT
    found = parse(OutputParser(thinking, tools=[WEATHER]), streamed(tokenizer, text))
    assert [(p.kind, p.text) for p in found[:2]] == [(THINKING, "The user wants weather."), (CONTENT, "Sure.")]
    assert found[2].kind == TOOL_CALL


def test_a_prompt_that_opens_a_think_block_starts_in_thinking(tokenizer):
    thinking = ThinkingTokenizer(tokenizer)
    assert starts_in_thinking(thinking, [5, -2, 7, -1])
    assert not starts_in_thinking(thinking, [5, -1, 7, -2, 9])
    assert not starts_in_thinking(tokenizer, [1, 2, 3])  # the test model has no thinking
    parser = OutputParser(thinking, thinking=True)
    found = parse(parser, ["\nhmm, let me see", "</think>", "Answer"])
    assert [(p.kind, p.text) for p in found] == [(THINKING, "hmm, let me see"), (CONTENT, "Answer")]


@pytest.mark.parametrize(
    "tools, fragment",
    [
        ({"name": "x"}, "must be an array"),
        ([{"type": "function", "function": {}}], "'tools[0].function.name'"),
        ([{"type": "retrieval"}], "'tools[0]' must be an object with type 'function'"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "'tools[0].function.parameters'"),
    ],
)
def test_bad_tool_definitions_name_what_is_wrong(tools, fragment):
    with pytest.raises(BadRequest) as e:
        function_tools(tools)
    assert fragment in e.value.message


def test_a_chat_template_without_tools_refuses_them():
    class PlainTemplate:
        has_chat_template = True
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    with pytest.raises(BadRequest) as e:
        chat_prompt(PlainTemplate(), [{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert e.value.message == "this model's chat template does not support tools" and e.value.param == "tools"


# --- each API's shape, checked with the official clients' types ---------------------------


@pytest.fixture
def calls(tokenizer):
    text = "Checking." + CALL_TEXT + CALL_TEXT.replace("Paris", "Lima")
    return parse(OutputParser(tokenizer, tools=[WEATHER]), streamed(tokenizer, text))


def test_ollama_shape_has_object_arguments(calls):
    reply = reply_of(calls)
    body = {"model": "demo", "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": "stop"}
    response = ollama.ChatResponse.model_validate(body | answer_fields(True, reply.content, "", reply.calls))
    assert response.message.content == "Checking."
    assert [(c.function.name, dict(c.function.arguments)) for c in response.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_weather", {"city": "Lima", "unit": "celsius"}),
    ]
    chunk = ollama.ChatResponse.model_validate(body | {"done": False} | piece_fields(True, calls[2], 1))
    assert chunk.message.tool_calls[0].function.arguments["city"] == "Lima"


def test_openai_shape_has_json_string_arguments_and_finish_reason_tool_calls(calls):
    body = chat_completion_body("demo", reply_of(calls), None)
    completion = openai.types.chat.ChatCompletion.model_validate(body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [
        {"city": "Paris", "unit": "celsius"},
        {"city": "Lima", "unit": "celsius"},
    ]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    delta = openai.types.chat.chat_completion_chunk.ChoiceDelta.model_validate(chunk_delta(calls[2], 1))
    assert delta.tool_calls[0].index == 1 and json.loads(delta.tool_calls[0].function.arguments)["city"] == "Lima"


def test_anthropic_shape_has_tool_use_blocks(calls):
    body = message_body("msg_1", "demo", reply_of(calls), think=None, stop=("tool_use", None))
    message = anthropic.types.Message.model_validate(body)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Paris", "unit": "celsius"} and message.content[1].id.startswith("toolu_")


def test_anthropic_stream_events_rebuild_the_tool_use_input(calls):
    blocks = BlockEvents()
    events = [e for piece in calls for e in blocks.piece(piece)] + blocks.finish()
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    parsed = [adapter.validate_python(e) for e in events]
    assert [e.type for e in parsed] == [
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
    ]
    assert [e.index for e in parsed if e.type == "content_block_start"] == [0, 1, 2]
    assert json.loads(parsed[4].delta.partial_json) == {"city": "Paris", "unit": "celsius"}
    assert parsed[3].content_block.name == "get_weather"


def test_thinking_goes_into_each_apis_own_field(tokenizer):
    reply = reply_of(parse(OutputParser(ThinkingTokenizer(tokenizer)), ["<think>Weather?</think>", "Sunny."]))
    assert (reply.thinking, reply.content) == ("Weather?", "Sunny.")
    body = {"model": "demo", "created_at": "2026-01-01T00:00:00Z", "done": True}
    message = ollama.ChatResponse.model_validate(body | answer_fields(True, reply.content, reply.thinking, [])).message
    assert (message.thinking, message.content) == ("Weather?", "Sunny.")
    assert ollama.GenerateResponse.model_validate(body | answer_fields(False, reply.content, reply.thinking, [])).thinking == "Weather?"
    completion = openai.types.chat.ChatCompletion.model_validate(chat_completion_body("demo", reply, None))
    assert completion.choices[0].message.reasoning_content == "Weather?"
    asked = anthropic.types.Message.model_validate(message_body("m", "demo", reply, think=True, stop=("end_turn", None)))
    assert [(b.type, getattr(b, "thinking", None)) for b in asked.content] == [("thinking", "Weather?"), ("text", None)]
    unasked = message_body("m", "demo", reply, think=None, stop=("end_turn", None))
    assert [b["type"] for b in unasked["content"]] == ["text"]


def test_an_empty_anthropic_answer_is_one_empty_text_block():
    events = BlockEvents().finish()
    assert [e["type"] for e in events] == ["content_block_start", "content_block_stop"]
    assert events[0]["content_block"] == {"type": "text", "text": ""}


# --- live: tools reach the chat template -----------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True}]
    with ready_daemon(tmp_path_factory.mktemp("tools"), models) as daemon:
        yield daemon


QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = QUESTION + [
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
]


@pytest.mark.live
def test_ollama_tools_reach_the_template_and_empty_tools_work(live):
    client = ollama.Client(host=live.url, timeout=60)
    options = {"num_predict": 3, "temperature": 0}
    plain = client.chat(model="demo", messages=QUESTION, options=options)
    empty = client.chat(model="demo", messages=QUESTION, tools=[], options=options)
    tooled = client.chat(model="demo", messages=QUESTION, tools=[WEATHER], options=options)
    assert empty.prompt_eval_count == plain.prompt_eval_count
    assert tooled.prompt_eval_count > plain.prompt_eval_count + 20  # the tool's JSON schema is in the prompt
    history = client.chat(model="demo", messages=HISTORY, tools=[WEATHER], options=options)
    assert history.prompt_eval_count > tooled.prompt_eval_count
    streamed_chunks = list(client.chat(model="demo", messages=QUESTION, tools=[WEATHER], options=options, stream=True))
    assert streamed_chunks[-1].done and streamed_chunks[-1].prompt_eval_count == tooled.prompt_eval_count


@pytest.mark.live
def test_openai_tools_reach_the_template_and_tool_choice_none_drops_them(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60)
    args = {"model": "demo", "messages": QUESTION, "max_tokens": 3, "temperature": 0}
    plain = client.chat.completions.create(**args)
    tooled = client.chat.completions.create(**args, tools=[WEATHER])
    none = client.chat.completions.create(**args, tools=[WEATHER], tool_choice="none")
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    answered = client.chat.completions.create(**(args | {"messages": history}), tools=[WEATHER])
    assert answered.usage.prompt_tokens > tooled.usage.prompt_tokens


@pytest.mark.live
def test_anthropic_tools_reach_the_template_and_count_tokens_agrees(live):
    client = anthropic.Anthropic(base_url=live.url, api_key="unused", timeout=60)
    tool = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER["function"]["parameters"]}
    args = {"model": "demo", "max_tokens": 3, "messages": QUESTION, "extra_body": {"temperature": 0}}
    plain = client.messages.create(**args)
    tooled = client.messages.create(**args, tools=[tool])
    assert tooled.usage.input_tokens > plain.usage.input_tokens + 20
    assert client.messages.count_tokens(model="demo", messages=QUESTION, tools=[tool]).input_tokens == tooled.usage.input_tokens
    history = QUESTION + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees and sunny"}]},
    ]
    answered = client.messages.create(**(args | {"messages": history}), tools=[tool])
    assert answered.usage.input_tokens > tooled.usage.input_tokens


@pytest.mark.live
def test_a_bad_tool_definition_is_a_400_that_names_it(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=2, tools=[{"type": "function", "function": {"parameters": {}}}])
    assert "tools[0].function.name" in str(e.value)
