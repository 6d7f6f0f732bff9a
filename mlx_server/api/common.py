"""What every API family shares: app state keys, body parsing, errors, streaming,
and the one completion pipeline (lease -> tokenize -> engine job -> events).

Handlers parse their own shapes, call `completion()`, and format the events; they
never touch the engine's or the manager's internals.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import hdrs, web

from ..config import Config, ModelConfig, parse_keep_alive
from ..engine import Engine
from ..group.backend import GroupBackend
from ..jobs import DoneEvent, ErrorEvent, GenerationJob, GenerationRequest, TextEvent
from ..errors import BadRequest, MlxServerError, PayloadTooLarge, RateLimited, RouteError, Unauthorized, brief
from ..manager import Lease, Manager
from ..metrics import Metrics
from ..options import GenerationOptions
from ..prompts import chat_prompt
from ..reaper import Reaper
from ..tools import OutputParser, starts_in_thinking
from .priority import request_priority

log = logging.getLogger("mlx_server.http")

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", Engine)
GROUPS = web.AppKey("groups", GroupBackend)  # generates for the models with a `distributed` key
MANAGER = web.AppKey("manager", Manager)
METRICS = web.AppKey("metrics", Metrics)
REAPER = web.AppKey("reaper", Reaper)
STARTED = web.AppKey("started", float)

MODEL_KEY = web.RequestKey("model", str)  # the model a request named, for logs and metrics
TOKENS_KEY = web.RequestKey("tokens", int)  # tokens generated, for the access log
RESPONSE_HEADERS = web.RequestKey("response_headers", dict)  # set by middlewares (CORS), for streams too
PUBLIC_PATHS = frozenset({"/", "/health", "/metrics"})
NDJSON = "application/x-ndjson"
MAX_JSON_DEPTH = 64


# --- request bodies --------------------------------------------------------------

PARSE_IN_THREAD = 1 << 20  # bodies this big are parsed off the event loop, so streams keep flowing
JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last
MAX_MODEL_NAME = 512
MAX_DIGITS = 1000  # no field needs more; Python refuses to convert past 4,300 anyway


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    content_type = request.content_type if hdrs.CONTENT_TYPE in request.headers else "application/json"
    if len(raw) > PARSE_IN_THREAD:
        return await asyncio.to_thread(decode_json, raw, content_type)
    return decode_json(raw, content_type)


def decode_json(raw: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """Strict JSON (no NaN or Infinity, no 5,000-digit numbers), one object, at most 64 deep."""
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start}){_sent_as(content_type)}") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}{_sent_as(content_type)}") from None
    except RecursionError:
        raise BadRequest(f"JSON nested too deeply (limit {MAX_JSON_DEPTH})") from None
    except ValueError as e:  # from the three hooks below
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_json_kind(body)}")
    if _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested too deeply (limit {MAX_JSON_DEPTH})")
    return body


def _sent_as(content_type: str) -> str:
    if content_type.endswith("+json") or content_type in JSON_TYPES:
        return ""
    return f" (the body was sent as {content_type}; send JSON with Content-Type: application/json)"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise ValueError(f"a number {len(text)} digits long is too long")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _depth(value: Any, limit: int = MAX_JSON_DEPTH + 1) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array", dict: "an object"}


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
    """body[name] checked against `kind`; a 400 naming the field otherwise."""
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"'{name}' is required", param=name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1e300:  # beyond what a float holds
            raise BadRequest(f"'{name}' is out of range", param=name)
        return float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BadRequest(f"'{name}' must be {expected}, got {type(value).__name__}", param=name)
    return value


def model_field(body: dict[str, Any], key: str = "model") -> str:
    name = field(body, key, str, required=True)
    if not name.strip():
        raise BadRequest(f"'{key}' must not be empty", param=key)
    if len(name) > MAX_MODEL_NAME:  # no configured name is this long; keeps it out of logs
        raise BadRequest(f"'{key}' is {len(name)} characters long; names are at most {MAX_MODEL_NAME}", param=key)
    return name


def requested_model(request: web.Request, body: dict[str, Any], key: str = "model") -> tuple[str, ModelConfig]:
    """The name a request asks for and the model it resolves to (404 when none is configured).

    The name labels the request's log line and metrics from here on, even when it is refused.
    """
    name = model_field(body, key)
    request[MODEL_KEY] = name
    return name, request.app[MANAGER].resolve(name)


def keep_alive_field(body: dict[str, Any]) -> float | None:
    if body.get("keep_alive") is None:
        return None
    value = body["keep_alive"]
    try:
        return parse_keep_alive(value)
    except ValueError:
        raise BadRequest(
            f"'keep_alive' must be a duration: seconds, or e.g. '30s', '5m', '1h' (negative: forever), got {brief(value)}", param="keep_alive"
        ) from None


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- the completion pipeline -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompletionSpec:
    """An API-neutral completion: what to run, on which model, with which options."""

    model: str
    build_prompt: Callable[[Any], list[int]]  # tokenizer -> token ids; runs in a worker thread
    options: GenerationOptions
    keep_alive: float | None = None
    # (tokenizer, token budget) -> a factory the engine calls to build a logits processor
    # (structured output); runs in a worker thread, as building it can take a second
    constrain: Callable[[Any, int], Callable[[], Any]] | None = None
    logprobs: int | None = None  # GenerationRequest.logprobs


def chat_spec(
    model: str,
    messages: list[dict[str, Any]],
    options: GenerationOptions,
    keep_alive: float | None,
    *,
    tools: list[dict[str, Any]],
    think: bool | str | None,
    constrain: Callable[[Any, int], Callable[[], Any]] | None,
    logprobs: int | None = None,
) -> CompletionSpec:
    """A completion whose prompt is the model's chat template applied to `messages`."""

    def build(tokenizer: Any) -> list[int]:
        return chat_prompt(tokenizer, messages, tools=tools, think=think)

    return CompletionSpec(model, build, options, keep_alive, constrain=constrain, logprobs=logprobs)


