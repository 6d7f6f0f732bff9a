"""The OpenAI Responses API (`POST /v1/responses`): what Codex CLI, the OpenAI Agents
SDK and pydantic-ai's Responses model speak.

The same pipeline as every API. `input` items map onto the internal message shape
(function_call -> an assistant's tool_calls, function_call_output -> a tool message);
the answer goes back as output items (reasoning, message, function_call), streamed
as the Responses event sequence, each event numbered by `sequence_number`.

Only `function` tools reach the prompt; hosted tools (web_search, file_search, ...)
cannot run here, so they are left out and named in the response's `warnings`.
Stored responses (`store`, the default) are kept in memory, bounded in count, age
and bytes, so `previous_response_id` can continue a conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import ModelConfig
from ..errors import BadRequest, MlxServerError, brief
from ..jobs import DoneEvent
from ..options import GenerationOptions
from ..prompts import THINK_LEVELS, message_list, validate_messages
from ..structured import Constraint, json_grammar, one_constraint
from ..tools import CONTENT, THINKING, TOOL_CALL, Piece, Reply, ToolCall, collect, function_tools, pieces, template_tool_call, tool_choice
from .body import field, keep_alive_field, read_json, requested_model
from .ollama import request_options
from .pipeline import chat_spec, completion
from .wire import LineStream

STORE_SIZE = 1000  # responses kept for previous_response_id
STORE_SECONDS = 3600.0  # ...and for at most this long
STORE_BYTES = 128 << 20  # ...in at most this much JSON: the store lives outside the memory ledger
REASONING_EFFORTS = ("none", "minimal", *THINK_LEVELS)


KEPT = f"stored responses are kept in memory: the latest {STORE_SIZE}, for {STORE_SECONDS:g}s, {STORE_BYTES >> 20} MB in all"


class ResponseNotFound(MlxServerError):
    status = 404
    kind = "invalid_request_error"

    def __init__(self, response_id: str):
        super().__init__(f"Response with id {brief(response_id)} not found ({KEPT})")


class PreviousResponseNotFound(BadRequest):
    """OpenAI answers an unknown `previous_response_id` with a 400, not a 404."""

    def __init__(self, response_id: str):
        super().__init__(f"Previous response with id {brief(response_id)} not found ({KEPT})", param="previous_response_id")


@dataclass(frozen=True, slots=True)
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # internal messages, instructions excluded (they are not carried over)
    stored_at: float
    size: int  # bytes of both, as JSON


class ResponseStore:
    """The most recent responses, by id; the oldest go first, none outlive `ttl`, and
    together they hold at most `max_bytes` of JSON (each request may carry megabytes)."""

    def __init__(self, size: int = STORE_SIZE, ttl: float = STORE_SECONDS, max_bytes: int = STORE_BYTES, clock: Callable[[], float] = time.monotonic):
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a new response; one larger than the whole store is not kept at all."""
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        if size > self._max_bytes:
            return
        self._items[response["id"]] = Stored(response, conversation, self._clock(), size)
        self._bytes += size
        self._expire()

    def get(self, response_id: str) -> Stored:
        self._expire()
        found = self._items.get(response_id)
        if found is None:
            raise ResponseNotFound(response_id)
        return found

    def delete(self, response_id: str) -> None:
        self._bytes -= self.get(response_id).size
        del self._items[response_id]

    def _expire(self) -> None:
        now = self._clock()
        while self._items and (len(self._items) > self._size or self._bytes > self._max_bytes or now - next(iter(self._items.values())).stored_at > self._ttl):
            self._bytes -= self._items.popitem(last=False)[1].size


RESPONSES = web.AppKey("responses", ResponseStore)


# --- parameters --------------------------------------------------------------------


