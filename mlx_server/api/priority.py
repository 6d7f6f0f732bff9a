"""A request's admission priority: a `priority` body field, else the X-Request-Priority
header, else (None) the model's configured default."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..admission import PRIORITY_HEADER, Priority, parse_priority

PRIORITY_KEY = web.RequestKey("priority", Priority)


def body_priority(request: web.Request, body: dict[str, Any]) -> None:
    """Note the body's `priority` (a 400 naming it when it is not high, medium or low)."""
    if body.get("priority") is not None:
        request[PRIORITY_KEY] = parse_priority(body["priority"], param="priority")


def request_priority(request: web.Request) -> Priority | None:
    if PRIORITY_KEY in request:
        return request[PRIORITY_KEY]
    header = request.headers.get(PRIORITY_HEADER)
    if header is None or not header.strip():
        return None
    return parse_priority(header, param=PRIORITY_HEADER)
