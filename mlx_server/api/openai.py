"""The OpenAI API: chat and text completions, models, embeddings.

The same pipeline as every API (leases, admission, metrics); this module maps
OpenAI's parameters onto `GenerationOptions` and writes OpenAI's shapes. Streams are
SSE `data:` chunks closed by `data: [DONE]`; an error after the first byte is one
`data: {"error": ...}` chunk, which the official client raises.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import web

from .. import __version__
from ..config import ModelConfig
from ..errors import BadRequest, MlxServerError
from ..jobs import DoneEvent, TextEvent
from ..logprobs import LogprobTap, chat_logprobs, completion_logprobs, completion_logprobs_request, logprobs_request
from ..options import GenerationOptions
from ..prompts import fim_prompt, message_list, text_prompt, validate_messages
from ..structured import Constraint, json_grammar, one_constraint
from ..tools import THINKING, TOOL_CALL, Piece, Reply, ToolCall, collect, function_tools, pieces, template_tool_call, tool_choice
from .body import field, keep_alive_field, read_json, requested_model
from .keys import CONFIG, MANAGER, MODEL_KEY
from .middlewares import error_body
from .ollama import dimensions_field, embed_inputs, model_details, request_options, think_with_format
from .pipeline import CompletionSpec, chat_spec, completion
from .wire import LineStream

# OpenAI parameters that GenerationOptions has under the same name (top_k, min_p: common extensions)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty")
FINGERPRINT = f"mlx-server-{__version__}"


# --- parameters --------------------------------------------------------------------


def openai_options(request: web.Request, model: ModelConfig, body: dict[str, Any]) -> GenerationOptions:
    """OpenAI's sampling parameters over the model's defaults from models.yaml."""
    raw = {name: body[name] for name in SAMPLING if body.get(name) is not None}
    names = {name: name for name in raw}
    for theirs in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if body.get(theirs) is not None:
            raw["num_predict"] = field(body, theirs, int)
            names["num_predict"] = theirs
            if raw["num_predict"] < 1:
                raise BadRequest(f"'{theirs}' must be a positive integer", param=theirs)
    return request_options(request, model, raw, names=names)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Parameters that would change the answer's shape and that this server cannot honour."""
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("'n' must be 1: one choice per request", param="n")
    if body.get("best_of") not in (None, 1):
        raise BadRequest("'best_of' must be 1", param="best_of")


def response_format_constraint(value: Any) -> Constraint | None:
    """`response_format`: text, json_object or json_schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(json_grammar(None, param="response_format"))
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object", param="response_format")
        return Constraint(json_grammar(schema, param="response_format"))
    raise BadRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'", param="response_format")


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of content parts", param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise BadRequest(f"'{where}.content': this server's models accept text only, not {kind}", param="messages")
        else:
            raise BadRequest(f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}}", param="messages")
    return "\n".join(texts)


def openai_messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the internal shape; tool results learn their tool's name."""
    converted: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(message_list(raw, empty=False)):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object", param="messages")
        role = m.get("role")
        role = {"developer": "system", "function": "tool"}.get(role, role) if isinstance(role, str) else role
        item: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), where)}
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            if not isinstance(calls, list):
                raise BadRequest(f"'{where}.tool_calls' must be an array", param="messages")
            item["tool_calls"] = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRequest(f"'{where}.tool_calls' entries need function.name", param="messages")
                if call.get("id"):
                    names[str(call["id"])] = function["name"]
                item["tool_calls"].append(template_tool_call(call.get("id"), function["name"], function.get("arguments", "")))
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id:
                item["tool_call_id"] = call_id
            name = m.get("name") or names.get(str(call_id))
            if name:
                item["name"] = name
        converted.append(item)
    return validate_messages(converted)


def _prompt_input(raw: Any) -> str | list[int]:
    """/v1/completions `prompt`: one string or one list of token ids."""
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
        raw = raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in raw):
        return raw
    raise BadRequest("'prompt' must be a string or an array of token ids (one prompt per request)", param="prompt")


