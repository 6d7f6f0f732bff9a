"""The Ollama API: parse, run through the shared pipeline, format.

Streaming is the default and real: each decoded piece leaves as one NDJSON line.
An unknown model is a 404; nothing is ever answered by a different model.

/api/generate also speaks the old MLX API Server's dialect, chosen by the body alone:
one with that server's own top-level fields (`max_tokens`, `temperature`, `category`)
or without a `model` (which Ollama refuses) is answered as that server did.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from ..config import ModelConfig
from ..errors import BadRequest, MlxServerError, RouteError, UpstreamError, brief
from ..logprobs import LogprobTap, logprobs_request, ollama_logprobs
from ..manager import ModelSnapshot, ModelState
from ..options import GenerationOptions, merge_options, parse_options
from ..prompts import THINK_LEVELS, capabilities, chat_prompt, fim_prompt, text_prompt, validate_messages
from ..sources import SourceError, describe, locate, peek
from ..structured import Constraint, json_grammar
from ..tokenizer_cache import tokenizer_of
from ..tools import THINKING, TOOL_CALL, Piece, ToolCall, collect, function_tools, pieces, template_tool_call
from .body import field, keep_alive_field, read_json, requested_model
from .keys import CONFIG, ENGINE, GROUPS, MANAGER, METRICS, MODEL_KEY
from .pipeline import Completion, CompletionSpec, chat_spec, completion, durations_ns
from .priority import body_priority, request_priority
from .status import memory_json
from .wire import LineStream, rfc3339

FOREVER_TIMESTAMP = 10_000_000_000.0  # 2286-11-20: how "never expires" reads in expires_at
OLD_SERVER_FIELDS = ("max_tokens", "temperature", "category")  # never top-level in an Ollama body
OLD_SERVER_OPTIONS = {"max_tokens": "num_predict", "temperature": "temperature"}
OLD_SERVER_MAX_TOKENS = 2048  # the old server's default answer length
MAX_EMBED_INPUTS = 2048  # OpenAI's limit: one request must not hold the engine thread for minutes


def request_options(request: web.Request, model: ModelConfig, raw: Any, *, names: dict[str, str] | None = None) -> GenerationOptions:
    """defaults.options < the model's options < the request's options.

    `names` maps an option to the caller's own parameter name (num_predict ->
    max_tokens), so the OpenAI and Anthropic APIs' errors name what they sent.
    """
    try:
        given = parse_options(raw)
    except BadRequest as e:
        theirs = (names or {}).get(e.param or "")
        if theirs is None:
            raise
        raise BadRequest(e.message.replace(f"option '{e.param}'", f"'{theirs}'"), param=theirs) from None
    return merge_options(request.app[CONFIG].defaults.options, model.options, given)


def format_constraint(value: Any) -> Constraint | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema."""
    if value is None or value == "":
        return None
    if value == "json":
        return Constraint(json_grammar(None, param="format"))
    if isinstance(value, dict):
        return Constraint(json_grammar(value, param="format"))
    raise BadRequest(f"'format' must be \"json\" or a JSON schema object, got {brief(value)}", param="format")


def think_with_format(think: bool | str | None, constraint: Constraint | None) -> bool | str | None:
    """A grammar shapes the whole output, so thinking is off when one is given."""
    if constraint is None:
        return think
    if think:
        raise BadRequest("'think' cannot be combined with a structured output format", param="think")
    return False


def digest(model: ModelConfig) -> str:
    return hashlib.sha256(f"{model.name}\0{model.source}".encode()).hexdigest()


# --- generation ------------------------------------------------------------------


