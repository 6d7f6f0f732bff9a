"""The proxy: the Ollama API and OpenAI chat in front of the chain, as one aiohttp app
(`create_router_app`), and `mlx-server route` (`main_route`)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from .. import __version__
from ..admission import PRIORITY_HEADER, Priority, parse_priority
from ..errors import BadRequest, MlxServerError, RouteError
from .config import DISABLED, RouterConfig, load_router_config
from .core import Router, Stream, collect
from .shapes import openai_completion, openai_events, openai_to_ollama

log = logging.getLogger("mlx_server.router")

HEADER = "X-MLX-Router-Backend"
NDJSON = "application/x-ndjson"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTER = web.AppKey("router", Router)


def _error_response(path: str, error: MlxServerError, backend: str | None = None) -> web.Response:
    """The error in the caller's API shape (OpenAI under /v1/, Ollama elsewhere)."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": error.message, "type": error.kind, "param": error.param,
                                          "code": error.status}}
    else:
        body = {"error": error.message}
    headers = {HEADER: backend} if backend else {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return web.json_response(body, status=error.status, headers=headers)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except MlxServerError as e:  # AnswerFailed names the backend that failed
        response = _error_response(request.path, e, getattr(e, "backend", None))
    except ConnectionResetError:
        raise  # the client left mid-stream
    except web.HTTPException as e:
        if e.status not in (404, 405):
            raise
        if e.status == 404:
            what = f"no route for {request.method} {request.path}"
        else:
            what = f"method {request.method} is not allowed on {request.path}"
        response = _error_response(request.path, RouteError(what, e.status))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        bug = MlxServerError("internal router error (this is a bug; the log has the details)")
        response = _error_response(request.path, bug)
    if request.path not in ("/health", "/metrics"):
        log.info("%s %s status=%d backend=%s duration=%.3fs", request.method, request.path, response.status,
                 response.headers.get(HEADER, "-"), time.perf_counter() - started)
    return response


async def _read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _priority(request: web.Request) -> Priority | None:
    """X-Request-Priority, checked here: a bad value is the caller's 400, not a backend's miss."""
    header = request.headers.get(PRIORITY_HEADER)
    return parse_priority(header, param=PRIORITY_HEADER) if header and header.strip() else None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _stream_out(
    request: web.Request, stream: Stream, content_type: str, frames: AsyncIterator[bytes]
) -> web.StreamResponse:
    """Headers (with the backend) then each frame as soon as it is made."""
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", HEADER: stream.backend})
    await response.prepare(request)
    async for frame in frames:
        await response.write(frame)
    await response.write_eof()
    return response


def _ollama_handler(kind: str) -> Callable:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        async with await request.app[ROUTER].open(kind, body, priority=_priority(request)) as stream:
            if not body.get("stream", True):  # a failure after the start: AnswerFailed, a 502
                return web.json_response(await collect(stream), headers={HEADER: stream.backend})
            return await _stream_out(request, stream, NDJSON, (_json_bytes(c) + b"\n" async for c in stream))

    return handler


async def openai_chat(request: web.Request) -> web.StreamResponse:
    body = await _read_body(request)
    ollama_body, streaming, include_usage = openai_to_ollama(body)
    ident, model, created = f"chatcmpl-{uuid.uuid4().hex}", body["model"], int(time.time())
    async with await request.app[ROUTER].open("chat", ollama_body, priority=_priority(request)) as stream:
        if not streaming:
            final = await collect(stream)
            return web.json_response(openai_completion(final, ident, model, created), headers={HEADER: stream.backend})

        async def frames() -> AsyncIterator[bytes]:
            async for event in openai_events(stream, ident, model, created, include_usage):
                yield b"data: " + _json_bytes(event) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await _stream_out(request, stream, "text/event-stream; charset=utf-8", frames())


async def _model_list(request: web.Request, path: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    models, answered = await request.app[ROUTER].models(path)
    return models, ({HEADER: ", ".join(answered)} if answered else {})


async def tags(request: web.Request) -> web.Response:
    models, headers = await _model_list(request, "/api/tags")
    return web.json_response({"models": models}, headers=headers)


async def ps(request: web.Request) -> web.Response:
    models, headers = await _model_list(request, "/api/ps")
    return web.json_response({"models": models}, headers=headers)


async def openai_models(request: web.Request) -> web.Response:
    models, headers = await _model_list(request, "/api/tags")
    data = [{"id": m.get("name") or m.get("model"), "object": "model", "created": 0, "owned_by": m["backend"]} for m in models]
    return web.json_response({"object": "list", "data": data}, headers=headers)


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROUTER].health())


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[ROUTER].registry), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    task = asyncio.create_task(router.watch())
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    await router.close()


def create_router_app(config: RouterConfig) -> web.Application:
    """The proxy: Ollama API and OpenAI chat in front of the chain."""
    app = web.Application(middlewares=[_errors_middleware], client_max_size=64 << 20)
    app[ROUTER] = Router(config)
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/chat", _ollama_handler("chat"))
    app.router.add_post("/api/generate", _ollama_handler("generate"))
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_lifetime)
    return app


async def _run_proxy(config: RouterConfig, host: str, port: int) -> int:
    runner = web.AppRunner(create_router_app(config), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as e:
        await runner.cleanup()
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        return 1
    chain = " -> ".join(f"{b.name} {b.url or DISABLED}" for b in config.backends)
    log.info("mlx-server router listening on http://%s:%d (%s)", host, port, chain)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    return 0


def main_route(args: Any) -> int:
    """`mlx-server route`: run the proxy until SIGTERM or SIGINT; the exit code."""
    try:
        config = load_router_config(mlx_url=args.mlx_url, ollama_url=args.ollama_url, victoria_url=args.victoria_url)
    except ValueError as e:
        log.error("%s", e)
        return 2
    return asyncio.run(_run_proxy(config, args.host, args.port))
