"""Hypothesis on the request parsers: whatever JSON a client sends, each parser
either returns a value within its bounds or raises BadRequest naming the caller's
own field with a short message. Any other exception would be a 500."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from conftest import make_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlx_server.api import anthropic, ollama, openai
from mlx_server.api.body import MAX_JSON_DEPTH, decode_json, field, keep_alive_field, model_field
from mlx_server.api.keys import CONFIG
from mlx_server.config import FOREVER, FOREVER_AFTER
from mlx_server.errors import BadRequest
from mlx_server.options import MAX_CONTEXT, GenerationOptions, merge_options, parse_options
from mlx_server.prompts import chat_prompt, validate_messages
from mlx_server.tools import function_tools

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MESSAGE_LIMIT = 600  # an error quotes what was sent, cut short

# Numbers and strings that have broken parsers before: overflowing floats, huge ints, long text.
EDGE_VALUES = [0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, -(10**400), 1e308, -1e308, 5e-324, 0.5, "", "x" * 5000, "5m", "-1", "1e999"]


def _edge(index: int) -> object:
    return EDGE_VALUES[index]


# drawn by index: the strategy's repr (which hypothesis builds) stays short
EDGES = st.sampled_from(range(len(EDGE_VALUES))).map(_edge)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | EDGES
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def refused(error: BadRequest, params: set[str]) -> None:
    """A refusal names one of `params` and says so in a short message."""
    assert error.status == 400 and error.param in params, (error.param, error.message)
    assert len(error.message) < MESSAGE_LIMIT, error.message[:200]


def attempt(fn, *args, params: set[str], **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except BadRequest as e:
        refused(e, params)
        return BadRequest


# --- bodies and fields --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400) | JSON.map(lambda v: json.dumps(v).encode()))
def test_decode_json_takes_any_bytes(raw):
    try:
        body = decode_json(raw)
    except BadRequest as e:
        assert e.status == 400 and len(e.message) < MESSAGE_LIMIT
        return
    assert isinstance(body, dict) and body == json.loads(raw)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), JSON, max_size=6))
def test_every_json_object_round_trips(body):
    assert decode_json(json.dumps(body).encode()) == body


@FUZZ
@given(st.integers(min_value=1, max_value=300), st.sampled_from("[{"))
def test_depth_is_bounded(depth, opener):
    closer = {"[": "]", "{": "}"}[opener]
    inner = '"a": ' if opener == "{" else ""
    raw = ("{" + '"x": ' + (opener + inner) * (depth - 1) + "1" + closer * (depth - 1) + "}").encode()
    try:
        decode_json(raw)
        assert depth <= MAX_JSON_DEPTH
    except BadRequest as e:
        assert depth > MAX_JSON_DEPTH - 1 and "nested" in e.message


KINDS = [str, bool, int, float, list, dict, (bool, str), (int, str)]


@FUZZ
@given(JSON, st.sampled_from(KINDS))
def test_field_returns_its_kind_or_names_the_field(value, kind):
    result = attempt(field, {"x": value}, "x", kind, "default", params={"x"})
    if result is BadRequest or value is None:
        assert result in (BadRequest, "default")
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    assert isinstance(result, kinds) and (bool in kinds or not isinstance(result, bool))
    assert not isinstance(result, float) or math.isfinite(result)


@FUZZ
@given(JSON)
def test_model_field(value):
    name = attempt(model_field, {"model": value}, params={"model"})
    assert name is BadRequest or isinstance(name, str) and name.strip() and len(name) <= 512


@FUZZ
@given(JSON | st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{1,3})?(ms|s|m|h|d)?", fullmatch=True))
def test_keep_alive_is_a_datable_duration(value):
    seconds = attempt(keep_alive_field, {"keep_alive": value}, params={"keep_alive"})
    if seconds in (BadRequest, None):
        return
    assert seconds == FOREVER or 0 <= seconds <= FOREVER_AFTER


# --- options ----------------------------------------------------------------------------------------

OPTION_NAMES = ["temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "repeat_penalty", "repeat_last_n",
                "presence_penalty", "frequency_penalty", "num_ctx", "mirostat", "num_gpu", "unknown"]
OPTION_VALUES = JSON | st.lists(st.text(max_size=5), max_size=20)


def in_bounds(options: GenerationOptions) -> None:
    assert 0 <= options.temperature <= 100 and 0 <= options.top_p <= 1 and 0 <= options.min_p <= 1
    assert -2 <= options.num_predict <= MAX_CONTEXT and (options.num_ctx is None or 1 <= options.num_ctx <= MAX_CONTEXT)
    assert all(isinstance(s, str) and s for s in options.stop) and len(options.stop) <= 16
    assert all(math.isfinite(getattr(options, f)) for f in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"))


@FUZZ
@given(st.dictionaries(st.sampled_from(OPTION_NAMES), OPTION_VALUES, max_size=6) | JSON)
def test_parse_options(raw):
    names = set(raw) if isinstance(raw, dict) else set()
    parsed = attempt(parse_options, raw, params=names | {"options"})
    if parsed is not BadRequest:
        in_bounds(merge_options({"temperature": 0.7}, parsed))


@pytest.fixture(scope="module")
def request_and_model():
    config = make_config([{"name": "demo", "source": "someorg/some-repo", "options": {"temperature": 0.2}}])
    app = web.Application()
    app[CONFIG] = config
    return make_mocked_request("POST", "/", app=app), config.models[0]


OPENAI_KEYS = ["temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "max_tokens", "max_completion_tokens", "n", "user"]
ANTHROPIC_KEYS = ["max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata"]


@FUZZ
@given(st.dictionaries(st.sampled_from(OPENAI_KEYS), OPTION_VALUES, max_size=6))
def test_openai_parameters_map_to_options_or_name_the_callers_parameter(request_and_model, body):
    request, model = request_and_model
    options = attempt(openai.openai_options, request, model, body, params=set(body))
    if options is not BadRequest:
        in_bounds(options)
        if body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None:
            assert options.num_predict == body.get("max_completion_tokens", body.get("max_tokens"))


@FUZZ
@given(st.dictionaries(st.sampled_from(ANTHROPIC_KEYS), OPTION_VALUES, max_size=6))
def test_anthropic_parameters_map_to_options_or_name_the_callers_parameter(request_and_model, body):
    request, model = request_and_model
    options = attempt(anthropic.anthropic_options, request, model, body, params=set(body) | {"max_tokens"})
    if options is not BadRequest:
        in_bounds(options)
        assert options.num_predict == body["max_tokens"] >= 1


@FUZZ
@given(st.dictionaries(st.sampled_from(OPTION_NAMES), OPTION_VALUES, max_size=6) | JSON)
def test_ollama_request_options(request_and_model, raw):
    request, model = request_and_model
    names = set(raw) if isinstance(raw, dict) else set()
    options = attempt(ollama.request_options, request, model, raw, params=names | {"options"})
    if options is not BadRequest:
        in_bounds(options)


@FUZZ
@given(JSON)
def test_refuse_unsupported_and_stream_options(body):
    body = body if isinstance(body, dict) else {"n": body, "logprobs": body, "stream_options": body}
    attempt(openai.refuse_unsupported, body, params={"n", "best_of", "logprobs", "top_logprobs"})
    attempt(openai._stream_options, body, True, params={"stream_options"})


# --- messages, prompts, tools -------------------------------------------------------------------

TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text", "image_url", "bogus"]), "text": st.text(max_size=10) | JSON}), max_size=3)
CALLS = st.lists(st.fixed_dictionaries({}, optional={"id": JSON, "type": st.just("function"), "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=5) | JSON, "arguments": JSON | st.just('{"a": 1}') | st.just("9" * 5000)})}), max_size=2) | JSON
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard"]) | JSON},
    optional={"content": st.text(max_size=20) | TEXT_PARTS | JSON, "tool_calls": CALLS, "tool_call_id": JSON, "name": JSON, "tool_name": JSON, "images": JSON},
)
MESSAGES = st.lists(MESSAGE, max_size=5) | JSON
BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image", "bogus"]) | JSON},
    optional={"text": st.text(max_size=10) | JSON, "name": st.text(max_size=5) | JSON, "id": JSON, "input": JSON,
              "tool_use_id": JSON, "content": st.text(max_size=5) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": JSON}), max_size=2) | JSON,
              "is_error": JSON},
)
ANTHROPIC_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | JSON}, optional={"content": st.text(max_size=10) | st.lists(BLOCK, max_size=3) | JSON}), max_size=4) | JSON


@pytest.fixture(scope="module")
def tokenizer(test_model):
    from mlx_lm.tokenizer_utils import load

    return load(test_model)


def renders(tokenizer, messages: list[dict[str, Any]], tools: list | None = None) -> None:
    """What a parser accepted either renders with the model's chat template or is a 400."""
    validate_messages(messages)
    ids = attempt(chat_prompt, tokenizer, messages, tools=tools, params={"messages", "tools"})
    assert ids is BadRequest or ids and all(isinstance(t, int) for t in ids)