def _parts_text(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of content parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal") and isinstance(part.get("text", part.get("refusal")), str):
            texts.append(part.get("text", part.get("refusal")))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise BadRequest(f"'{where}.content[{j}]': this server's models accept text only, not {kind}", param="input")
        else:
            raise BadRequest(f"'{where}.content[{j}]' must be an input_text or output_text part, got type {brief(kind)}", param="input")
    return "\n".join(texts)


def input_messages(raw: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    """`input` -> internal messages. `names` maps call ids to tool names (earlier turns
    included) and learns this input's calls."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    converted: list[dict[str, Any]] = []
    for i, item in enumerate(message_list(raw, field="input", empty=False)):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"'{where}.role' must be 'user', 'assistant', 'system' or 'developer', got {brief(role)}", param="input")
            converted.append({"role": "system" if role == "developer" else role, "content": _parts_text(item.get("content"), where)})
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise BadRequest(f"'{where}' (function_call) needs 'name' and 'call_id' strings", param="input")
            names[call_id] = name
            call = template_tool_call(call_id, name, item.get("arguments", ""))
            last = converted[-1] if converted else None
            if last is not None and last["role"] == "assistant":  # text and calls of one turn, or parallel calls
                last.setdefault("tool_calls", []).append(call)
            else:
                converted.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequest(f"'{where}' (function_call_output) needs a 'call_id' string", param="input")
            output = item.get("output", "")
            text = output if isinstance(output, str) else _parts_text(output, where)
            converted.append({"role": "tool", "content": text, "tool_call_id": call_id} | ({"name": names[call_id]} if call_id in names else {}))
        elif kind == "reasoning":
            continue  # earlier reasoning is not replayed to the model
        else:
            raise BadRequest(f"'{where}.type' {brief(kind)} is not supported: use message, function_call or function_call_output", param="input")
    return converted


def response_tools(raw: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Function tools in the shape chat templates read, and a warning per hosted tool left out."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    functions, warnings = [], []
    for i, tool in enumerate(raw):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
            functions.append({"type": "function", "function": function})
        elif isinstance(kind, str):
            warnings.append(f"tools[{i}]: {kind} tools cannot run on this server; left out of the prompt")
        else:
            raise BadRequest(f"'tools[{i}]' must be an object with a 'type'", param="tools")
    return function_tools(functions), warnings


def text_constraint(raw: Any) -> Constraint | None:
    """`text.format`: text, json_object or json_schema (flat: name, schema, strict)."""
    text_format = raw.get("format") if isinstance(raw, dict) else None
    if text_format is None:
        if raw is not None and not isinstance(raw, dict):
            raise BadRequest("'text' must be an object", param="text")
        return None
    kind = text_format.get("type") if isinstance(text_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(json_grammar(None, param="text.format"))
    if kind == "json_schema":
        if not isinstance(text_format.get("schema"), dict):
            raise BadRequest("'text.format.schema' must be a JSON schema object", param="text")
        return Constraint(json_grammar(text_format["schema"], param="text.format.schema"))
    raise BadRequest("'text.format.type' must be 'text', 'json_object' or 'json_schema'", param="text")


def reasoning_think(raw: Any) -> bool | str | None:
    """`reasoning.effort`: none/minimal turn thinking off, low/medium/high on at that level."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("'reasoning' must be an object", param="reasoning")
    effort = raw.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise BadRequest(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)}, got {brief(effort)}", param="reasoning")
    if effort is None:
        return None
    return effort if effort in THINK_LEVELS else False


@dataclass(frozen=True, slots=True)
class ResponseRequest:
    """A parsed /v1/responses body: the conversation and what the response echoes back."""

    name: str
    model: ModelConfig
    conversation: list[dict[str, Any]]  # without instructions: what a later response continues
    instructions: str | None
    tools: list[dict[str, Any]]
    options: GenerationOptions
    constraint: Constraint | None
    think: bool | str | None
    echo: dict[str, Any]
    warnings: tuple[str, ...] = ()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + self.conversation


def _continued(store: ResponseStore, previous_id: str) -> list[dict[str, Any]]:
    try:
        return store.get(previous_id).conversation
    except ResponseNotFound:
        raise PreviousResponseNotFound(previous_id) from None


def parse_request(request: web.Request, body: dict[str, Any]) -> ResponseRequest:
    name, model = requested_model(request, body)
    store = request.app[RESPONSES]
    previous_id = field(body, "previous_response_id", str)
    earlier = _continued(store, previous_id) if previous_id else []
    names = {c["id"]: c["function"]["name"] for m in earlier for c in m.get("tool_calls", []) if c.get("id")}
    if body.get("input") is None:
        raise BadRequest("'input' is required", param="input")
    conversation = validate_messages(earlier + input_messages(body["input"], names), field="input")
    instructions = field(body, "instructions", str)
    tools, warnings = response_tools(body.get("tools"))
    tools, forced = tool_choice(body.get("tool_choice"), tools)
    constraint = one_constraint(text_constraint(body.get("text")), forced)
    think = reasoning_think(body.get("reasoning"))
    if constraint is not None:
        think = False  # a grammar shapes the whole output; the effort is a hint, not a demand
    raw: dict[str, Any] = {k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        raw["num_predict"] = field(body, "max_output_tokens", int)
        if raw["num_predict"] < 1:
            raise BadRequest("'max_output_tokens' must be a positive integer", param="max_output_tokens")
    options = request_options(request, model, raw, names={"num_predict": "max_output_tokens"})
    include = field(body, "include", list, [])
    if not all(isinstance(x, str) for x in include):
        raise BadRequest("'include' must be an array of strings", param="include")
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": field(body, "metadata", dict, {}),
        "parallel_tool_calls": field(body, "parallel_tool_calls", bool, True),
        "previous_response_id": previous_id,
        "reasoning": field(body, "reasoning", dict, {"effort": None, "summary": None}),
        "store": field(body, "store", bool, True),
        "temperature": options.temperature,
        "text": field(body, "text", dict, {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": options.top_p,
        "truncation": "disabled",
        "user": body.get("user"),
    }
    return ResponseRequest(name, model, conversation, instructions, tools, options, constraint, think, echo, tuple(warnings))


# --- responses -----------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def response_object(
    response_id: str, parsed: ResponseRequest, created: int, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, error: dict[str, str] | None = None
) -> dict[str, Any]:
    body = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": parsed.name,
        "output": output,
        **parsed.echo,
        "usage": usage,
    }
    return body | ({"warnings": list(parsed.warnings)} if parsed.warnings else {})


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if text else [], "status": status}


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False) if status == "completed" else ""
    return {"type": "function_call", "id": f"fc_{call.id}", "call_id": f"call_{call.id}", "name": call.name, "arguments": arguments, "status": status}


