"""A malformed-request sweep over every route of the three API families, on a live daemon.

Every bad body gets a 4xx within a bounded time, in its API family's error shape,
with a message that names what was wrong; no request is ever a 500 and the
daemon is healthy afterwards with no lease left behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import pytest

from mlx_server.api.ollama import MAX_EMBED_INPUTS
from mlx_server.prompts import MAX_MESSAGES

pytestmark = pytest.mark.live

ANSWER_WITHIN = 20.0  # seconds; a validation error never waits on the model
OLLAMA_MODEL_ROUTES = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/api/pull")
OPENAI_MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
POST_ROUTES = OLLAMA_MODEL_ROUTES + OPENAI_MODEL_ROUTES + ANTHROPIC_ROUTES


@dataclass(frozen=True)
class Bad:
    """One bad request: what is sent, the status it must get and the words its message must hold."""

    path: str
    body: dict | bytes
    words: tuple[str, ...]
    status: int = 400
    content_type: str = "application/json"
    method: str = "POST"

    @property
    def id(self) -> str:
        shown = self.body if isinstance(self.body, bytes) else json.dumps(self.body)
        return f"{self.method} {self.path} {shown[:60]!r}"


def minimal(path: str) -> dict:
    """A valid body for `path`, which each case then breaks in one place."""
    return {
        "/api/generate": {"model": "demo", "prompt": "hi"},
        "/api/chat": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        "/api/embed": {"model": "demo", "input": "hi"},
        "/api/embeddings": {"model": "demo", "prompt": "hi"},
        "/api/show": {"model": "demo"},
        "/api/pull": {"model": "demo"},
        "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/completions": {"model": "demo", "prompt": "hi"},
        "/v1/embeddings": {"model": "demo", "input": "hi"},
        "/v1/messages": {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/messages/count_tokens": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
    }[path]


def deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def body_cases() -> list[Bad]:
    """What is wrong with the body itself, on every POST route."""
    cases = []
    for path in POST_ROUTES:
        good = json.dumps(minimal(path))
        cases += [
            Bad(path, b"", ("empty",)),
            Bad(path, b"{not json", ("invalid JSON",)),
            Bad(path, good.encode()[:-3], ("invalid JSON",)),
            Bad(path, b"[1, 2]", ("JSON object", "array")),
            Bad(path, b'"model"', ("JSON object", "string")),
            Bad(path, b"null", ("JSON object", "null")),
            Bad(path, b'{"model": "demo", "x": "\xff\xfe"}', ("UTF-8",)),
            Bad(path, good.replace("{", '{"a": NaN, ', 1).encode(), ("NaN",)),
            Bad(path, good.replace("{", '{"a": -Infinity, ', 1).encode(), ("Infinity",)),
            Bad(path, good.replace("{", '{"a": 1e999, ', 1).encode(), ("1e999", "range")),
            Bad(path, good.replace("{", '{"a": ' + "9" * 5000 + ", ", 1).encode(), ("5000 digits",)),
            Bad(path, json.dumps({**minimal(path), "a": deep(200)}).encode(), ("nested",)),
            Bad(path, b"[" * 100_000 + b"]" * 100_000, ("nested",)),
            Bad(path, b"model=demo&prompt=hi", ("invalid JSON",), content_type="application/x-www-form-urlencoded"),
            Bad(path, b"--x\r\nContent-Disposition: form-data; name=model\r\n\r\ndemo\r\n--x--", ("invalid JSON", "multipart/form-data"),
                content_type="multipart/form-data; boundary=x"),
            Bad(path, {k: v for k, v in minimal(path).items() if k != "model"}, ("'model'", "required")),
            Bad(path, {**minimal(path), "model": 5}, ("'model'", "string")),
            Bad(path, {**minimal(path), "model": ["demo"]}, ("'model'", "string")),
            Bad(path, {**minimal(path), "model": "   "}, ("'model'", "empty")),
            Bad(path, {**minimal(path), "model": "x" * 10_000}, ("'model'", "long")),
            Bad(path, {**minimal(path), "model": "no-such-model"}, ("no-such-model", "not found"), status=404),
            Bad(path, {**minimal(path), "model": "/etc/passwd"}, ("/etc/passwd", "not found"), status=404),
            Bad(path, {**minimal(path), "model": "../../models/demo"}, ("not found",), status=404),
            Bad(path, {**minimal(path), "model": "mlx-community/Qwen2.5-0.5B-Instruct-4bit"}, ("not found",), status=404),
        ]
        if path not in ("/api/show", "/api/pull"):
            cases += [
                Bad(path, {**minimal(path), "keep_alive": "forever"}, ("'keep_alive'", "duration", "forever")),
                Bad(path, {**minimal(path), "keep_alive": [5]}, ("'keep_alive'",)),
                Bad(path, {**minimal(path), "keep_alive": 10**400}, ("'keep_alive'",)),
            ]
    return cases


def option_cases() -> list[Bad]:
    """Ollama `options`, through each Ollama route that takes them."""
    wrong = [
        ({"temperature": "hot"}, ("temperature", "number")),
        ({"temperature": -1}, ("temperature", "between")),
        ({"temperature": 10**400}, ("temperature",)),
        ({"top_p": 2}, ("top_p", "between")),
        ({"min_p": -0.5}, ("min_p",)),
        ({"top_k": -1}, ("top_k",)),
        ({"top_k": 1.5}, ("top_k", "integer")),
        ({"seed": "x"}, ("seed", "integer")),
        ({"seed": 2**70}, ("seed", "between")),
        ({"num_predict": 10**12}, ("num_predict", "between")),
        ({"num_predict": -3}, ("num_predict",)),
        ({"num_predict": "all"}, ("num_predict", "integer")),
        ({"num_ctx": 0}, ("num_ctx",)),
        ({"num_ctx": -4096}, ("num_ctx",)),
        ({"num_ctx": 10**9}, ("num_ctx", "between")),
        ({"num_ctx": True}, ("num_ctx", "integer")),
        ({"stop": 5}, ("stop",)),
        ({"stop": ["x"] * 17}, ("stop", "16")),
        ({"stop": ["x" * 1001]}, ("stop", "1000")),
        ({"repeat_penalty": "x"}, ("repeat_penalty",)),
        ({"repeat_last_n": -2}, ("repeat_last_n",)),
        ({"presence_penalty": 1000}, ("presence_penalty",)),
        ({"frequency_penalty": [1]}, ("frequency_penalty",)),
    ]
    cases = []
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"):
        cases.append(Bad(path, {**minimal(path), "options": [1]}, ("'options'", "object")))
        cases.append(Bad(path, {**minimal(path), "options": "fast"}, ("'options'", "object")))
        cases += [Bad(path, {**minimal(path), "options": options}, words) for options, words in wrong]
    return cases


def route_cases() -> list[Bad]:
    """What each route's own fields must be."""
    generate, chat = minimal("/api/generate"), minimal("/api/chat")
    user = {"role": "user", "content": "hi"}
    cases = [
        Bad("/api/generate", {**generate, "prompt": 5}, ("'prompt'", "string")),
        Bad("/api/generate", {**generate, "suffix": ["x"]}, ("'suffix'", "string")),
        Bad("/api/generate", {**generate, "suffix": "tail"}, ("'suffix'", "fill-in-the-middle")),
        Bad("/api/generate", {**generate, "system": 1}, ("'system'",)),
        Bad("/api/generate", {**generate, "raw": "yes"}, ("'raw'", "boolean")),
        Bad("/api/generate", {**generate, "stream": "yes"}, ("'stream'", "boolean")),
        Bad("/api/generate", {**generate, "stream": 1}, ("'stream'", "boolean")),
        Bad("/api/generate", {**generate, "think": 5}, ("'think'",)),
        Bad("/api/generate", {**generate, "context": "abc"}, ("'context'",)),
        Bad("/api/generate", {**generate, "context": [-1]}, ("'context'",)),
        Bad("/api/generate", {**generate, "context": [1.5]}, ("'context'",)),
        Bad("/api/generate", {**generate, "context": [True]}, ("'context'",)),
        Bad("/api/generate", {**generate, "context": [10**9]}, ("'context'", "vocabulary")),
        Bad("/api/generate", {**generate, "images": ["aGk="]}, ("images",)),
        Bad("/api/generate", {**generate, "template": "{{ .Prompt }}"}, ("'template'",)),
        Bad("/api/generate", {**generate, "format": "xml"}, ("'format'",)),
        Bad("/api/generate", {**generate, "format": 5}, ("'format'",)),
        Bad("/api/generate", {**generate, "format": {"type": 5}}, ("'format'",)),
        Bad("/api/generate", {**generate, "format": {"type": "string", "pattern": "("}}, ("'format'",)),
        Bad("/api/generate", {**generate, "format": "json", "think": True}, ("'think'",)),
        Bad("/api/generate", {**generate, "prompt": "word " * 20_000}, ("context window",)),
        Bad("/api/generate", {**generate, "options": {"num_ctx": 4}}, ("context window",)),
        Bad("/api/chat", {**chat, "messages": "hi"}, ("'messages'", "array")),
        Bad("/api/chat", {**chat, "messages": [5]}, ("'messages[0]'", "object")),
        Bad("/api/chat", {**chat, "messages": [user, {"role": "wizard", "content": "x"}]}, ("'messages[1].role'",)),
        Bad("/api/chat", {**chat, "messages": [{"content": "x"}]}, ("'messages[0].role'",)),
        Bad("/api/chat", {**chat, "messages": [{"role": "user", "content": 5}]}, ("'messages[0].content'", "string")),
        Bad("/api/chat", {**chat, "messages": [{**user, "images": ["aGk="]}]}, ("'messages[0].images'",)),
        Bad("/api/chat", {**chat, "messages": [{"role": "assistant", "content": "", "tool_calls": 5}]}, ("'messages[0].tool_calls'",)),
        Bad("/api/chat", {**chat, "messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}, ("'messages[0].tool_calls'",)),
        Bad("/api/chat", {**chat, "messages": [{"role": "tool", "content": "1", "tool_name": ["f"]}]}, ("'messages[0].tool_name'",)),
        Bad("/api/chat", {**chat, "messages": [user] * (MAX_MESSAGES + 1)}, ("'messages'", str(MAX_MESSAGES))),
        Bad("/api/chat", {**chat, "messages": [user] * 20_000}, ("context window",)),
        Bad("/api/chat", {**chat, "tools": "x"}, ("'tools'",)),
        Bad("/api/chat", {**chat, "tools": [{"type": "retrieval"}]}, ("'tools[0]'",)),
        Bad("/api/chat", {**chat, "tools": [{"type": "function", "function": {"name": ""}}]}, ("'tools[0].function.name'",)),
        Bad("/api/chat", {**chat, "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, ("'tools[0].function.parameters'",)),
        Bad("/api/chat", {**chat, "format": {"enum": []}}, ("'format'",)),
        Bad("/api/embed", {**minimal("/api/embed"), "input": 5}, ("'input'",)),
        Bad("/api/embed", {**minimal("/api/embed"), "input": [1, 2]}, ("'input'",)),
        Bad("/api/embed", {**minimal("/api/embed"), "input": ["hi", ""]}, ("'input[1]'", "empty")),
        Bad("/api/embed", {**minimal("/api/embed"), "input": ["x"] * (MAX_EMBED_INPUTS + 1)}, ("'input'", str(MAX_EMBED_INPUTS))),
        Bad("/api/embed", {**minimal("/api/embed"), "input": "word " * 5000, "truncate": False}, ("'input[0]'", "context")),
        Bad("/api/embed", {**minimal("/api/embed"), "truncate": "no"}, ("'truncate'", "boolean")),
        Bad("/api/embed", {**minimal("/api/embed"), "dimensions": 0}, ("'dimensions'",)),
        Bad("/api/embed", {**minimal("/api/embed"), "dimensions": "8"}, ("'dimensions'",)),
        Bad("/api/embed", {**minimal("/api/embed"), "dimensions": 10**6}, ("'dimensions'",)),
        Bad("/api/embeddings", {**minimal("/api/embeddings"), "prompt": 5}, ("'prompt'", "string")),
        Bad("/api/show", {"name": 5}, ("'name'", "string")),
        Bad("/api/show", {}, ("'model'", "required")),
        Bad("/api/pull", {"model": "demo", "stream": "yes"}, ("'stream'", "boolean")),
        Bad("/api/pull", {}, ("'model'", "required")),
    ]
    chat_v1, text_v1 = minimal("/v1/chat/completions"), minimal("/v1/completions")
    for path, base in (("/v1/chat/completions", chat_v1), ("/v1/completions", text_v1)):
        cases += [
            Bad(path, {**base, "max_tokens": 0}, ("'max_tokens'",)),
            Bad(path, {**base, "max_tokens": -5}, ("'max_tokens'",)),
            Bad(path, {**base, "max_tokens": "10"}, ("'max_tokens'", "integer")),
            Bad(path, {**base, "max_tokens": 10**12}, ("'max_tokens'", "between")),
            Bad(path, {**base, "max_tokens": 10**400}, ("'max_tokens'",)),
            Bad(path, {**base, "max_completion_tokens": 0}, ("'max_completion_tokens'",)),
            Bad(path, {**base, "temperature": "warm"}, ("'temperature'", "number")),
            Bad(path, {**base, "temperature": -2}, ("'temperature'",)),
            Bad(path, {**base, "top_p": 5}, ("'top_p'",)),
            Bad(path, {**base, "seed": "x"}, ("'seed'",)),
            Bad(path, {**base, "stop": 5}, ("'stop'",)),
            Bad(path, {**base, "presence_penalty": "x"}, ("'presence_penalty'",)),
            Bad(path, {**base, "n": 2}, ("'n'",)),
            Bad(path, {**base, "logprobs": "yes"}, ("'logprobs'",)),
            Bad(path, {**base, "logprobs": 99}, ("'logprobs'",)),
            Bad(path, {**base, "stream": "yes"}, ("'stream'", "boolean")),
            Bad(path, {**base, "stream_options": {"include_usage": True}}, ("'stream_options'",)),
            Bad(path, {**base, "stream": True, "stream_options": "usage"}, ("'stream_options'",)),
        ]
    cases += [
        Bad("/v1/chat/completions", {"model": "demo"}, ("'messages'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": []}, ("'messages'", "non-empty")),
        Bad("/v1/chat/completions", {**chat_v1, "messages": {"role": "user"}}, ("'messages'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": ["hi"]}, ("'messages[0]'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "wizard", "content": "x"}]}, ("'messages[0].role'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "user", "content": 5}]}, ("'messages[0].content'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, ("'messages[0].content'", "image_url")),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, ("'messages[0].content'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "assistant", "content": None, "tool_calls": "f"}]}, ("'messages[0].tool_calls'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, ("'messages[0].tool_calls'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "tool", "content": "1", "tool_call_id": {"id": 1}}]}, ("'messages[0].tool_call_id'",)),
        Bad("/v1/chat/completions", {**chat_v1, "messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, ("'messages'", str(MAX_MESSAGES))),
        Bad("/v1/chat/completions", {**chat_v1, "tools": {"f": 1}}, ("'tools'",)),
        Bad("/v1/chat/completions", {**chat_v1, "response_format": {"type": "xml"}}, ("'response_format",)),
        Bad("/v1/chat/completions", {**chat_v1, "response_format": "json"}, ("'response_format",)),
        Bad("/v1/chat/completions", {**chat_v1, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, ("'response_format",)),
        Bad("/v1/completions", {"model": "demo"}, ("'prompt'",)),
        Bad("/v1/completions", {**text_v1, "prompt": 5}, ("'prompt'",)),
        Bad("/v1/completions", {**text_v1, "prompt": ["a", "b"]}, ("'prompt'", "one prompt")),
        Bad("/v1/completions", {**text_v1, "prompt": [-1]}, ("'prompt'",)),
        Bad("/v1/completions", {**text_v1, "prompt": []}, ("'prompt'",)),
        Bad("/v1/completions", {**text_v1, "prompt": [10**9]}, ("'prompt'", "vocabulary")),
        Bad("/v1/completions", {**text_v1, "prompt": [1, 2], "echo": True}, ("'echo'",)),
        Bad("/v1/completions", {**text_v1, "suffix": 5}, ("'suffix'",)),
        Bad("/v1/completions", {**text_v1, "best_of": 3}, ("'best_of'",)),
        Bad("/v1/embeddings", {"model": "demo"}, ("'input'",)),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": []}, ("'input'",)),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": [""]}, ("'input'",)),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": [[-1]]}, ("'input'",)),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": [[5, 6]]}, ("'input'", "token ids", "send the text")),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": [5, 6]}, ("'input'", "token ids")),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": ["x"] * (MAX_EMBED_INPUTS + 1)}, ("'input'", str(MAX_EMBED_INPUTS))),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "input": "word " * 5000}, ("'input[0]'", "context")),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "encoding_format": "hex"}, ("'encoding_format'",)),
        Bad("/v1/embeddings", {**minimal("/v1/embeddings"), "dimensions": 0}, ("'dimensions'",)),
    ]
    messages = minimal("/v1/messages")
    for path, base in (("/v1/messages", messages), ("/v1/messages/count_tokens", minimal("/v1/messages/count_tokens"))):
        cases += [
            Bad(path, {"model": "demo", "max_tokens": 4}, ("'messages'",)),
            Bad(path, {**base, "messages": []}, ("'messages'", "non-empty")),
            Bad(path, {**base, "messages": [{"role": "developer", "content": "x"}]}, ("'messages[0].role'",)),
            Bad(path, {**base, "messages": [{"role": "user", "content": 5}]}, ("'messages[0].content'",)),
            Bad(path, {**base, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, ("'messages[0].content[0]'", "image")),
            Bad(path, {**base, "messages": [{"role": "user", "content": [{"type": "bogus"}]}]}, ("'messages[0].content[0].type'",)),
            Bad(path, {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, ("'messages[0].content[0]'",)),
            Bad(path, {**base, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": 5}]}]}, ("'messages[0].content[0]'",)),
            Bad(path, {**base, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "1", "content": 5}]}]}, ("'messages[0].content[0].content'",)),
            Bad(path, {**base, "messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, ("'messages'", str(MAX_MESSAGES))),
            Bad(path, {**base, "system": 5}, ("'system'",)),
            Bad(path, {**base, "system": [{"type": "image"}]}, ("'system[0]'",)),
            Bad(path, {**base, "tools": 5}, ("'tools'",)),
            Bad(path, {**base, "tools": [{"name": ""}]}, ("'tools[0].name'",)),
            Bad(path, {**base, "tools": [{"name": "search", "type": "web_search_20250305"}]}, ("'tools[0]'", "server tools")),
            Bad(path, {**base, "tools": [{"name": "f", "input_schema": 5}]}, ("'tools[0].input_schema'",)),
            Bad(path, {**base, "thinking": {"type": "maybe"}}, ("'thinking.type'",)),
        ]
    cases += [
        Bad("/v1/messages", {k: v for k, v in messages.items() if k != "max_tokens"}, ("'max_tokens'", "required")),
        Bad("/v1/messages", {**messages, "max_tokens": 0}, ("'max_tokens'",)),
        Bad("/v1/messages", {**messages, "max_tokens": "4"}, ("'max_tokens'", "integer")),
        Bad("/v1/messages", {**messages, "max_tokens": 10**12}, ("'max_tokens'", "between")),
        Bad("/v1/messages", {**messages, "stop_sequences": "\n"}, ("'stop_sequences'",)),
        Bad("/v1/messages", {**messages, "stop_sequences": ["x"] * 17}, ("'stop_sequences'",)),
        Bad("/v1/messages", {**messages, "temperature": "x"}, ("'temperature'",)),
        Bad("/v1/messages", {**messages, "top_k": -1}, ("'top_k'",)),
        Bad("/v1/messages", {**messages, "stream": "yes"}, ("'stream'",)),
        Bad("/v1/messages", {**messages, "output_config": {"format": {"type": "regex"}}}, ("'output_config.format'",)),
        Bad("/v1/messages", {**messages, "output_config": {"format": {"type": "json_schema", "schema": {"type": 5}}}}, ("'output_config.format.schema'",)),
    ]
    return cases


def route_and_method_cases() -> list[Bad]:
    """Unknown routes and wrong methods: JSON errors too, never an HTML page."""
    return [
        Bad("/api/nope", b"", ("no route",), status=404, method="GET"),
        Bad("/v1/nope", b"", ("no route",), status=404, method="POST"),
        Bad("/v1/models/no-such-model", b"", ("no-such-model", "not found"), status=404, method="GET"),
        Bad("/v1/models/..%2F..%2Fetc%2Fpasswd", b"", ("not found",), status=404, method="GET"),
        Bad("/v1/models/mlx-community/Llama-3.2-1B-Instruct-4bit", b"", ("not found",), status=404, method="GET"),
        Bad("/api/generate", b"", ("method GET",), status=405, method="GET"),
        Bad("/api/tags", b"{}", ("method PUT",), status=405, method="PUT"),
        Bad("/v1/chat/completions", b"", ("method DELETE",), status=405, method="DELETE"),
        Bad("/v1/messages", b"", ("method GET",), status=405, method="GET"),
    ]


CASES = body_cases() + option_cases() + route_cases() + route_and_method_cases()


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1, "context_length": 2048}]
    with ready_daemon(tmp_path_factory.mktemp("validation"), models) as daemon:
        with httpx.Client(base_url=daemon.url, timeout=ANSWER_WITHIN) as client:
            yield client


