"""The Ollama API: parse, run through the shared pipeline, format.

Streaming is the default and real: each decoded piece leaves as one NDJSON line.
An unknown model is a 404; nothing is ever answered by a different model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from aiohttp import web

from .. import __version__
from ..config import ModelConfig
from ..engine import TextEvent
from ..errors import BadRequest, MlxServerError, UpstreamError
from ..manager import ModelSnapshot, ModelState
from ..options import GenerationOptions, merge_options, parse_options
from ..prompts import chat_prompt, fim_prompt, text_prompt, validate_messages
from ..sources import SourceError, describe, locate, peek
from .common import (
    CONFIG,
    ENGINE,
    MANAGER,
    MODEL_KEY,
    Completion,
    CompletionSpec,
    LineStream,
    completion,
    durations_ns,
    field,
    keep_alive_field,
    model_field,
    read_json,
    rfc3339,
)

FOREVER_TIMESTAMP = 10_000_000_000.0  # 2286-11-20: how "never expires" reads in expires_at


def request_options(request: web.Request, model: ModelConfig, raw: Any) -> GenerationOptions:
    """defaults.options < the model's options < the request's options."""
    return merge_options(request.app[CONFIG].defaults.options, model.options, parse_options(raw))


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
        async with manager.lease(name, keep_alive=keep_alive):
            pass
        reason = "load"
    body: dict[str, Any] = {"model": name, "created_at": rfc3339()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body |= {"done": True, "done_reason": reason}
    return web.json_response(body)


async def _respond(request: web.Request, spec: CompletionSpec, *, stream: bool, name: str, chat: bool) -> web.StreamResponse:
    """Run the completion and answer as one object or as NDJSON lines."""
    text_key = "message" if chat else "response"

    def piece(text: str) -> Any:
        return {"role": "assistant", "content": text} if chat else text

    async with completion(request, spec) as c:
        if not stream:
            text, _ = await c.text()
            return web.json_response(_final(c, name, text_key, piece(text), chat))
        out = LineStream(request)
        try:
            async for event in c.events():
                if isinstance(event, TextEvent):
                    await out.send({"model": name, "created_at": rfc3339(), text_key: piece(event.text), "done": False})
            await out.send(_final(c, name, text_key, piece(""), chat))
        except MlxServerError as e:
            if not out.started:
                raise
            await out.send({"error": e.message})
        return await out.finish()


def _final(c: Completion, name: str, text_key: str, value: Any, chat: bool) -> dict[str, Any]:
    done = c.done
    assert done is not None
    body: dict[str, Any] = {"model": name, "created_at": rfc3339(), text_key: value, "done": True, "done_reason": done.finish_reason}
    if not chat:
        body["context"] = c.prompt + list(done.output_tokens)
    return body | durations_ns(c)


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = model_field(body)
    request[MODEL_KEY] = name
    model = request.app[MANAGER].resolve(name)
    prompt = field(body, "prompt", str, "")
    suffix = field(body, "suffix", str, "")
    system = field(body, "system", str, "")
    raw = field(body, "raw", bool, False)
    stream = field(body, "stream", bool, True)
    think = field(body, "think", (bool, str))
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
    options = request_options(request, model, body.get("options"))

    def build(tokenizer: Any) -> list[int]:
        if any(t >= len(tokenizer) for t in context):
            raise BadRequest(f"'context' holds a token id outside the vocabulary of '{name}'", param="context")
        if suffix:
            ids = fim_prompt(tokenizer, prompt, suffix, name)
        elif raw:
            ids = text_prompt(tokenizer, prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = chat_prompt(tokenizer, messages, think=_think(think))
        return list(context) + ids

    spec = CompletionSpec(model.name, build, options, keep_alive)
    return await _respond(request, spec, stream=stream, name=name, chat=False)


def _think(value: bool | str | None) -> bool | None:
    if isinstance(value, str):  # "low" / "medium" / "high": thinking on
        return value.lower() not in ("", "false", "none")
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
            item["tool_calls"] = m["tool_calls"]
        if m.get("tool_name"):
            item["name"] = m["tool_name"]
        converted.append(item)
    return converted


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = model_field(body)
    request[MODEL_KEY] = name
    model = request.app[MANAGER].resolve(name)
    stream = field(body, "stream", bool, True)
    think = field(body, "think", (bool, str))
    tools = field(body, "tools", list, [])
    keep_alive = keep_alive_field(body)
    messages = chat_messages(field(body, "messages", list, []))
    if not messages:
        return await _load_or_unload(request, name, keep_alive, chat=True)
    options = request_options(request, model, body.get("options"))

    def build(tokenizer: Any) -> list[int]:
        return chat_prompt(tokenizer, messages, tools=tools or None, think=_think(think))

    spec = CompletionSpec(model.name, build, options, keep_alive)
    return await _respond(request, spec, stream=stream, name=name, chat=True)


# --- models ----------------------------------------------------------------------


def _details(model: ModelConfig, snap: ModelSnapshot | None) -> tuple[dict[str, Any], int, float | None]:
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
        details, size, mtime = await asyncio.to_thread(_details, model, snaps.get(model.name))
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
    }


async def ps(request: web.Request) -> web.Response:
    snaps = [s for s in request.app[MANAGER].snapshot() if s.state is ModelState.READY]
    return web.json_response({"models": [ps_entry(request, s) for s in snaps]})


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
    capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    return {
        "license": "",
        "modelfile": f"# mlx-server model\nFROM {model.source}\n" + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        "parameters": parameters,
        "template": template,
        "details": details,
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": rfc3339(os.path.getmtime(local.path) if local else None),
    }


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = field(body, "model", str) or field(body, "name", str)
    if not name:
        raise BadRequest("'model' is required", param="model")
    request[MODEL_KEY] = name
    model = request.app[MANAGER].resolve(name)
    snap = next(s for s in request.app[MANAGER].snapshot() if s.name == model.name)
    return web.json_response(await asyncio.to_thread(_show, model, snap))


async def pull(request: web.Request) -> web.StreamResponse:
    """Fetch a configured model's files; requests can never name a new source."""
    body = await read_json(request)
    name = field(body, "model", str) or field(body, "name", str)
    if not name:
        raise BadRequest("'model' is required", param="model")
    request[MODEL_KEY] = name
    model = request.app[MANAGER].resolve(name)
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
    app.router.add_post("/api/pull", pull)