async def _load_or_unload(request: web.Request, name: str, keep_alive: float | None, *, chat: bool) -> web.Response:
    """Ollama: an empty prompt loads the model; with keep_alive 0 it unloads it."""
    manager = request.app[MANAGER]
    if keep_alive == 0:
        await manager.unload(name)
        reason = "unload"
    else:
        async with manager.lease(name, keep_alive=keep_alive, priority=request_priority(request)):
            pass
        reason = "load"
    body: dict[str, Any] = {"model": name, "created_at": rfc3339()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body |= {"done": True, "done_reason": reason}
    return web.json_response(body)


async def _respond(
    request: web.Request,
    spec: CompletionSpec,
    *,
    stream: bool,
    name: str,
    chat: bool,
    tools: list[dict[str, Any]] | None = None,
    constraint: Constraint | None = None,
) -> web.StreamResponse:
    """Run the completion and answer as one object or as NDJSON lines."""
    tap = LogprobTap()

    def logprobs() -> dict[str, Any]:
        """The tokens' logprobs since the last line, when the request asked for them."""
        return {"logprobs": ollama_logprobs(tap.take())} if spec.logprobs is not None else {}

    async with completion(request, spec) as c:
        parser = c.output_parser(tools)
        if not stream:
            reply = await collect(tap.tap(c.events()), parser)
            final = _final(c, name, chat, constraint)
            final.update(answer_fields(chat, reply.content, reply.thinking, reply.calls) | logprobs())
            return web.json_response(final)
        out = LineStream(request)
        calls = 0
        try:
            async for item in pieces(tap.tap(c.events()), parser):
                if isinstance(item, Piece):
                    await out.send({"model": name, "created_at": rfc3339(), **piece_fields(chat, item, calls), **logprobs(), "done": False})
                    calls += item.kind == TOOL_CALL
            await out.send(_final(c, name, chat, constraint) | answer_fields(chat, "", "", []) | logprobs())
        except MlxServerError as e:
            if not out.started:
                raise
            await out.send({"error": e.message})
        return await out.finish()


def answer_fields(chat: bool, content: str, thinking: str, calls: list[ToolCall], *, first_index: int = 0) -> dict[str, Any]:
    """The answer's text fields: `message` for chat, `response` for generate."""
    if not chat:
        return {"response": content} | ({"thinking": thinking} if thinking else {})
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{call.id}", "function": {"index": first_index + i, "name": call.name, "arguments": call.arguments}}
            for i, call in enumerate(calls)
        ]
    return {"message": message}


def piece_fields(chat: bool, item: Piece, index: int) -> dict[str, Any]:
    if item.kind == TOOL_CALL:
        return answer_fields(chat, "", "", [item.call], first_index=index)
    if item.kind == THINKING:
        return answer_fields(chat, "", item.text, [])
    return answer_fields(chat, item.text, "", [])


def _final(c: Completion, name: str, chat: bool, constraint: Constraint | None) -> dict[str, Any]:
    done = c.done
    assert done is not None
    reason = "length" if constraint is not None and constraint.closed_early else done.finish_reason
    body: dict[str, Any] = {"model": name, "created_at": rfc3339(), "done": True, "done_reason": reason}
    if not chat:
        body["context"] = c.prompt + list(done.output_tokens)
    return body | durations_ns(c)


def old_server_dialect(body: dict[str, Any]) -> bool:
    """The old MLX API Server's callers send its own fields, or no model at all."""
    return body.get("model") is None or any(key in body for key in OLD_SERVER_FIELDS)


def routed_model(request: web.Request, body: dict[str, Any]) -> tuple[str, ModelConfig]:
    """The model the body names; else its `category`'s, else `default_model` (models.yaml).

    Never a guess: an unknown category or a missing default is a 400 that says what to do.
    """
    if body.get("model") is not None:
        return requested_model(request, body)
    config = request.app[CONFIG]
    category = field(body, "category", str)
    if category is not None:
        name = config.categories.get(category.strip().lower())
        if name is None:
            known = ", ".join(sorted(config.categories))
            hint = f"models.yaml maps these categories: {known}" if known else "no categories are set in models.yaml (categories: {coding: MODEL, ...})"
            raise BadRequest(f"unknown category '{category}': {hint}; or name a 'model'", param="category")
    else:
        name = config.default_model or config.categories.get("default")
        if name is None:
            raise BadRequest("'model' is required: name one, or set default_model in models.yaml for requests that name none", param="model")
    request[MODEL_KEY] = name
    return name, request.app[MANAGER].resolve(name)