def output_items(reply: Reply) -> list[dict[str, Any]]:
    items = [_reasoning_item(_id("rs"), reply.thinking)] if reply.thinking else []
    items += [_message_item(_id("msg"), reply.content)] if reply.content or not reply.calls else []
    return items + [_call_item(call) for call in reply.calls]


def assistant_turn(reply: Reply) -> dict[str, Any]:
    """The answer as an internal message, for a later previous_response_id."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = [template_tool_call(f"call_{c.id}", c.name, c.arguments) for c in reply.calls]
    return message


def _status(done: DoneEvent, constraint: Constraint | None) -> str:
    closed = constraint is not None and constraint.closed_early
    return "incomplete" if done.finish_reason == "length" or closed else "completed"


class OutputEvents:
    """Pieces -> the Responses stream's item events; one text or reasoning item is open at a time."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []  # finished items, in output order
        self.open: str | None = None  # CONTENT | THINKING
        self.open_id = ""
        self.text = ""

    def piece(self, item: Piece) -> list[dict[str, Any]]:
        if item.kind == TOOL_CALL:
            events = self.close()
            done = _call_item(item.call)
            arguments = done["arguments"]
            index = len(self.items)
            self.items.append(done)
            return events + [
                {"type": "response.output_item.added", "output_index": index, "item": _call_item(item.call, "in_progress")},
                {"type": "response.function_call_arguments.delta", "item_id": done["id"], "output_index": index, "delta": arguments},
                {"type": "response.function_call_arguments.done", "item_id": done["id"], "output_index": index, "name": done["name"], "arguments": arguments},
                {"type": "response.output_item.done", "output_index": index, "item": done},
            ]
        events = []
        if self.open != item.kind:
            events = self.close()
            events += self._start(item.kind)
        self.text += item.text
        at = {"item_id": self.open_id, "output_index": len(self.items)}
        if item.kind == THINKING:
            events.append({"type": "response.reasoning_summary_text.delta", **at, "summary_index": 0, "delta": item.text})
        else:
            events.append({"type": "response.output_text.delta", **at, "content_index": 0, "delta": item.text, "logprobs": []})
        return events

    def _start(self, kind: str) -> list[dict[str, Any]]:
        self.open, self.text = kind, ""
        index = len(self.items)
        if kind == THINKING:
            self.open_id = _id("rs")
            return [
                {"type": "response.output_item.added", "output_index": index, "item": {"type": "reasoning", "id": self.open_id, "summary": []}},
                {"type": "response.reasoning_summary_part.added", "item_id": self.open_id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
            ]
        self.open_id = _id("msg")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            {"type": "response.output_item.added", "output_index": index, "item": _message_item(self.open_id, "", "in_progress")},
            {"type": "response.content_part.added", "item_id": self.open_id, "output_index": index, "content_index": 0, "part": part},
        ]

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """End the open item: `incomplete` when the response failed part-way through it."""
        if self.open is None:
            return []
        index, at = len(self.items), {"item_id": self.open_id, "output_index": len(self.items)}
        if self.open == THINKING:
            done = _reasoning_item(self.open_id, self.text, status)
            events = [
                {"type": "response.reasoning_summary_text.done", **at, "summary_index": 0, "text": self.text},
                {"type": "response.reasoning_summary_part.done", **at, "summary_index": 0, "part": {"type": "summary_text", "text": self.text}},
            ]
        else:
            done = _message_item(self.open_id, self.text, status)
            events = [
                {"type": "response.output_text.done", **at, "content_index": 0, "text": self.text, "logprobs": []},
                {"type": "response.content_part.done", **at, "content_index": 0, "part": done["content"][0]},
            ]
        self.items.append(done)
        self.open = None
        return events + [{"type": "response.output_item.done", "output_index": index, "item": done}]

    def finish(self) -> list[dict[str, Any]]:
        """Close the last item; an empty answer is still one (empty) message."""
        if not self.items and self.open is None:
            return self._start(CONTENT) + self.close()
        return self.close()


