"""The Anthropic Messages API: what Claude Code speaks through ANTHROPIC_BASE_URL.

The same pipeline as every API (leases, admission, metrics). Anthropic's content
blocks map onto the internal message shape (tool_use -> tool_calls, tool_result ->
tool messages), and the answer goes back as text, thinking and tool_use blocks,
streamed as Anthropic's named SSE events.

A `{"role": "system"}` message inside `messages` (Claude Code sends them) is a
system turn at its place where the model's chat template accepts one there; where
the template refuses it, it is folded into the system prompt (prompts.chat_prompt).
A stream sends `ping` events while the prompt prefills, so the client never waits
in silence, and a prompt longer than the context gets Anthropic's own wording, so
Claude Code compacts its history.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiohttp import web

from ..config import ModelConfig
from ..errors import BadRequest, MlxServerError, brief
from ..jobs import DoneEvent
from ..options import GenerationOptions
from ..prompts import chat_prompt, message_list, validate_messages
from ..structured import Constraint, ToolCallConstraint, json_grammar, one_constraint
from ..tokenizer_cache import model_tokenizer
from ..tools import CONTENT, THINKING, TOOL_CALL, Piece, Reply, ToolCall, collect, pieces, template_tool_call
from .body import field, keep_alive_field, read_json, requested_model
from .keys import MANAGER
from .middlewares import error_body
from .ollama import request_options, think_with_format
from .pipeline import Completion, CompletionSpec, PromptTooLong, chat_spec, completion
from .wire import LineStream

# --- parameters --------------------------------------------------------------------


def anthropic_options(request: web.Request, model: ModelConfig, body: dict[str, Any]) -> GenerationOptions:
    max_tokens = field(body, "max_tokens", int, required=True)
    if max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1", param="max_tokens")
    raw: dict[str, Any] = {name: body[name] for name in ("temperature", "top_p", "top_k") if body.get(name) is not None}
    raw["num_predict"] = max_tokens
    if field(body, "stop_sequences", list) is not None:  # a list, never a bare string
        raw["stop"] = body["stop_sequences"]
    names = {name: name for name in raw} | {"num_predict": "max_tokens", "stop": "stop_sequences"}
    return request_options(request, model, raw, names=names)


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise BadRequest(f"'{where}' must be a text block {{\"type\": \"text\", \"text\": ...}}", param=where.split("[")[0])
    return block["text"]


def system_text(raw: Any) -> str:
    """`system`: a string or text blocks."""
    if raw is None or isinstance(raw, str):
        return raw or ""
    if not isinstance(raw, list):
        raise BadRequest("'system' must be a string or an array of text blocks", param="system")
    return "\n\n".join(_block_text(b, f"system[{i}]") for i, b in enumerate(raw))


def _system_blocks(content: Any, where: str) -> str:
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of text blocks", param="messages")
    return "\n\n".join(_block_text(b, f"{where}.content[{j}]") for j, b in enumerate(content))


def anthropic_tools(raw: Any, tool_choice: Any) -> list[dict[str, Any]]:
    """Anthropic tool definitions as the function tools chat templates read."""
    if raw is None or (isinstance(tool_choice, dict) and tool_choice.get("type") == "none"):
        return []
    if not isinstance(raw, list):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequest(f"'tools[{i}].name' must be a non-empty string", param="tools")
        if tool.get("type") not in (None, "custom"):
            raise BadRequest(f"'tools[{i}]': server tools ({brief(tool['type'])}) are not supported; define the tool with input_schema", param="tools")
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise BadRequest(f"'tools[{i}].input_schema' must be a JSON schema object", param="tools")
        function = {"name": tool["name"], "description": tool.get("description", ""), "parameters": schema}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n".join(_block_text(b, f"{where}.content[{k}]") for k, b in enumerate(content))
    if not isinstance(content, str):
        raise BadRequest(f"'{where}.content' must be a string or text blocks", param="messages")
    return f"Error: {content}" if block.get("is_error") else content


def anthropic_messages(raw: Any, system: str) -> list[dict[str, Any]]:
    """Anthropic messages -> the internal shape: tool results become tool messages."""
    converted: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    names: dict[str, str] = {}  # tool_use id -> tool name
    for i, m in enumerate(message_list(raw, empty=False)):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):
            raise BadRequest(f"'{where}.role' must be 'user', 'assistant' or 'system', got {brief(role)}", param="messages")
        content = m.get("content")
        if role == "system":
            converted.append({"role": "system", "content": content if isinstance(content, str) else _system_blocks(content, where)})
            continue
        if isinstance(content, str):
            converted.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"'{where}.content' must be a string or an array of content blocks", param="messages")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_block_text(block, at))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise BadRequest(f"'{at}' needs a name and an input object", param="messages")
                names[str(block.get("id"))] = block["name"]
                calls.append(template_tool_call(block.get("id"), block["name"], block.get("input", {})))
            elif kind == "tool_result" and role == "user":
                call_id = str(block.get("tool_use_id"))
                result = {"role": "tool", "content": _tool_result_text(block, at), "tool_call_id": call_id}
                converted.append(result | ({"name": names[call_id]} if call_id in names else {}))
            elif kind in ("thinking", "redacted_thinking"):
                continue  # earlier reasoning is not replayed to the model
            elif kind in ("image", "document"):
                raise BadRequest(f"'{at}': this server's models accept text only, not {kind}", param="messages")
            else:
                raise BadRequest(f"'{at}.type' {brief(kind)} is not supported in a {role} message", param="messages")
        if texts or calls:
            converted.append({"role": role, "content": "\n".join(texts)} | ({"tool_calls": calls} if calls else {}))
    return validate_messages(converted)


def output_constraint(raw: Any) -> Constraint | None:
    """`output_config.format`: Anthropic's structured outputs, a JSON schema."""
    output_format = raw.get("format") if isinstance(raw, dict) else None
    if output_format is None:
        return None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema" or not isinstance(output_format.get("schema"), dict):
        raise BadRequest("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}", param="output_config")
    return Constraint(json_grammar(output_format["schema"], param="output_config.format.schema"))


