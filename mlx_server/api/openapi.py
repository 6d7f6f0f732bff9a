"""The OpenAPI 3.1 document of every route, served at `GET /openapi.json`.

Written from the handlers' own rules (types, ranges, the limits in options.py,
prompts.py and body.py), so a client generator or a fuzzer sees what the server
enforces; tests/test_schemathesis.py holds the server to it. It sits behind the
API key like every route but `/`, `/health` and `/metrics`: it names the models.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .. import __version__
from ..config import Config
from ..logprobs import MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS
from ..options import MAX_CONTEXT, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES
from ..prompts import MAX_MESSAGES, THINK_LEVELS
from .body import MAX_MODEL_NAME
from .keys import CONFIG
from .ollama import MAX_EMBED_INPUTS
from .wire import NDJSON

SSE = "text/event-stream"
ANTHROPIC_EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop", "ping", "error"]
Schema = dict[str, Any]


# --- schema building blocks -------------------------------------------------------------


def obj(required: tuple[str, ...] = (), **properties: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def array(items: Schema, **limits: int) -> Schema:
    return {"type": "array", "items": items, **limits}


def one_of(*schemas: Schema) -> Schema:
    return {"anyOf": list(schemas)}


STRING = {"type": "string"}
PRIORITY = {"enum": ["high", "medium", "low"], "description": "admission order when the model's slots are full (also the X-Request-Priority header)"}
TEXT = {"type": "string", "minLength": 1}
BOOLEAN = {"type": "boolean"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
ANY_OBJECT = {"type": "object"}
TOKEN_IDS = array({"type": "integer", "minimum": 0})
TIMESTAMP = {"type": "string", "format": "date-time"}
NS = {"type": "integer", "minimum": 0, "description": "nanoseconds"}
KEEP_ALIVE = {
    "type": ["number", "string"],
    "description": "seconds, or a duration such as '5m' or '1h'; negative keeps the model loaded, 0 unloads it after the request",
}
STOP = one_of({"type": "string", "maxLength": MAX_STOP_LENGTH}, array({"type": "string", "maxLength": MAX_STOP_LENGTH}, maxItems=MAX_STOP_SEQUENCES))


def number(lo: float, hi: float) -> Schema:
    return {"type": "number", "minimum": lo, "maximum": hi}


def integer(lo: int, hi: int) -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi}


SAMPLING = {
    "temperature": number(0, 100),
    "top_p": number(0, 1),
    "top_k": integer(0, 1 << 31),
    "min_p": number(0, 1),
    "seed": integer(-(1 << 63), (1 << 64) - 1),
    "presence_penalty": number(-100, 100),
    "frequency_penalty": number(-100, 100),
    "stop": STOP,
}
OPTIONS = obj(
    **SAMPLING,
    num_predict=integer(-2, MAX_CONTEXT) | {"description": "-1: until the context is full"},
    repeat_penalty=number(0, 100),
    repeat_last_n=integer(-1, MAX_CONTEXT),
    num_ctx=integer(1, MAX_CONTEXT),
) | {"description": "Ollama's options; others Ollama documents are accepted and ignored"}
MAX_TOKENS = integer(1, MAX_CONTEXT) | {"description": "capped by what the context window has left"}
FUNCTION_TOOLS = array(obj(("function",), type={"const": "function"}, function=obj(("name",), name={"type": "string", "minLength": 1}, description=STRING, parameters=ANY_OBJECT)))
DURATIONS = {k: NS for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")}
COUNTS = {"prompt_eval_count": INTEGER, "eval_count": INTEGER}
OPENAI_EVENT = {"type": "object", "properties": {"event": {"const": "message"}, "data": STRING}, "required": ["data"], "description": "one SSE event: a JSON chunk, then [DONE]"}
ANTHROPIC_EVENT = {"type": "object", "properties": {"event": {"enum": ANTHROPIC_EVENTS}, "data": STRING}, "required": ["event", "data"], "description": "one SSE event"}
DETAILS = obj(parent_model=STRING, format=STRING, family=STRING, families=array(STRING), parameter_size=STRING, quantization_level=STRING)


def model_name(config: Config) -> Schema:
    names = [m.name for m in config.models]
    return {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME, "description": "a configured model name or alias", "examples": names}


# --- error shapes, per API family ----------------------------------------------------------

ERRORS = {
    "ollama": obj(("error",), error=STRING),
    "openai": obj(("error",), error=obj(("message", "type"), message=STRING, type=STRING, param={"type": ["string", "null"]}, code={"type": ["integer", "string", "null"]})),
    "anthropic": obj(("type", "error"), type={"const": "error"}, error=obj(("type", "message"), type=STRING, message=STRING)),
}
REASONS = {
    400: "the request is invalid; the message names the field",
    401: "missing or wrong API key",
    404: "no such model (or route)",
    413: "the body is larger than server.max_body_mb",
    429: "over server.rate_limit; see Retry-After",
    500: "the model failed during this request",
    502: "the model's source could not be fetched",
    503: "busy (max_concurrency and max_queue are full), out of memory, loading failed or shutting down; see Retry-After",
    501: "models are managed in models.yaml, not through this route",
}


def responses(family: str, ok: dict[str, Schema], codes: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "OK", "content": {kind: {"schema": schema} for kind, schema in ok.items()}}}
    for code in codes:
        response: dict[str, Any] = {"description": REASONS[code], "content": {"application/json": {"schema": ERRORS[family]}}}
        if code in (429, 503):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds"}}
        out[str(code)] = response
    return out


BODY_CODES = (400, 401, 413, 429)
MODEL_CODES = BODY_CODES + (404, 503)
GENERATION_CODES = MODEL_CODES + (500,)


def post(family: str, summary: str, body: Schema, ok: dict[str, Schema], codes: tuple[int, ...] = GENERATION_CODES) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": responses(family, ok, codes),
    }


def get(family: str, summary: str, ok: dict[str, Schema], codes: tuple[int, ...] = (401, 429)) -> dict[str, Any]:
    return {"summary": summary, "responses": responses(family, ok, codes)}


# --- Ollama -----------------------------------------------------------------------------------


def ollama_paths(model: Schema) -> dict[str, Any]:
    common = {"model": model, "keep_alive": KEEP_ALIVE, "options": OPTIONS}
    generation = {
        "format": one_of({"enum": ["json", ""]}, ANY_OBJECT),
        "think": one_of(BOOLEAN, {"enum": list(THINK_LEVELS)}),
        "stream": BOOLEAN,
        "logprobs": BOOLEAN,
        "top_logprobs": integer(0, MAX_TOP_LOGPROBS) | {"description": "needs logprobs: true"},
    }
    message = obj(
        ("role",),
        role={"enum": ["system", "user", "assistant", "tool"]},
        content=STRING,
        images=array(STRING, maxItems=0),
        tool_calls=array(obj(("function",), function=obj(("name",), name=STRING, arguments=ANY_OBJECT))),
        tool_name=STRING,
        thinking=STRING,
    )
    done = {"done": BOOLEAN, "done_reason": STRING, **DURATIONS, **COUNTS}
    generated = obj(("model", "created_at", "done"), model=STRING, created_at=TIMESTAMP, response=STRING, thinking=STRING, context=TOKEN_IDS, **done)
    chatted = obj(
        ("model", "created_at", "done"),
        model=STRING,
        created_at=TIMESTAMP,
        message=obj(("role", "content"), role=STRING, content=STRING, thinking=STRING, tool_calls=array(ANY_OBJECT)),
        **done,
    )
    entry = obj(("name", "model", "size", "digest", "details"), name=STRING, model=STRING, modified_at=TIMESTAMP, size=INTEGER, digest=STRING, details=DETAILS)
    running = obj(
        ("name", "model", "size", "expires_at"),
        name=STRING,
        model=STRING,
        size=INTEGER,
        digest=STRING,
        details=ANY_OBJECT,
        expires_at=TIMESTAMP,
        size_vram=INTEGER,
        context_length=INTEGER,
        active_requests=INTEGER,
        pinned=BOOLEAN,
        last_used={"type": ["string", "null"]},
    )
    named = obj(model=model, name=model) | {"anyOf": [{"required": ["model"]}, {"required": ["name"]}]}
    not_here = {"responses": responses("ollama", {"application/json": ANY_OBJECT}, (401, 429, 501))}
    return {
        "/": {
            "get": get("ollama", "Liveness text", {"text/plain": STRING}, ()) | {"security": []},
            "head": get("ollama", "Liveness", {"text/plain": STRING}, ()) | {"security": []},
        },
        "/api/version": {"get": get("ollama", "Server version", {"application/json": obj(("version",), version=STRING)})},
        "/api/tags": {"get": get("ollama", "Configured models", {"application/json": obj(("models",), models=array(entry))}, (401,))},
        "/api/ps": {"get": get("ollama", "Loaded models", {"application/json": obj(("models",), models=array(running))})},
        "/api/show": {"post": post("ollama", "Model details", named, {"application/json": obj(("details", "model_info"), details=ANY_OBJECT, model_info=ANY_OBJECT, template=STRING, parameters=STRING, modelfile=STRING, capabilities=array(STRING))}, MODEL_CODES)},
        "/api/generate": {
            "post": post(
                "ollama",
                "Complete a prompt (NDJSON stream unless stream is false); an empty prompt loads the model, and with keep_alive 0 unloads it",
                obj(
                    ("model",),
                    prompt=STRING,
                    suffix=STRING,
                    system=STRING,
                    raw=BOOLEAN,
                    context=TOKEN_IDS,
                    images=array(STRING, maxItems=0),
                    template={"type": "string", "maxLength": 0, "description": "overrides are not supported"},
                    max_tokens=integer(-2, MAX_CONTEXT) | {"description": "the old MLX API Server's dialect: not streamed unless stream is true"},
                    temperature=SAMPLING["temperature"],
                    category={"type": "string", "description": "a models.yaml category, when no model is named"},
                    priority=PRIORITY,
                    **generation,
                    **common,
                ),
                {"application/json": generated, NDJSON: STRING},
            )
        },
        "/api/chat": {
            "post": post(
                "ollama",
                "Chat (NDJSON stream unless stream is false); no messages loads the model",
                obj(("model",), messages=array(message, maxItems=MAX_MESSAGES), tools=FUNCTION_TOOLS, **generation, **common),
                {"application/json": chatted, NDJSON: STRING},
            )
        },
        "/api/embed": {
            "post": post(
                "ollama",
                "Embeddings: mean-pooled, L2-normalised",
                obj(("model",), input=one_of(STRING, array(STRING, maxItems=MAX_EMBED_INPUTS)), truncate=BOOLEAN, dimensions={"type": "integer", "minimum": 1}, **common),
                {"application/json": obj(("model", "embeddings"), model=STRING, embeddings=array(array(NUMBER)), total_duration=NS, load_duration=NS, prompt_eval_count=INTEGER)},
            )
        },
        "/api/embeddings": {
            "post": post("ollama", "One embedding (legacy)", obj(("model",), prompt=STRING, **common), {"application/json": obj(("embedding",), embedding=array(NUMBER))})
        },
        "/api/pull": {
            "post": post(
                "ollama",
                "Fetch a configured model's files; a request can never name a new source",
                named | {"properties": named["properties"] | {"stream": BOOLEAN, "insecure": BOOLEAN}},
                {"application/json": obj(("status",), status=STRING), NDJSON: STRING},
                MODEL_CODES + (502,),
            )
        },
        **{
            path: {
                method: not_here
                | {"summary": f"Not supported: models are configured in models.yaml ({path})"}
                | ({"parameters": [{"name": "digest", "in": "path", "required": True, "schema": STRING}]} if "{" in path else {})
            }
            for path, method in (("/api/create", "post"), ("/api/copy", "post"), ("/api/delete", "delete"), ("/api/push", "post"), ("/api/blobs/{digest}", "post"))
        },
    }


# --- OpenAI -------------------------------------------------------------------------------------


def openai_paths(model: Schema) -> dict[str, Any]:
    text_part = obj(("type", "text"), type={"enum": ["text", "input_text"]}, text=STRING)
    message = obj(
        ("role",),
        role={"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
        content=one_of({"type": ["string", "null"]}, array(text_part)),
        name=STRING,
        tool_call_id=STRING,
        tool_calls=array(obj(("function",), id=STRING, type={"const": "function"}, function=obj(("name",), name=STRING, arguments=STRING))),
    )
    common = {
        "model": model,
        "stream": BOOLEAN,
        "stream_options": obj(include_usage=BOOLEAN),
        "max_tokens": MAX_TOKENS,
        "max_completion_tokens": MAX_TOKENS,
        "n": {"const": 1},
        "keep_alive": KEEP_ALIVE,
        **SAMPLING,
    }
    # stream_options only with stream: true
    streamed = {"if": {"properties": {"stream": {"const": True}}, "required": ["stream"]}, "else": {"properties": {"stream_options": {"type": "null"}}}}
    response_format = one_of(
        obj(("type",), type={"enum": ["text", "json_object"]}),
        obj(("type", "json_schema"), type={"const": "json_schema"}, json_schema=obj(("schema",), name=STRING, schema=ANY_OBJECT, strict=BOOLEAN)),
    )
    usage = obj(("prompt_tokens", "completion_tokens", "total_tokens"), prompt_tokens=INTEGER, completion_tokens=INTEGER, total_tokens=INTEGER)
    completion_base = {"id": STRING, "created": INTEGER, "model": STRING, "system_fingerprint": STRING, "usage": usage}
    chat_choice = obj(
        ("index", "message", "finish_reason"),
        index=INTEGER,
        message=obj(("role",), role={"const": "assistant"}, content={"type": ["string", "null"]}, reasoning_content=STRING, tool_calls=array(ANY_OBJECT)),
        finish_reason={"enum": ["stop", "length", "tool_calls"]},
    )
    text_choice = obj(("index", "text", "finish_reason"), index=INTEGER, text=STRING, finish_reason={"enum": ["stop", "length"]})
    model_entry = obj(("id", "object", "created", "owned_by"), id=STRING, object={"const": "model"}, created=INTEGER, owned_by=STRING)
    embedding = obj(("object", "index", "embedding"), object={"const": "embedding"}, index=INTEGER, embedding=one_of(array(NUMBER), STRING))
    token_ids = array({"type": "integer", "minimum": 0}, minItems=1)
    return {
        "/v1/chat/completions": {
            "post": post(
                "openai",
                "Chat completion (SSE when stream is true)",
                obj(
                    ("model", "messages"),
                    messages=array(message, minItems=1, maxItems=MAX_MESSAGES),
                    tools=FUNCTION_TOOLS,
                    tool_choice={"type": ["string", "object"]},
                    response_format=response_format,
                    logprobs={"type": ["boolean", "null"]},
                    top_logprobs=integer(0, MAX_TOP_LOGPROBS) | {"description": "needs logprobs: true"},
                    **common,
                )
                | streamed,
                {"application/json": obj(("id", "object", "choices"), object={"const": "chat.completion"}, choices=array(chat_choice), **completion_base), SSE: OPENAI_EVENT},
            )
        },
        "/v1/completions": {
            "post": post(
                "openai",
                "Text completion (SSE when stream is true); one prompt per request",
                obj(
                    ("model", "prompt"),
                    prompt=one_of(TEXT, token_ids, array(one_of(TEXT, token_ids), minItems=1, maxItems=1)),
                    suffix=STRING,
                    echo=BOOLEAN,
                    best_of={"const": 1},
                    logprobs={"type": ["integer", "null"], "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS},
                    **common,
                )
                | streamed,
                {"application/json": obj(("id", "object", "choices"), object={"const": "text_completion"}, choices=array(text_choice), **completion_base), SSE: OPENAI_EVENT},
            )
        },
        "/v1/models": {"get": get("openai", "Configured models", {"application/json": obj(("object", "data"), object={"const": "list"}, data=array(model_entry))})},
        "/v1/models/{model}": {
            "get": get("openai", "One configured model", {"application/json": model_entry}, (401, 404, 429))
            | {"parameters": [{"name": "model", "in": "path", "required": True, "schema": STRING}]}
        },
        "/v1/embeddings": {
            "post": post(
                "openai",
                "Embeddings: mean-pooled, L2-normalised",
                obj(
                    ("model", "input"),
                    model=model,
                    input=one_of(TEXT, array(TEXT, minItems=1, maxItems=MAX_EMBED_INPUTS)) | {"description": "text only: token ids are refused (400)"},
                    encoding_format={"enum": ["float", "base64"]},
                    dimensions={"type": "integer", "minimum": 1},
                    keep_alive=KEEP_ALIVE,
                ),
                {"application/json": obj(("object", "data", "model", "usage"), object={"const": "list"}, data=array(embedding), model=STRING, usage=ANY_OBJECT)},
            )
        },
    }


# --- OpenAI Responses ----------------------------------------------------------------------------


def responses_paths(model: Schema) -> dict[str, Any]:
    text_part = obj(("type", "text"), type={"enum": ["input_text", "output_text"]}, text=STRING)
    content = one_of(STRING, array(text_part))
    item = one_of(
        obj(("role", "content"), type={"const": "message"}, role={"enum": ["user", "assistant", "system", "developer"]}, content=content),
        obj(("type", "call_id", "name"), type={"const": "function_call"}, call_id=STRING, name=STRING, arguments=STRING, id=STRING),
        obj(("type", "call_id"), type={"const": "function_call_output"}, call_id=STRING, output=content),
        obj(("type",), type={"const": "reasoning"}, id=STRING, summary=array(ANY_OBJECT)),
    )
    tool = one_of(
        obj(("type", "name"), type={"const": "function"}, name={"type": "string", "minLength": 1}, description=STRING, parameters=ANY_OBJECT, strict=BOOLEAN),
        obj(("type",), type={"type": "string", "not": {"const": "function"}}, description="a hosted tool: left out of the prompt, named in `warnings`"),
    )
    text_format = one_of(
        obj(("type",), type={"enum": ["text", "json_object"]}),
        obj(("type", "schema"), type={"const": "json_schema"}, name=STRING, schema=ANY_OBJECT, strict=BOOLEAN),
    )
    body = obj(
        ("model", "input"),
        model=model,
        input=one_of(STRING, array(item, minItems=1, maxItems=MAX_MESSAGES)),
        instructions=STRING,
        tools=array(tool),
        tool_choice=one_of({"enum": ["auto", "none", "required"]}, obj(("type", "name"), type={"const": "function"}, name=STRING)),
        max_output_tokens=MAX_TOKENS,
        temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        text=obj(format=text_format),
        reasoning=obj(effort={"enum": ["none", "minimal", *THINK_LEVELS]}, summary={"type": ["string", "null"]}),
        store=BOOLEAN,
        previous_response_id=STRING,
        include=array(STRING),
        metadata=ANY_OBJECT,
        parallel_tool_calls=BOOLEAN,
        stream=BOOLEAN,
        keep_alive=KEEP_ALIVE,
    )
    usage = obj(("input_tokens", "output_tokens", "total_tokens"), input_tokens=INTEGER, output_tokens=INTEGER, total_tokens=INTEGER)
    response = obj(
        ("id", "object", "created_at", "status", "model", "output"),
        id=STRING,
        object={"const": "response"},
        created_at=INTEGER,
        status={"enum": ["completed", "incomplete", "in_progress"]},
        model=STRING,
        output=array(ANY_OBJECT),
        usage=one_of(usage, {"type": "null"}),
        warnings=array(STRING),
    )
    event = {"type": "object", "properties": {"event": STRING, "data": STRING}, "required": ["event", "data"], "description": "one SSE event, numbered by sequence_number"}
    response_id = {"parameters": [{"name": "response_id", "in": "path", "required": True, "schema": STRING}]}
    deleted = obj(("id", "object", "deleted"), id=STRING, object={"const": "response"}, deleted={"const": True})
    return {
        "/v1/responses": {"post": post("openai", "Responses API (an SSE event stream when stream is true)", body, {"application/json": response, SSE: event}, GENERATION_CODES)},
        "/v1/responses/{response_id}": {
            "get": get("openai", "A stored response", {"application/json": response}, (401, 404, 429)) | response_id,
            "delete": get("openai", "Forget a stored response", {"application/json": deleted}, (401, 404, 429)) | response_id,
        },
    }


# --- Anthropic ---------------------------------------------------------------------------------


def anthropic_paths(model: Schema) -> dict[str, Any]:
    text_block = obj(("type", "text"), type={"const": "text"}, text=STRING)
    thinking = obj(("type",), type={"enum": ["thinking", "redacted_thinking"]})
    tool_use = obj(("type", "name"), type={"const": "tool_use"}, id=STRING, name=STRING, input=ANY_OBJECT)
    tool_result = obj(("type", "tool_use_id"), type={"const": "tool_result"}, tool_use_id=STRING, content=one_of(STRING, array(text_block)), is_error=BOOLEAN)
    message = one_of(
        obj(("role", "content"), role={"const": "user"}, content=one_of(STRING, array(one_of(text_block, tool_result, thinking)))),
        obj(("role", "content"), role={"const": "assistant"}, content=one_of(STRING, array(one_of(text_block, tool_use, thinking)))),
        obj(("role", "content"), role={"const": "system"}, content=one_of(STRING, array(text_block))),
    )
    tool = obj(("name",), name={"type": "string", "minLength": 1}, description=STRING, input_schema=ANY_OBJECT, type={"const": "custom"})
    prompt = {
        "model": model,
        "messages": array(message, minItems=1, maxItems=MAX_MESSAGES),
        "system": one_of(STRING, array(text_block)),
        "tools": array(tool),
        "tool_choice": ANY_OBJECT,
        "thinking": obj(("type",), type={"enum": ["enabled", "disabled", "adaptive"]}, budget_tokens=INTEGER),
        "keep_alive": KEEP_ALIVE,
    }
    output_config = obj(format=obj(("type", "schema"), type={"const": "json_schema"}, schema=ANY_OBJECT))
    reply = obj(
        ("id", "type", "role", "model", "content", "stop_reason", "usage"),
        id=STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        model=STRING,
        content=array(ANY_OBJECT),
        stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        stop_sequence={"type": ["string", "null"]},
        usage=obj(("input_tokens", "output_tokens"), input_tokens=INTEGER, output_tokens=INTEGER),
    )
    sampling = {k: SAMPLING[k] for k in ("temperature", "top_p", "top_k")}
    stops = array({"type": "string", "maxLength": MAX_STOP_LENGTH}, maxItems=MAX_STOP_SEQUENCES)
    return {
        "/v1/messages": {
            "post": post(
                "anthropic",
                "Messages (an SSE event stream when stream is true)",
                obj(("model", "max_tokens", "messages"), max_tokens=MAX_TOKENS, stop_sequences=stops, stream=BOOLEAN, output_config=output_config, metadata=ANY_OBJECT, **sampling, **prompt)
                | {"not": {"required": ["thinking", "output_config"], "properties": {"thinking": {"properties": {"type": {"enum": ["enabled", "adaptive"]}}}, "output_config": {"required": ["format"], "properties": {"format": ANY_OBJECT}}}}, "description": "thinking and a structured output format exclude each other"},
                {"application/json": reply, SSE: ANTHROPIC_EVENT},
            )
        },
        "/v1/messages/count_tokens": {
            "post": post("anthropic", "The prompt's size in the model's tokens", obj(("model", "messages"), **prompt), {"application/json": obj(("input_tokens",), input_tokens=INTEGER)}, MODEL_CODES)
        },
    }


# --- status ---------------------------------------------------------------------------------------


def status_paths() -> dict[str, Any]:
    model = obj(("name", "state", "active_requests"), name=STRING, state={"enum": ["unloaded", "loading", "ready", "unloading", "failed"]}, active_requests=INTEGER, queued=INTEGER, error=STRING)
    cached = obj(("name", "active_requests", "is_loading"), name=STRING, active_requests=INTEGER, is_loading=BOOLEAN)
    health = obj(
        ("status", "models", "active_requests", "max_concurrent", "memory", "cached_models", "loading_models", "active_model_requests"),
        status={"enum": ["healthy", "degraded"]}, version=STRING, engine=ANY_OBJECT, models=array(model), memory=ANY_OBJECT, queue_depth=INTEGER,
        active_requests=INTEGER, max_concurrent=INTEGER, cached_models=array(cached), loading_models=array(STRING), active_model_requests=ANY_OBJECT,
    )
    by_priority = obj(("high", "medium", "low"), high=INTEGER, medium=INTEGER, low=INTEGER)
    queue = obj(("queue_length", "by_priority", "models"), queue_length=INTEGER, by_priority=by_priority, queue_depth=INTEGER, models=array(ANY_OBJECT))
    exists = obj(("name", "exists", "loaded"), name=STRING, exists=BOOLEAN, loaded=BOOLEAN, model=STRING, state=STRING)
    return {
        "/queue/stats": {"get": get("ollama", "Requests waiting for a slot, by priority", {"application/json": queue})},
        "/api/models/{name}": {
            "get": get("ollama", "Whether a model is configured and loaded (the old MLX API Server's check)", {"application/json": exists})
            | {"parameters": [{"name": "name", "in": "path", "required": True, "schema": STRING}]}
        },
        "/health": {"get": get("ollama", "Liveness, models and memory", {"application/json": health}, ()) | {"security": []}},
        "/metrics": {"get": get("ollama", "Prometheus metrics", {"text/plain": STRING}, ()) | {"security": []}},
        "/openapi.json": {"get": get("ollama", "This document", {"application/json": ANY_OBJECT})},
        "/ui": {"get": get("ollama", "Status page: the memory ledger, models, queues and errors (HTML)", {"text/html": STRING})},
    }


def document(config: Config) -> dict[str, Any]:
    model = model_name(config)
    paths = ollama_paths(model) | openai_paths(model) | responses_paths(model) | anthropic_paths(model) | status_paths()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-server",
            "version": __version__,
            "description": "Ollama, OpenAI and Anthropic APIs over MLX models. Errors come in each API family's own shape.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "server.api_key or MLX_SERVER_API_KEY"},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            }
        },
        "security": [{"bearer": []}, {"x-api-key": []}],
        "paths": paths,
    }


def add_routes(app: web.Application) -> None:
    text = json.dumps(document(app[CONFIG]), separators=(",", ":"))

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