# --- responses -----------------------------------------------------------------------


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _finish_reason(done: DoneEvent, made_calls: bool, constraint: Constraint | None) -> str:
    if constraint is not None and constraint.closed_early:
        return "length"
    if made_calls and done.finish_reason == "stop":
        return "tool_calls"
    return done.finish_reason


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"call_{call.id}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }
    return body if index is None else {"index": index, **body}


def chunk_delta(item: Piece, index: int) -> dict[str, Any]:
    if item.kind == TOOL_CALL:
        return {"tool_calls": [_tool_call(item.call, index)]}
    if item.kind == THINKING:
        return {"reasoning_content": item.text}
    return {"content": item.text}


def chat_completion_body(name: str, reply: Reply, constraint: Constraint | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content if reply.content or not reply.calls else None}
    if reply.thinking:
        message["reasoning_content"] = reply.thinking
    if reply.calls:
        message["tool_calls"] = [_tool_call(call) for call in reply.calls]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": _finish_reason(reply.done, bool(reply.calls), constraint)}],
        "usage": _usage(reply.done),
    }


class _Sse:
    """OpenAI's stream: chunks that share an id, then usage if asked, then [DONE]."""

    def __init__(self, request: web.Request, kind: str, prefix: str, name: str, include_usage: bool):
        self.out = LineStream(request, sse=True)
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": name}
        self.include_usage = include_usage

    async def send(self, choice: dict[str, Any]) -> None:
        extra = {"system_fingerprint": FINGERPRINT} | ({"usage": None} if self.include_usage else {})
        await self.out.send(self.base | extra | {"choices": [{"index": 0, **choice}]})

    async def close(self, done: DoneEvent) -> web.StreamResponse:
        if self.include_usage:
            await self.out.send(self.base | {"system_fingerprint": FINGERPRINT, "choices": [], "usage": _usage(done)})
        await self.out.send_raw("data: [DONE]\n\n")
        return await self.out.finish()

    async def fail(self, error: MlxServerError) -> web.StreamResponse:
        if not self.out.started:
            raise error
        await self.out.send(error_body("openai", error))
        return await self.out.finish()


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = field(body, "stream_options", dict, {})
    if options and not stream:
        raise BadRequest("'stream_options' is only allowed with 'stream': true", param="stream_options")
    return bool(options.get("include_usage"))