def forced_tool_call(choice: Any, tools: list[dict[str, Any]]) -> ToolCallConstraint | None:
    """`tool_choice` {"type": "any"} or {"type": "tool", "name": ...}: the answer is one tool call."""
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return None
    if kind == "any":
        return ToolCallConstraint(tools, None)
    if kind == "tool" and isinstance(choice.get("name"), str):
        return ToolCallConstraint(tools, choice["name"])
    raise BadRequest("'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}", param="tool_choice")


def _thinking(raw: Any) -> bool | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise BadRequest("'thinking.type' must be 'enabled', 'adaptive' or 'disabled'", param="thinking")
    return kind != "disabled"


# --- responses -----------------------------------------------------------------------


def _stop(done: DoneEvent, made_calls: bool, stops: tuple[str, ...], tokenizer: Any, constraint: Constraint | None) -> tuple[str, str | None]:
    """stop_reason and stop_sequence; which stop string matched is found in the output."""
    if done.finish_reason == "length" or constraint is not None and constraint.closed_early:
        return "max_tokens", None
    if made_calls:
        return "tool_use", None
    if stops:
        text = tokenizer.decode(list(done.output_tokens))
        found = [(text.find(s), s) for s in stops if s in text]
        if found:
            return "stop_sequence", min(found)[1]
    return "end_turn", None


def _usage(done: DoneEvent) -> dict[str, int]:
    return {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name, "input": call.arguments}


