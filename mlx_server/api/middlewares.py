"""Middlewares and error shapes: errors, auth, rate limit, CORS, the access log.

Every API family gets its errors in its own shape (`api_family`)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from ..errors import MlxServerError, PayloadTooLarge, RateLimited, RouteError, Unauthorized
from .keys import CONFIG, METRICS, MODEL_KEY, RESPONSE_HEADERS, TOKENS_KEY

log = logging.getLogger("mlx_server.http")

PUBLIC_PATHS = frozenset({"/", "/health", "/metrics"})


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