@dataclass(slots=True)
class Completion:
    lease: Lease
    job: GenerationJob | None
    prompt: list[int]
    metrics: Metrics
    started: float
    done: DoneEvent | None = None

    async def events(self) -> AsyncIterator[TextEvent | DoneEvent]:
        """Text as it is decoded, then one DoneEvent; an engine error is raised."""
        if self.job is None:  # nothing to generate (num_predict 0)
            self.done = DoneEvent("length", len(self.prompt), 0, 0, (), 0.0, 0.0)
            yield self.done
            return
        async for event in self.job.events():
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, DoneEvent):
                self.done = event
                self.metrics.observe_generation(self.lease.name, event.prompt_tokens, event.completion_tokens, event.prompt_seconds)
            yield event

    def output_parser(self, tools: list[dict[str, Any]] | None) -> OutputParser:
        """Splits this completion's text into content, thinking and tool calls."""
        tokenizer = self.lease.tokenizer
        return OutputParser(tokenizer, tools=tools, thinking=starts_in_thinking(tokenizer, self.prompt))

    async def text(self) -> tuple[str, DoneEvent]:
        parts = [e.text async for e in self.events() if isinstance(e, TextEvent)]
        assert self.done is not None
        return "".join(parts), self.done


class PromptTooLong(BadRequest):
    """The prompt fills the context; the numbers let an API word it its own way."""

    def __init__(self, prompt_tokens: int, context: int):
        super().__init__(f"prompt is {prompt_tokens} tokens but the context window is {context} tokens", param="num_ctx")
        self.prompt_tokens = prompt_tokens
        self.context = context


def token_budget(prompt_tokens: int, context: int, options: GenerationOptions) -> int:
    """How many tokens may be generated: num_predict, capped by what the context has left."""
    room = context - prompt_tokens
    if room <= 0:
        raise PromptTooLong(prompt_tokens, context)
    return room if options.num_predict < 0 else min(options.num_predict, room)


@asynccontextmanager
async def completion(request: web.Request, spec: CompletionSpec) -> AsyncIterator[Completion]:
    """Hold the model's lease for as long as the handler is inside this block."""
    app = request.app
    request[MODEL_KEY] = spec.model
    started = time.perf_counter()
    async with app[MANAGER].lease(spec.model, keep_alive=spec.keep_alive, priority=request_priority(request)) as lease:
        request[MODEL_KEY] = lease.name
        prompt = await asyncio.to_thread(spec.build_prompt, lease.tokenizer)
        if not prompt:
            raise BadRequest("the prompt is empty after templating")
        context = min(lease.context_length, spec.options.num_ctx or lease.context_length)
        max_tokens = token_budget(len(prompt), context, spec.options)
        # Reserve the sequence's KV cache before it runs; without num_predict it may be cut to what fits.
        max_tokens = await app[MANAGER].reserve(lease, len(prompt), max_tokens, flexible=spec.options.num_predict < 0)
        job = None
        if max_tokens > 0:
            processor = await asyncio.to_thread(spec.constrain, lease.tokenizer, max_tokens) if spec.constrain else None
            generator = app[GROUPS] if lease.config.distributed is not None else app[ENGINE]
            job = generator.generate(
                GenerationRequest(
                    model=lease.name,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    options=spec.options,
                    logits_processor=processor,
                    logprobs=spec.logprobs,
                )
            )
        result = Completion(lease, job, prompt, app[METRICS], started)
        try:
            yield result
        finally:
            if job is not None:
                job.cancel()
            if result.done is not None:
                request[TOKENS_KEY] = result.done.completion_tokens


def durations_ns(c: Completion) -> dict[str, int]:
    """Ollama's timing fields, in integer nanoseconds."""
    done = c.done
    assert done is not None
    return {
        "total_duration": int((time.perf_counter() - c.started) * 1e9),
        "load_duration": int(c.lease.load_seconds * 1e9),
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": int(done.prompt_seconds * 1e9),
        "eval_count": done.completion_tokens,
        "eval_duration": int(done.decode_seconds * 1e9),
    }


# --- streaming -------------------------------------------------------------------


