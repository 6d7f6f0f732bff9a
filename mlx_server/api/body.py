"""Request bodies: JSON decoded with limits (size, depth, digits), and typed field
readers whose errors name the field and what was sent."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import hdrs, web

from ..config import ModelConfig, parse_keep_alive
from ..errors import BadRequest, brief
from .keys import MANAGER, MODEL_KEY

MAX_JSON_DEPTH = 64
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