HUGE_ARGUMENTS = {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "9" * 5000}}]}


@FUZZ
@given(MESSAGES)
@example([HUGE_ARGUMENTS])
def test_ollama_messages(tokenizer, raw):
    messages = attempt(ollama.chat_messages, raw, params={"messages"})
    if messages is not BadRequest:
        renders(tokenizer, messages)


@FUZZ
@given(MESSAGES)
@example([HUGE_ARGUMENTS])
def test_openai_messages(tokenizer, raw):
    messages = attempt(openai.openai_messages, raw, params={"messages"})
    if messages is not BadRequest:
        assert messages and all(m["role"] in ("system", "user", "assistant", "tool") for m in messages)
        renders(tokenizer, messages)


@FUZZ
@given(ANTHROPIC_MESSAGES, st.text(max_size=10) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": JSON}), max_size=2) | JSON)
def test_anthropic_messages_and_system(tokenizer, raw, system):
    text = attempt(anthropic.system_text, system, params={"system"})
    if text is BadRequest:
        return
    messages = attempt(anthropic.anthropic_messages, raw, text, params={"messages"})
    if messages is not BadRequest:
        renders(tokenizer, messages)


TOOL = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["function", "custom", "web_search_20250305"]) | JSON, "name": st.text(max_size=5) | JSON,
                                           "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=5) | JSON, "parameters": JSON, "description": JSON}) | JSON,
                                           "input_schema": JSON, "description": JSON})


