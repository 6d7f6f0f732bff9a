"""The daemon's exceptions: each knows its HTTP status, and the API layer formats it.

One middleware (`api/middlewares.py`) maps them to each API family's error shape, so a
handler only raises and never builds an error body itself.
"""

from __future__ import annotations

from typing import Any


def brief(value: Any) -> str:
    """A value for an error message, cut short: requests can send megabytes."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"
    return text if len(text) <= 80 else text[:77] + "..."


class MlxServerError(Exception):
    """Base class: an error a client is told about, with its HTTP status."""

    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class BadRequest(MlxServerError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(MlxServerError):
    status = 401
    kind = "authentication_error"


class ModelNotFound(MlxServerError):
    status = 404
    kind = "not_found_error"

    def __init__(self, name: str):
        super().__init__(f"model '{name}' not found", param="model")
        self.name = name


class PayloadTooLarge(MlxServerError):
    status = 413
    kind = "request_too_large"


class RateLimited(MlxServerError):
    status = 429
    kind = "rate_limit_error"


class Unavailable(MlxServerError):
    """503: the request cannot be served now; `retry_after` says when to try again."""

    status = 503
    kind = "overloaded_error"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message, retry_after=retry_after)


class QueueFull(Unavailable):
    pass


class InsufficientMemory(Unavailable):
    pass


class LoadFailed(Unavailable):
    """The model failed to load; the reason is kept and repeated to every caller."""

    def __init__(self, name: str, reason: str, *, retry_after: float = 5.0):
        super().__init__(f"model '{name}' failed to load: {reason}", retry_after=retry_after)
        self.name = name
        self.reason = reason


class EngineDead(Unavailable):
    def __init__(self, reason: str):
        super().__init__(f"the MLX engine thread stopped: {reason}", retry_after=30.0)


class ShuttingDown(Unavailable):
    def __init__(self):
        super().__init__("the server is shutting down", retry_after=5.0)


class GenerationFailed(MlxServerError):
    """An MLX error or MemoryError inside one request: that request fails, not the daemon."""

    status = 500
    kind = "api_error"


class UpstreamError(MlxServerError):
    status = 502
    kind = "api_error"


class RouteError(MlxServerError):
    """No such route (404) or method (405): answered as JSON like every other error."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.kind = "not_found_error" if status == 404 else "invalid_request_error"