def old_server_options(request: web.Request, model: ModelConfig, body: dict[str, Any]) -> GenerationOptions:
    """`max_tokens` (default 2048) and `temperature` at the top level win over `options`."""
    given = parse_options(body.get("options"))
    top = {ours: body[theirs] for theirs, ours in OLD_SERVER_OPTIONS.items() if body.get(theirs) is not None}
    try:
        top = parse_options(top)
    except BadRequest as e:
        theirs = next(k for k, v in OLD_SERVER_OPTIONS.items() if v == e.param)
        raise BadRequest(e.message.replace(f"option '{e.param}'", f"'{theirs}'"), param=theirs) from None
    if "num_predict" not in top and "num_predict" not in given:
        top["num_predict"] = OLD_SERVER_MAX_TOKENS
    return merge_options(request.app[CONFIG].defaults.options, model.options, given, top)


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    old = old_server_dialect(body)
    name, model = routed_model(request, body) if old else requested_model(request, body)
    body_priority(request, body)
    prompt = field(body, "prompt", str, "")
    suffix = field(body, "suffix", str, "")
    system = field(body, "system", str, "")
    raw = field(body, "raw", bool, False)
    stream = field(body, "stream", bool, not old)
    think = think_field(body)
    context = field(body, "context", list, [])
    keep_alive = keep_alive_field(body)
    if field(body, "images", list):
        raise BadRequest(f"model '{name}' does not accept images", param="images")
    if field(body, "template", str):
        raise BadRequest("'template' overrides are not supported: the model's own chat template is used (or send 'raw': true)", param="template")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context):
        raise BadRequest("'context' must be an array of token ids (non-negative integers)", param="context")
    if not prompt and not suffix:
        return await _load_or_unload(request, name, keep_alive, chat=False)
    options = old_server_options(request, model, body) if old else request_options(request, model, body.get("options"))
    constraint = format_constraint(body.get("format"))
    think = think_with_format(think, constraint)

    def build(tokenizer: Any) -> list[int]:
        if any(t >= len(tokenizer) for t in context):
            raise BadRequest(f"'context' holds a token id outside the vocabulary of '{name}'", param="context")
        if suffix:
            ids = fim_prompt(tokenizer, prompt, suffix, name)
        elif raw:
            ids = text_prompt(tokenizer, prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = chat_prompt(tokenizer, messages, think=think)
        return list(context) + ids

    logprobs = logprobs_request(body.get("logprobs"), body.get("top_logprobs"))
    spec = CompletionSpec(model.name, build, options, keep_alive, constrain=constraint, logprobs=logprobs)
    return await _respond(request, spec, stream=stream, name=name, chat=False, constraint=constraint)


def think_field(body: dict[str, Any]) -> bool | str | None:
    """`think`: true, false, or a level ("low", "medium", "high") that also turns thinking on."""
    value = field(body, "think", (bool, str))
    if isinstance(value, str) and value not in THINK_LEVELS:
        raise BadRequest(f"'think' must be true, false or one of {', '.join(THINK_LEVELS)}, got {brief(value)}", param="think")
    return value


def chat_messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama messages -> the internal shape (tool results name their tool)."""
    messages = validate_messages(raw)
    converted = []
    for i, m in enumerate(messages):
        if m.get("images"):
            raise BadRequest(f"'messages[{i}].images': this model does not accept images", param="messages")
        item: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            item["tool_calls"] = [_history_call(i, call) for call in m["tool_calls"]]
        if m.get("thinking"):
            item["thinking"] = m["thinking"]
        if m.get("tool_name"):
            if not isinstance(m["tool_name"], str):
                raise BadRequest(f"'messages[{i}].tool_name' must be a string", param="messages")
            item["name"] = m["tool_name"]
        converted.append(item)
    return converted


def _history_call(index: int, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"'messages[{index}].tool_calls' entries need function.name", param="messages")
    return template_tool_call(call.get("id"), function["name"], function.get("arguments", {}))


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name, model = routed_model(request, body)
    body_priority(request, body)
    stream = field(body, "stream", bool, True)
    think = think_field(body)
    tools = function_tools(body.get("tools"))
    keep_alive = keep_alive_field(body)
    messages = chat_messages(field(body, "messages", list, []))
    if not messages:
        return await _load_or_unload(request, name, keep_alive, chat=True)
    options = request_options(request, model, body.get("options"))
    constraint = format_constraint(body.get("format"))
    think = think_with_format(think, constraint)
    logprobs = logprobs_request(body.get("logprobs"), body.get("top_logprobs"))
    spec = chat_spec(model.name, messages, options, keep_alive, tools=tools, think=think, constrain=constraint, logprobs=logprobs)
    return await _respond(request, spec, stream=stream, name=name, chat=True, tools=tools, constraint=constraint)


# --- embeddings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[list[float]]
    tokens: int
    load_seconds: float
    seconds: float


async def embed_inputs(
    request: web.Request,
    name: str,
    inputs: list[str],
    *,
    keep_alive: float | None,
    truncate: bool,
    dimensions: int | None = None,
    num_ctx: int | None = None,
    param: str = "input",
) -> Embedded:
    """Mean-pooled, L2-normalised final hidden states, computed under the model's lease.

    Every API's embeddings route comes here; no inputs just loads the model.
    """
    if len(inputs) > MAX_EMBED_INPUTS:
        raise BadRequest(f"'{param}' has {len(inputs)} items; at most {MAX_EMBED_INPUTS} are embedded per request", param=param)
    app = request.app
    if app[MANAGER].resolve(name).distributed is not None:  # its ranks run generation only
        raise BadRequest(f"model '{name}' is distributed over several ranks and does not compute embeddings", param="model")
    started = time.perf_counter()
    async with app[MANAGER].lease(name, keep_alive=keep_alive, priority=request_priority(request)) as lease:
        request[MODEL_KEY] = lease.name
        limit = min(lease.context_length, num_ctx or lease.context_length)
        ids = await asyncio.to_thread(_embedding_ids, lease.tokenizer, inputs, limit, truncate, param)
        await app[MANAGER].reserve_activations(lease, [len(t) for t in ids])
        vectors = await app[ENGINE].embed(lease.name, ids) if ids else []
    tokens = sum(map(len, ids))
    app[METRICS].observe_generation(lease.name, tokens, 0, None)
    if dimensions is not None:
        vectors = [_shorten(v, dimensions) for v in vectors]
    return Embedded(vectors, tokens, lease.load_seconds, time.perf_counter() - started)


def _embedding_ids(tokenizer: Any, inputs: list[str], limit: int, truncate: bool, param: str) -> list[list[int]]:
    batch = []
    for i, item in enumerate(inputs):
        ids = text_prompt(tokenizer, item)
        if not ids:
            raise BadRequest(f"'{param}[{i}]' is empty", param=param)
        if len(ids) > limit:
            if not truncate:
                raise BadRequest(f"'{param}[{i}]' is {len(ids)} tokens, longer than the context length {limit} (truncate is off)", param=param)
            ids = ids[:limit]
        batch.append(ids)
    return batch


def _shorten(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` values, normalised again (Matryoshka-style)."""
    if dimensions > len(vector):
        raise BadRequest(f"'dimensions' is {dimensions} but this model's embeddings have {len(vector)}", param="dimensions")
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def dimensions_field(body: dict[str, Any]) -> int | None:
    value = field(body, "dimensions", int)
    if value is not None and value < 1:
        raise BadRequest("'dimensions' must be at least 1", param="dimensions")
    return value


async def embed(request: web.Request) -> web.Response:
    body = await read_json(request)
    name, model = requested_model(request, body)
    raw = body.get("input")
    inputs = [] if raw is None or raw == "" else [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise BadRequest("'input' must be a string or an array of strings", param="input")
    options = request_options(request, model, body.get("options"))
    result = await embed_inputs(
        request,
        name,
        inputs,
        keep_alive=keep_alive_field(body),
        truncate=field(body, "truncate", bool, True),
        dimensions=dimensions_field(body),
        num_ctx=options.num_ctx,
    )
    return web.json_response(
        {
            "model": name,
            "embeddings": result.vectors,
            "total_duration": int(result.seconds * 1e9),
            "load_duration": int(result.load_seconds * 1e9),
            "prompt_eval_count": result.tokens,
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    """The legacy single-prompt route: `{"embedding": [...]}`."""
    body = await read_json(request)
    name, model = requested_model(request, body)
    prompt = field(body, "prompt", str, "")
    options = request_options(request, model, body.get("options"))
    result = await embed_inputs(
        request, name, [prompt] if prompt else [], keep_alive=keep_alive_field(body), truncate=True, num_ctx=options.num_ctx, param="prompt"
    )
    return web.json_response({"embedding": result.vectors[0] if result.vectors else []})


# --- models ----------------------------------------------------------------------


def model_details(model: ModelConfig, snap: ModelSnapshot | None) -> tuple[dict[str, Any], int, float | None]:
    """details, size on disk and modification time, read without downloading."""
    local = peek(model)
    if snap is not None and snap.details:
        details = snap.details
    elif local is not None:
        details = describe(local.config, 0)
    else:
        details = {"parent_model": "", "format": "mlx", "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    size = local.weights_bytes if local else (snap.size if snap else 0)
    mtime = os.path.getmtime(local.path) if local else None
    return details, size, mtime


async def tags(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    snaps = {s.name: s for s in request.app[MANAGER].snapshot()}
    entries = []
    for model in config.models:
        details, size, mtime = await asyncio.to_thread(model_details, model, snaps.get(model.name))
        entries.append(
            {
                "name": model.name,
                "model": model.name,
                "modified_at": rfc3339(mtime),
                "size": size,
                "digest": digest(model),
                "details": details,
            }
        )
    return web.json_response({"models": entries})


def ps_entry(request: web.Request, snap: ModelSnapshot) -> dict[str, Any]:
    model = request.app[CONFIG].find(snap.name)
    assert model is not None
    on_gpu = request.app[ENGINE].device_info.get("max_recommended_working_set_size") is not None
    expires = snap.expires_at
    if expires is None:
        expires = FOREVER_TIMESTAMP if snap.pinned or snap.keep_alive == float("inf") else (snap.last_used or 0) + snap.keep_alive
    return {
        "name": snap.name,
        "model": snap.name,
        "size": snap.size,
        "digest": digest(model),
        "details": snap.details,
        "expires_at": rfc3339(min(expires, FOREVER_TIMESTAMP)),
        "size_vram": snap.size if on_gpu else 0,
        "context_length": snap.context_length,
        "active_requests": snap.active_requests,
        "pinned": snap.pinned,
        "last_used": rfc3339(snap.last_used) if snap.last_used else None,
        "memory": memory_json(snap.memory),  # ours: the model's line in the memory ledger
    }


async def ps(request: web.Request) -> web.Response:
    snaps = [s for s in request.app[MANAGER].snapshot() if s.state is ModelState.READY]
    entries = [ps_entry(request, s) for s in snaps]
    for entry in entries:  # a distributed model: its group's hosts, backend, mode and ranks
        if (group := request.app[GROUPS].status(entry["name"])) is not None:
            entry["group"] = group.to_json()
    return web.json_response({"models": entries})


def _show(model: ModelConfig, snap: ModelSnapshot) -> dict[str, Any]:
    local = peek(model)
    config = local.config if local else {}
    template = ""
    if local and (local.path / "tokenizer_config.json").is_file():
        with open(local.path / "tokenizer_config.json", encoding="utf-8") as f:
            template = json.load(f).get("chat_template") or ""
        if not isinstance(template, str):
            template = ""
    arch = str(config.get("model_type") or "unknown")
    info: dict[str, Any] = {"general.architecture": arch, "general.basename": model.name.split(":")[0], "mlx.source": model.source}
    for key, ours in (
        ("max_position_embeddings", "context_length"),
        ("hidden_size", "embedding_length"),
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("vocab_size", "vocab_size"),
    ):
        if isinstance(config.get(key), int):
            info[f"{arch}.{ours}"] = config[key]
    info[f"{arch}.context_length"] = snap.context_length or info.get(f"{arch}.context_length", 0)
    details = snap.details or (describe(config, 0) if config else {})
    if details.get("parameter_size"):
        info["general.parameter_count"] = details["parameter_size"]
    parameters = "\n".join(
        f"{k} {json.dumps(v) if isinstance(v, str) else v}" for k, vs in model.options.items() for v in (vs if isinstance(vs, tuple) else (vs,))
    )
    tokenizer = tokenizer_of(model)
    return {
        "license": "",
        "modelfile": f"# mlx-server model\nFROM {model.source}\n" + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        "parameters": parameters,
        "template": template,
        "details": details,
        "model_info": info,
        "capabilities": capabilities(tokenizer) if tokenizer is not None else ["completion", "embedding"],
        "modified_at": rfc3339(os.path.getmtime(local.path) if local else None),
    }


def _name_key(body: dict[str, Any]) -> str:
    """/api/show and /api/pull take `model`, or `name` from older clients."""
    return "name" if body.get("model") is None and body.get("name") is not None else "model"


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    _, model = requested_model(request, body, _name_key(body))
    snap = next(s for s in request.app[MANAGER].snapshot() if s.name == model.name)
    return web.json_response(await asyncio.to_thread(_show, model, snap))


async def pull(request: web.Request) -> web.StreamResponse:
    """Fetch a configured model's files; requests can never name a new source."""
    body = await read_json(request)
    _, model = requested_model(request, body, _name_key(body))
    stream = field(body, "stream", bool, True)
    out = LineStream(request) if stream else None
    if out:
        await out.send({"status": f"pulling {model.source}"})
    try:
        local = await asyncio.to_thread(locate, model)
    except SourceError as e:
        if out:
            await out.send({"error": str(e)})
            return await out.finish()
        raise UpstreamError(str(e)) from None
    if out:
        await out.send({"status": "verifying files", "total": local.weights_bytes, "completed": local.weights_bytes})
        await out.send({"status": "success"})
        return await out.finish()
    return web.json_response({"status": "success"})


async def model_status(request: web.Request) -> web.Response:
    """The old server's model check: is `name` configured, and is it loaded now?"""
    name = request.match_info["name"]
    model = request.app[CONFIG].find(name)
    body: dict[str, Any] = {"name": name, "exists": model is not None, "loaded": False}
    if model is not None:
        snap = next(s for s in request.app[MANAGER].snapshot() if s.name == model.name)
        body |= {"model": model.name, "loaded": snap.state is ModelState.READY, "state": str(snap.state)}
    return web.json_response(body)


async def not_managed_here(request: web.Request) -> web.Response:
    """Ollama's model-management routes: models here are what models.yaml lists."""
    raise RouteError(
        f"{request.method} {request.path} is not supported by mlx-server: models are configured in models.yaml "
        "(name, source: a Hugging Face repo or a local MLX directory); edit it and restart the server, "
        "or use /api/pull to fetch a configured model's files",
        501,
    )


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # add_get also answers HEAD
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
    app.router.add_post("/api/pull", pull)
    app.router.add_get("/api/models/{name:.+}", model_status)
    for path in ("/api/create", "/api/copy", "/api/push"):
        app.router.add_post(path, not_managed_here)
    app.router.add_delete("/api/delete", not_managed_here)
    app.router.add_post("/api/blobs/{digest}", not_managed_here)
    app.router.add_route("HEAD", "/api/blobs/{digest}", not_managed_here)