def message_of(path: str, body: dict) -> str:
    """The error message, read from the shape of the route's API family."""
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["type"], str)
        return body["error"]["message"]
    if path.startswith("/v1/"):
        assert set(body["error"]) >= {"message", "type", "param", "code"}
        return body["error"]["message"]
    assert set(body) == {"error"}
    return body["error"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_request_gets_a_4xx_that_names_what_was_wrong(live, case):
    raw = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    started = time.monotonic()
    response = live.request(case.method, case.path, content=raw, headers={"Content-Type": case.content_type})
    assert time.monotonic() - started < ANSWER_WITHIN
    assert response.status_code == case.status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    message = message_of(case.path, response.json())
    assert all(word in message for word in case.words), message
    assert len(message) < 2000  # what was sent is quoted, never echoed whole
    if case.status == 405:
        allowed = response.headers["Allow"].split(",")
        assert allowed and case.method not in allowed


def test_openai_errors_name_the_param(live):
    for body, param in (
        ({**minimal("/v1/chat/completions"), "max_tokens": 0}, "max_tokens"),
        ({**minimal("/v1/chat/completions"), "temperature": "x"}, "temperature"),
        ({**minimal("/v1/chat/completions"), "messages": []}, "messages"),
        ({**minimal("/v1/chat/completions"), "model": 1}, "model"),
        ({**minimal("/v1/embeddings"), "dimensions": 0}, "dimensions"),
    ):
        path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
        error = live.post(path, json=body).json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["code"] == 400


def test_after_the_sweep_the_daemon_is_healthy_and_nothing_was_a_500(live):
    health = live.get("/health").json()
    assert health["status"] == "healthy" and health["queue_depth"] == 0
    assert [m["active_requests"] for m in health["models"]] == [0]
    metrics = live.get("/metrics").text
    statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("mlx_server_requests_total{")}
    assert "400" in statuses and "404" in statuses and not any(s.startswith("5") for s in statuses), statuses
    ok = live.post("/api/generate", json={"model": "demo", "prompt": "still fine?", "stream": False, "options": {"num_predict": 3}})
    assert ok.status_code == 200 and ok.json()["eval_count"] == 3