class LineStream:
    """One JSON object per line (NDJSON) or per SSE `data:` event, flushed as written."""

    def __init__(self, request: web.Request, *, sse: bool = False):
        self._request = request
        self._sse = sse
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8" if sse else NDJSON,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **request.get(RESPONSE_HEADERS, {}),
            }
        )
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self._request)

    async def send(self, obj: Any, *, event: str | None = None) -> None:
        await self.start()
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if self._sse:
            line = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        else:
            line = data + "\n"
        await self.response.write(line.encode("utf-8"))

    async def send_raw(self, text: str) -> None:
        await self.start()
        await self.response.write(text.encode("utf-8"))

    async def finish(self) -> web.StreamResponse:
        await self.start()
        await self.response.write_eof()
        return self.response


# --- errors, auth, access log: middlewares ---------------------------------------------


def api_family(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama"


def error_body(family: str, error: MlxServerError) -> dict[str, Any]:
    if family == "openai":
        return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}
    if family == "anthropic":
        return {"type": "error", "error": {"type": error.kind, "message": error.message}}
    return {"error": error.message}


def error_response(family: str, error: MlxServerError) -> web.Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
    return web.json_response(error_body(family, error), status=error.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every failure becomes a JSON error in the caller's API shape; never a crash."""
    family = api_family(request.path)
    try:
        return await handler(request)
    except MlxServerError as e:
        return error_response(family, e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].server.max_body_mb
        return error_response(family, PayloadTooLarge(f"request body too large: the limit is {limit:g} MB (server.max_body_mb)"))
    except web.HTTPException as e:
        if e.status == 404:
            return error_response(family, RouteError(f"no route for {request.method} {request.path}", 404))
        if e.status == 405:
            response = error_response(family, RouteError(f"method {request.method} is not allowed on {request.path}", 405))
            response.headers[hdrs.ALLOW] = e.headers.get(hdrs.ALLOW, "")
            return response
        raise
    except ConnectionResetError:  # the client left mid-answer: nobody to tell, nothing went wrong here
        return web.Response(status=499, reason="Client Closed Request")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = MlxServerError("internal server error (this is a bug; the log has the details)")
        return error_response(family, err)


def make_auth_middleware(api_key: str | None):
    expected = api_key.encode() if api_key else None

    @web.middleware
    async def auth_middleware(request: web.Request, handler):
        if expected is None or request.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await handler(request)
        supplied = request.headers.get("x-api-key", "")
        bearer = request.headers.get("Authorization", "")
        if bearer[:7].lower() == "bearer ":
            supplied = bearer[7:].strip()
        # surrogateescape: header bytes that are not UTF-8 compare as themselves, never raise
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), expected):
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')")
        return await handler(request)

    return auth_middleware


def make_rate_limit_middleware(requests: int, per: float, clock: Callable[[], float] = time.monotonic):
    """A token bucket per client address; health, metrics and tags are never limited."""
    buckets: dict[str, tuple[float, float]] = {}
    exempt = PUBLIC_PATHS | {"/api/tags"}
    rate = requests / per

    @web.middleware
    async def rate_limit_middleware(request: web.Request, handler):
        if request.path in exempt:
            return await handler(request)
        client = request.remote or "unknown"
        now = clock()
        tokens, last = buckets.get(client, (float(requests), now))
        tokens = min(float(requests), tokens + (now - last) * rate)
        if tokens < 1.0:
            buckets[client] = (tokens, now)
            raise RateLimited(f"rate limit of {requests} requests per {per:g}s exceeded for {client}", retry_after=(1.0 - tokens) / rate)
        buckets[client] = (tokens - 1.0, now)
        if len(buckets) > 10_000:  # forget clients that have fully refilled
            for key in [k for k, (t, s) in buckets.items() if t + (now - s) * rate >= requests]:
                del buckets[key]
        return await handler(request)

    return rate_limit_middleware


def make_cors_middleware(origins: tuple[str, ...]):
    """CORS headers for the listed origins only; a stream gets them from `LineStream`."""
    allowed = frozenset(origins)

    @web.middleware
    async def cors_middleware(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if origin is None or not (origin in allowed or "*" in allowed):
            return await handler(request)
        request[RESPONSE_HEADERS] = {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta",
            "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
        }
        response = web.Response(status=204) if request.method == "OPTIONS" else await handler(request)
        if not response.prepared:  # a stream was sent with its headers already
            response.headers.update(request[RESPONSE_HEADERS])
        return response

    return cors_middleware


@web.middleware
async def access_log_middleware(request: web.Request, handler):
    """One line per request, and the request metrics."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        seconds = time.perf_counter() - started
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else None
        request.app[METRICS].observe_request(endpoint, request.get(MODEL_KEY), status, seconds)
        if request.path not in ("/metrics", "/health"):
            log.info(
                "%s %s model=%s status=%d tokens=%s duration=%.3fs",
                request.method, request.path, request.get(MODEL_KEY, "-"), status,
                request.get(TOKENS_KEY, "-"), seconds,
                extra={"method": request.method, "path": request.path, "model": request.get(MODEL_KEY),
                       "status": status, "tokens": request.get(TOKENS_KEY), "duration": round(seconds, 4)},
            )