class BlockEvents:
    """Pieces -> Anthropic's content block events; one block is open at a time."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the kind of the open text or thinking block

    def piece(self, item: Piece) -> list[dict[str, Any]]:
        if item.kind == TOOL_CALL:
            self.index += 1
            delta = {"type": "input_json_delta", "partial_json": json.dumps(item.call.arguments, ensure_ascii=False)}
            return self.close() + [
                {"type": "content_block_start", "index": self.index, "content_block": _tool_use(item.call) | {"input": {}}},
                {"type": "content_block_delta", "index": self.index, "delta": delta},
                {"type": "content_block_stop", "index": self.index},
            ]
        events = []
        if self.open != item.kind:
            events = self.close()
            self.index += 1
            self.open = item.kind
            start = {"type": "thinking", "thinking": "", "signature": ""} if item.kind == THINKING else {"type": "text", "text": ""}
            events.append({"type": "content_block_start", "index": self.index, "content_block": start})
        if item.text:
            delta = {"type": "thinking_delta", "thinking": item.text} if item.kind == THINKING else {"type": "text_delta", "text": item.text}
            events.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        return events

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def finish(self) -> list[dict[str, Any]]:
        """Close the last block; an empty answer is still one (empty) text block."""
        if self.index < 0:
            return self.piece(Piece(CONTENT, "")) + self.close()
        return self.close()


def message_body(message_id: str, name: str, reply: Reply, *, think: bool | None, stop: tuple[str, str | None]) -> dict[str, Any]:
    blocks = [{"type": "thinking", "thinking": reply.thinking, "signature": ""}] if think and reply.thinking else []
    blocks += [{"type": "text", "text": reply.content}] if reply.content or not reply.calls else []
    blocks += [_tool_use(call) for call in reply.calls]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": name,
        "content": blocks,
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": _usage(reply.done),
    }


# --- handlers ------------------------------------------------------------------------

PING_SECONDS = 5.0  # Claude Code gives up after 300 s without a byte; Anthropic pings about this often
T = TypeVar("T")


@asynccontextmanager
async def anthropic_completion(request: web.Request, spec: CompletionSpec) -> AsyncIterator[Completion]:
    """`completion`, with a prompt over the context worded as Anthropic words it."""
    try:
        async with completion(request, spec) as c:
            yield c
    except PromptTooLong as e:
        raise BadRequest(f"prompt is too long: {e.prompt_tokens} tokens > {e.context} maximum", param="messages") from None


async def with_pings(items: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """`items`, with None whenever `interval` seconds pass without one (the next item is
    awaited as one task throughout, so nothing is cancelled or lost)."""
    iterator = aiter(items)
    while True:
        step = asyncio.ensure_future(anext(iterator))
        try:
            while not (await asyncio.wait({step}, timeout=interval))[0]:
                yield None
        except BaseException:
            step.cancel()
            raise
        try:
            yield step.result()
        except StopAsyncIteration:
            return


def _request(request: web.Request, body: dict[str, Any]) -> tuple[ModelConfig, list[dict[str, Any]], list[dict[str, Any]], bool | None]:
    """What /v1/messages and count_tokens share: model, messages, tools, thinking."""
    _, model = requested_model(request, body)
    messages = anthropic_messages(body.get("messages"), system_text(body.get("system")))
    tools = anthropic_tools(body.get("tools"), body.get("tool_choice"))
    return model, messages, tools, _thinking(body.get("thinking"))


async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model, chat, tools, think = _request(request, body)
    name = body["model"]
    stream = field(body, "stream", bool, False)
    options = anthropic_options(request, model, body)
    forced = forced_tool_call(body.get("tool_choice"), tools)
    constraint = one_constraint(output_constraint(body.get("output_config")), forced)
    think = think_with_format(think, constraint)
    spec = chat_spec(model.name, chat, options, keep_alive_field(body), tools=tools, think=think, constrain=constraint)
    async with anthropic_completion(request, spec) as c:
        parser = c.output_parser(tools)
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if not stream:
            reply = await collect(c.events(), parser)
            stop = _stop(reply.done, bool(reply.calls), options.stop, c.lease.tokenizer, constraint)
            return web.json_response(message_body(message_id, name, reply, think=think, stop=stop))
        out = LineStream(request, sse=True)
        blocks = BlockEvents()
        made_calls = False
        try:
            start = {"id": message_id, "type": "message", "role": "assistant", "model": name, "content": [], "stop_reason": None, "stop_sequence": None}
            await _send(out, {"type": "message_start", "message": start | {"usage": {"input_tokens": len(c.prompt), "output_tokens": 0}}})
            async for item in with_pings(pieces(c.events(), parser), PING_SECONDS):
                if item is None:
                    await _send(out, {"type": "ping"})
                elif isinstance(item, Piece) and (item.kind != THINKING or think):
                    await _send(out, *blocks.piece(item))
                    made_calls |= item.kind == TOOL_CALL
            reason, sequence = _stop(c.done, made_calls, options.stop, c.lease.tokenizer, constraint)
            await _send(
                out,
                *blocks.finish(),
                {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": _usage(c.done)},
                {"type": "message_stop"},
            )
        except MlxServerError as e:
            if not out.started:
                raise
            await out.send(error_body("anthropic", e), event="error")
        return await out.finish()


async def _send(out: LineStream, *events: dict[str, Any]) -> None:
    for event in events:
        await out.send(event, event=event["type"])


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's size in the model's own tokens, chat template included.

    Only the tokenizer is needed: no lease, so nothing is loaded or evicted. A model
    whose files are not on disk yet is counted under a lease (which fetches it).
    """
    body = await read_json(request)
    model, chat, tools, think = _request(request, body)
    keep_alive = keep_alive_field(body)
    tokenizer = await model_tokenizer(model)
    if tokenizer is None:
        async with request.app[MANAGER].lease(model.name, keep_alive=keep_alive) as lease:
            tokenizer = lease.tokenizer
    ids = await asyncio.to_thread(chat_prompt, tokenizer, chat, tools=tools, think=think)
    return web.json_response({"input_tokens": len(ids)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