@FUZZ
@given(st.lists(TOOL, max_size=3) | JSON, JSON)
def test_tool_definitions(tokenizer, raw, tool_choice):
    user = [{"role": "user", "content": "hi"}]
    for parse, params in ((function_tools, {"tools"}), (lambda r: anthropic.anthropic_tools(r, tool_choice), {"tools"})):
        tools = attempt(parse, raw, params=params)
        if tools not in (BadRequest, []):
            renders(tokenizer, user, tools)
    attempt(anthropic._thinking, tool_choice, params={"thinking"})


# --- prompts, inputs and output formats ---------------------------------------------------------------


@FUZZ
@given(JSON | st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4) | st.lists(st.lists(st.integers(min_value=0, max_value=9), max_size=3), max_size=3))
def test_completion_prompt_and_embedding_input(raw):
    prompt = attempt(openai._prompt_input, raw, params={"prompt"})
    assert prompt is BadRequest or isinstance(prompt, str) or prompt and all(isinstance(t, int) and t >= 0 for t in prompt)
    inputs = attempt(openai._embedding_input, raw, params={"input"})
    assert inputs is BadRequest or inputs and all(isinstance(x, str) and x or isinstance(x, list) and x for x in inputs)


SCHEMA = st.recursive(
    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "nope"]) | JSON,
                                        "minimum": JSON, "maximum": JSON, "pattern": st.sampled_from(["^a+$", "(", "[a-z]{2,3}"]) | JSON,
                                        "enum": st.lists(JSON, max_size=3) | JSON, "minLength": JSON, "maxItems": JSON, "required": JSON,
                                        "$ref": st.sampled_from(["#/$defs/a", "#/nope", "http://127.0.0.1:9/x.json"]) | JSON}),
    lambda inner: st.fixed_dictionaries({"type": st.sampled_from(["object", "array"])}, optional={"properties": st.dictionaries(st.text(max_size=4), inner, max_size=3),
                                                                                                   "items": inner, "anyOf": st.lists(inner, max_size=3), "$defs": st.fixed_dictionaries({"a": inner})}),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEMA | JSON | st.sampled_from(["json", "", "xml"]))
def test_output_formats_compile_or_are_refused(value):
    attempt(ollama.format_constraint, value, params={"format"})
    attempt(openai.response_format_constraint, {"type": "json_schema", "json_schema": {"schema": value}}, params={"response_format"})
    attempt(openai.response_format_constraint, value, params={"response_format"})
    attempt(anthropic.output_constraint, {"format": {"type": "json_schema", "schema": value}}, params={"output_config", "output_config.format.schema"})