# --- handlers ------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name, model = requested_model(request, body)
    messages = openai_messages(body.get("messages"))
    stream = field(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    refuse_unsupported(body)
    options = openai_options(request, model, body)
    tools, forced = tool_choice(body.get("tool_choice"), function_tools(body.get("tools")))
    constraint = one_constraint(response_format_constraint(body.get("response_format")), forced)
    think = think_with_format(None, constraint)
    wanted = logprobs_request(body.get("logprobs"), body.get("top_logprobs"))
    spec = chat_spec(model.name, messages, options, keep_alive_field(body), tools=tools, think=think, constrain=constraint, logprobs=wanted)
    tap = LogprobTap()

    def logprobs() -> dict[str, Any] | None:
        """The tokens' logprobs since the last chunk, when the request asked for them."""
        return chat_logprobs(tap.take()) if wanted is not None else None

    async with completion(request, spec) as c:
        parser = c.output_parser(tools)
        if not stream:
            reply = await collect(tap.tap(c.events()), parser)
            return web.json_response(chat_completion_body(name, reply, constraint, logprobs()))
        sse = _Sse(request, "chat.completion.chunk", "chatcmpl", name, include_usage)
        calls = 0
        try:
            await sse.send({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            async for item in pieces(tap.tap(c.events()), parser):
                if isinstance(item, Piece):
                    await sse.send({"delta": chunk_delta(item, calls), "logprobs": logprobs(), "finish_reason": None})
                    calls += item.kind == TOOL_CALL
            await sse.send({"delta": {}, "logprobs": logprobs(), "finish_reason": _finish_reason(c.done, calls > 0, constraint)})
            return await sse.close(c.done)
        except MlxServerError as e:
            return await sse.fail(e)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name, model = requested_model(request, body)
    prompt = _prompt_input(body.get("prompt"))
    suffix = field(body, "suffix", str, "")
    echo = field(body, "echo", bool, False)
    stream = field(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    refuse_unsupported(body)
    options = openai_options(request, model, body)
    if echo and not isinstance(prompt, str):
        raise BadRequest("'echo' needs a string prompt", param="echo")

    def build(tokenizer: Any) -> list[int]:
        if isinstance(prompt, list):
            if any(t >= len(tokenizer) for t in prompt):
                raise BadRequest(f"'prompt' holds a token id outside the vocabulary of '{name}'", param="prompt")
            return list(prompt)
        if suffix:
            return fim_prompt(tokenizer, prompt, suffix, name)
        return text_prompt(tokenizer, prompt)

    wanted = completion_logprobs_request(body.get("logprobs"))
    spec = CompletionSpec(model.name, build, options, keep_alive_field(body), logprobs=wanted)
    lead = prompt if echo else ""
    async with completion(request, spec) as c:
        if not stream:
            tap = LogprobTap()
            text = "".join([e.text async for e in tap.tap(c.events()) if isinstance(e, TextEvent)])
            done = c.done
            logprobs = completion_logprobs(tap.all, len(lead)) if wanted is not None else None
            choice = {"text": lead + text, "index": 0, "logprobs": logprobs, "finish_reason": done.finish_reason}
            return web.json_response(
                {
                    "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": name,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [choice],
                    "usage": _usage(done),
                }
            )
        sse = _Sse(request, "text_completion", "cmpl", name, include_usage)
        try:
            if lead:
                await sse.send({"text": lead, "logprobs": None, "finish_reason": None})
            offset = len(lead)
            async for event in c.events():
                if isinstance(event, TextEvent):
                    logprobs = completion_logprobs(list(event.logprobs), offset) if wanted is not None else None
                    await sse.send({"text": event.text, "logprobs": logprobs, "finish_reason": None})
                    offset += len(event.text)
            await sse.send({"text": "", "logprobs": None, "finish_reason": c.done.finish_reason})
            return await sse.close(c.done)
        except MlxServerError as e:
            return await sse.fail(e)


async def _model_entry(request: web.Request, model: ModelConfig) -> dict[str, Any]:
    snaps = {s.name: s for s in request.app[MANAGER].snapshot()}
    _, _, mtime = await asyncio.to_thread(model_details, model, snaps.get(model.name))
    return {"id": model.name, "object": "model", "created": int(mtime or 0), "owned_by": "mlx-server"}


async def list_models(request: web.Request) -> web.Response:
    entries = [await _model_entry(request, m) for m in request.app[CONFIG].models]
    return web.json_response({"object": "list", "data": entries})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    request[MODEL_KEY] = name
    return web.json_response(await _model_entry(request, request.app[MANAGER].resolve(name)))


def _embedding_input(raw: Any) -> list[str]:
    """Text only: token ids (what tiktoken makes, e.g. LangChain's OpenAIEmbeddings by
    default) belong to OpenAI's vocabulary, not this model's, and would embed garbage."""
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, str) and x for x in raw):
        return raw
    if isinstance(raw, list) and raw and all(isinstance(x, int) or isinstance(x, list) for x in raw):
        raise BadRequest(
            "'input' holds token ids; this server embeds text only, as ids from another tokenizer do not match its models: "
            "send the text (LangChain OpenAIEmbeddings: check_embedding_ctx_length=False)",
            param="input",
        )
    raise BadRequest("'input' must be a non-empty string or array of non-empty strings", param="input")


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    name, _ = requested_model(request, body)
    inputs = _embedding_input(body.get("input"))
    encoding = field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    result = await embed_inputs(request, name, inputs, keep_alive=keep_alive_field(body), truncate=False, dimensions=dimensions_field(body))

    def encode(vector: list[float]) -> Any:
        if encoding == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
    return web.json_response({"object": "list", "data": data, "model": name, "usage": usage})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/embeddings", embeddings)