class _EventStream:
    """Named SSE events, each with the next `sequence_number`."""

    def __init__(self, request: web.Request):
        self.out = LineStream(request, sse=True)
        self.sequence = 0

    async def send(self, *events: dict[str, Any]) -> None:
        for event in events:
            await self.out.send(event | {"sequence_number": self.sequence}, event=event["type"])
            self.sequence += 1


# --- handlers ------------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    parsed = parse_request(request, body)
    stream = field(body, "stream", bool, False)
    store = request.app[RESPONSES]
    spec = chat_spec(parsed.model.name, parsed.messages, parsed.options, keep_alive_field(body), tools=parsed.tools, think=parsed.think, constrain=parsed.constraint)
    response_id, created = _id("resp"), int(time.time())
    async with completion(request, spec) as c:
        parser = c.output_parser(parsed.tools)
        if not stream:
            reply = await collect(c.events(), parser)
            final = response_object(response_id, parsed, created, _status(reply.done, parsed.constraint), output_items(reply), _usage(reply.done))
            if parsed.echo["store"]:
                store.put(final, parsed.conversation + [assistant_turn(reply)])
            return web.json_response(final)
        out = _EventStream(request)
        items = OutputEvents()
        reply = Reply()
        try:
            started = response_object(response_id, parsed, created, "in_progress", [], None)
            await out.send({"type": "response.created", "response": started}, {"type": "response.in_progress", "response": started})
            async for item in pieces(c.events(), parser):
                if isinstance(item, Piece):
                    reply.add(item)
                    await out.send(*items.piece(item))
            status = _status(c.done, parsed.constraint)
            await out.send(*items.finish())
            final = response_object(response_id, parsed, created, status, items.items, _usage(c.done))
            if parsed.echo["store"]:
                store.put(final, parsed.conversation + [assistant_turn(reply)])
            await out.send({"type": f"response.{status}", "response": final})
        except MlxServerError as e:
            if not out.out.started:
                raise
            # What OpenAI sends: the open item ends incomplete, then response.failed (clients wait for a terminal event).
            closing = items.close("incomplete")
            error = {"code": "server_error" if e.status >= 500 else "invalid_prompt", "message": e.message}
            failed = response_object(response_id, parsed, created, "failed", items.items, None, error)
            await out.send(*closing, {"type": "response.failed", "response": failed})
        return await out.out.finish()


async def get_response(request: web.Request) -> web.Response:
    return web.json_response(request.app[RESPONSES].get(request.match_info["response_id"]).response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    request.app[RESPONSES].delete(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


def add_routes(app: web.Application) -> None:
    app[RESPONSES] = ResponseStore()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
