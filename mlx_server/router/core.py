"""The router itself: the chain, misses, the health cache, and reading upstream answers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..admission import PRIORITY_HEADER, Priority
from ..errors import MlxServerError, UpstreamError
from .breaker import Admission, Breaker, BreakerState
from .config import DISABLED, BackendConfig, RouterConfig, load_router_config
from .shapes import UpstreamFailure, ollama_chunk, validate_body, victoria_request, victoria_text

log = logging.getLogger("mlx_server.router")

HEALTH_PATHS = {"mlx": "/health", "ollama": "/api/version", "victoria": "/health"}
VICTORIA_FINAL_EVENTS = frozenset({"done", "complete", "completed", "result", "final"})
VICTORIA_FINAL_STATUSES = frozenset({"success", "needs_clarification", "error", "failed"})

Chunks = AsyncGenerator[dict[str, Any], None]  # Ollama-shaped chunks


class Miss(Exception):
    """A backend did not start an answer; the next one is tried."""

    def __init__(self, reason: str, detail: str, *, transport: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # connection | timeout | not_found | unavailable | error | circuit_open | unsupported
        self.detail = detail
        self.transport = transport  # counts against the backend's circuit


class Unanswered(MlxServerError):
    """No backend answered: 404 when none has the model, else 503."""

    def __init__(self, model: str, misses: list[tuple[str, Miss]], retry_after: float):
        why = "; ".join(f"{name}: {miss.detail}" for name, miss in misses)
        lacking = all(m.reason in ("not_found", "unsupported") for _, m in misses)
        if lacking:
            super().__init__(f"model '{model}' not found on any backend ({why})", param="model")
            self.status, self.kind = 404, "not_found_error"
        else:
            super().__init__(f"no backend could answer for model '{model}' ({why})", retry_after=max(1.0, retry_after))
            self.status, self.kind = 503, "overloaded_error"
        self.misses = misses


class AnswerFailed(UpstreamError):
    """The chosen backend failed after its answer had started; the router does not switch."""

    def __init__(self, backend: str, message: str):
        super().__init__(message)
        self.backend = backend


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer: the Ollama-shaped /api/chat or /api/generate body, and who made it."""

    backend: str
    body: dict[str, Any]

    @property
    def text(self) -> str:
        if "message" in self.body:
            return self.body["message"].get("content") or ""
        return self.body.get("response") or ""


class Stream:
    """A streamed answer: Ollama-shaped chunks as they arrive from `backend`; a failure
    after the first chunk is one `{"error": ...}` chunk, then the end."""

    def __init__(self, backend: str, kind: str, chunks: Chunks):
        self.backend = backend
        self.kind = kind  # chat | generate
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def collect(stream: Stream) -> dict[str, Any]:
    """Join a stream into one response body, as Ollama answers `stream: false`."""
    parts: list[str] = []
    thinking: list[str] = []
    tool_calls: list[Any] = []
    final: dict[str, Any] = {}
    async for chunk in stream:
        if "error" in chunk:
            raise AnswerFailed(stream.backend, str(chunk["error"]))
        message = chunk.get("message") or {}
        parts.append(message.get("content") or chunk.get("response") or "")
        thinking.append(message.get("thinking") or chunk.get("thinking") or "")
        tool_calls.extend(message.get("tool_calls") or [])
        final = chunk
    body = dict(final)
    if stream.kind == "chat":
        message = {"role": "assistant", "content": "".join(parts)}
        if any(thinking):
            message["thinking"] = "".join(thinking)
        if tool_calls:
            message["tool_calls"] = tool_calls
        body["message"] = message
    else:
        body["response"] = "".join(parts)
        if any(thinking):
            body["thinking"] = "".join(thinking)
    return body


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Every line as it arrives, blank ones included, however long (no readline limit)."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", errors="replace")


async def _sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) per server-sent event."""
    event, data = "", []
    async for line in _lines(response):
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


async def _victoria_pieces(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Text pieces of Victoria's SSE answer, read leniently (only /run's body is fixed by
    contract). Each event's data is JSON, or plain text taken as a piece. A piece is the
    `content`, `delta`, `token` or `text` field. An event named (or typed) done,
    complete, completed, result or final, or carrying a final `status`, ends the answer:
    its `output` (or its clarification questions) is the text when no piece came before.
    An `error` event or a failed status is a failure; `data: [DONE]` ends the stream."""
    streamed = False
    async for event, data in _sse(response):
        if data.strip() == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data
        if not isinstance(payload, dict):
            streamed = True
            yield payload if isinstance(payload, str) else json.dumps(payload)
            continue
        name = event or str(payload.get("type") or payload.get("event") or "")
        if name == "error" or payload.get("error"):
            raise UpstreamFailure(f"Victoria: {payload.get('error') or payload.get('message') or data}")
        if name in VICTORIA_FINAL_EVENTS or payload.get("status") in VICTORIA_FINAL_STATUSES:
            text = victoria_text(payload)
            if not streamed and text:
                yield text
            return
        piece = next((payload[k] for k in ("content", "delta", "token", "text") if isinstance(payload.get(k), str)), "")
        if piece:
            streamed = True
            yield piece


async def _error_text(response: aiohttp.ClientResponse) -> str:
    raw = (await response.read()).decode("utf-8", errors="replace")
    try:
        error = json.loads(raw).get("error", raw)
    except (ValueError, AttributeError):
        return raw.strip()[:300] or response.reason or ""
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)


def _status_miss(status: int, text: str) -> Miss:
    reason = {404: "not_found", 429: "unavailable", 503: "unavailable"}.get(status, "error")
    return Miss(reason, f"HTTP {status}: {text}")


def _as_miss(error: BaseException, backend: BackendConfig) -> Miss:
    if isinstance(error, Miss):
        return error
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return Miss("timeout", f"could not connect within {backend.connect_timeout:g}s", transport=True)
    if isinstance(error, TimeoutError):
        return Miss("timeout", f"no answer within {backend.timeout:g}s", transport=True)
    if isinstance(error, aiohttp.ClientError):
        return Miss("connection", str(error) or type(error).__name__, transport=True)
    return Miss("error", str(error))


FAILURES = (Miss, UpstreamFailure, aiohttp.ClientError, TimeoutError)


class Router:
    """MLX -> Ollama -> Victoria with a health cache. Keep one per event loop (its HTTP
    session belongs to the loop it first ran on) and close it when done."""

    def __init__(self, config: RouterConfig | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config or load_router_config()
        self.backends = tuple(b for b in self.config.backends if b.url)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._breakers = {b.name: Breaker(self.config.failure_threshold, self.config.cooldown) for b in self.backends}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # outcome: ok | error (failed mid-answer) | cancelled (caller left) | miss | unanswered (backend "none")
        self._requests = Counter("mlx_router_requests_total", "Requests by backend and outcome",
                                 ["backend", "outcome"], registry=r)
        self._fallbacks = Counter("mlx_router_fallbacks_total", "Moves down the chain, by reason",
                                  ["from_backend", "to_backend", "reason"], registry=r)
        self._up = Gauge("mlx_router_backend_up", "1 while the backend's circuit is closed", ["backend"], registry=r)
        for b in self.backends:
            self._up.labels(b.name).set(1)

    async def __aenter__(self) -> Router:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    # --- the library API

    async def chat(self, model: str, messages: list[dict[str, Any]], *, stream: bool = False,
                   options: dict[str, Any] | None = None, priority: Priority | None = None, **fields: Any) -> Reply | Stream:
        """An Ollama /api/chat: a `Stream` of chunks when `stream`, else a `Reply`.
        `fields` are further request fields (tools, format, keep_alive, think)."""
        body = {"model": model, "messages": messages, **fields, "stream": stream} | ({"options": options} if options else {})
        return await (self.open("chat", body, priority=priority) if stream else self.complete("chat", body, priority=priority))

    async def generate(self, model: str, prompt: str, *, stream: bool = False,
                       options: dict[str, Any] | None = None, priority: Priority | None = None, **fields: Any) -> Reply | Stream:
        """An Ollama /api/generate, routed like `chat`."""
        body = {"model": model, "prompt": prompt, **fields, "stream": stream} | ({"options": options} if options else {})
        return await (self.open("generate", body, priority=priority) if stream else self.complete("generate", body, priority=priority))

    async def complete(self, kind: str, body: dict[str, Any], *, priority: Priority | None = None) -> Reply:
        async with await self.open(kind, body, priority=priority) as stream:
            return Reply(stream.backend, await collect(stream))

    async def open(self, kind: str, body: dict[str, Any], *, priority: Priority | None = None) -> Stream:
        """Start the answer on the first backend that takes it (`kind`: chat | generate);
        raises `Unanswered` when none does. `priority` goes to MLX and Ollama as
        X-Request-Priority (the daemon orders admission by it; Ollama ignores it)."""
        validate_body(kind, body)
        misses: list[tuple[str, Miss]] = []
        for backend in self.backends:
            if misses:
                self._fallbacks.labels(misses[-1][0], backend.name, misses[-1][1].reason).inc()
            try:
                first, rest = await self._attempt(backend, kind, body, priority)
            except Miss as miss:
                log.debug("%s missed %s: %s", backend.name, body["model"], miss)
                misses.append((backend.name, miss))
                continue
            return Stream(backend.name, kind, self._watch(backend, first, rest))
        self._fallbacks.labels(misses[-1][0], "none", misses[-1][1].reason).inc()
        self._requests.labels("none", "unanswered").inc()
        raise Unanswered(body["model"], misses, self.config.cooldown)

    async def _attempt(self, backend: BackendConfig, kind: str, body: dict[str, Any],
                       priority: Priority | None) -> tuple[dict[str, Any], Chunks]:
        """The backend's first chunk and the rest, or a Miss."""
        breaker = self._breakers[backend.name]
        admission = breaker.admit(self._clock())
        if admission is Admission.SKIP:
            raise Miss("circuit_open", f"down ({breaker.reason}); next probe in {breaker.remaining(self._clock()):.1f}s")
        if admission is Admission.PROBE:
            try:
                if not await self._probe(backend):
                    raise Miss("circuit_open", f"still down ({breaker.reason})")
            finally:
                breaker.settle()
        chunks = self._chunks(backend, kind, body, priority)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            miss = Miss("error", "the answer was empty")
        except FAILURES as e:
            miss = _as_miss(e, backend)
        else:
            self._mark_up(backend)
            return first, chunks
        self._requests.labels(backend.name, "miss").inc()
        if miss.transport:
            self._mark_down(backend, miss)
        else:
            self._mark_up(backend)
        raise miss

    async def _watch(self, backend: BackendConfig, first: dict[str, Any], rest: Chunks) -> Chunks:
        """Pass chunks on; a failure now is an error chunk (never another backend)."""
        outcome = "cancelled"
        chunk: dict[str, Any] | None = first
        try:
            while chunk is not None:
                if chunk.get("done"):
                    outcome = "ok"
                yield chunk
                chunk = await anext(rest, None)
        except FAILURES as e:
            outcome = "error"
            miss = _as_miss(e, backend)
            if miss.transport:
                self._mark_down(backend, miss)
            log.warning("%s failed mid-answer: %s", backend.name, miss)
            yield {"error": f"{backend.name} failed after the answer had started: {miss.detail}"}
        finally:
            await rest.aclose()
            self._requests.labels(backend.name, outcome).inc()

    def _chunks(self, backend: BackendConfig, kind: str, body: dict[str, Any], priority: Priority | None) -> Chunks:
        if backend.name == "victoria":
            return self._victoria_chunks(backend, kind, body)
        headers = self._headers(backend) | ({PRIORITY_HEADER: priority.label} if priority is not None else {})
        return self._ollama_chunks(backend, f"/api/{kind}", body, headers)

    def _timeout(self, backend: BackendConfig) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=backend.connect_timeout, sock_read=backend.timeout)

    def _headers(self, backend: BackendConfig) -> dict[str, str]:
        return {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}

    async def _ollama_chunks(self, backend: BackendConfig, path: str, body: dict[str, Any], headers: dict[str, str]) -> Chunks:
        """Ollama NDJSON, always streamed; ends after the `done` chunk."""
        async with self._http().post(backend.url + path, json=body | {"stream": True}, headers=headers,
                                     timeout=self._timeout(backend)) as response:
            if response.status != 200:
                raise _status_miss(response.status, await _error_text(response))
            async for line in _lines(response):
                if not line.strip():
                    continue
                try:
                    chunk = json.loads(line)
                except ValueError:
                    raise UpstreamFailure(f"not a JSON line: {line[:120]!r}") from None
                if not isinstance(chunk, dict):
                    raise UpstreamFailure(f"not a JSON object: {line[:120]!r}")
                if chunk.get("error"):
                    raise UpstreamFailure(str(chunk["error"]))
                yield chunk
                if chunk.get("done"):
                    return
        raise UpstreamFailure("the answer ended before its final chunk")

    async def _victoria_chunks(self, backend: BackendConfig, kind: str, body: dict[str, Any]) -> Chunks:
        """Victoria's /stream (SSE) or /run, as Ollama-shaped chunks."""
        request = victoria_request(kind, body)
        if request is None:
            raise Miss("unsupported", "Victoria needs a user message as its goal")
        model = body["model"]
        streaming = body.get("stream", True)
        async with self._http().post(backend.url + ("/stream" if streaming else "/run"), json=request,
                                     headers=self._headers(backend), timeout=self._timeout(backend)) as response:
            if response.status != 200:
                raise _status_miss(response.status, await _error_text(response))
            if not streaming:
                try:
                    result = await response.json(content_type=None)
                except ValueError:
                    raise UpstreamFailure("Victoria's /run answer is not JSON") from None
                yield ollama_chunk(kind, model, victoria_text(result))
            else:
                async for piece in _victoria_pieces(response):
                    yield ollama_chunk(kind, model, piece)
        yield ollama_chunk(kind, model, "", done=True)

    # --- health

    async def _probe(self, backend: BackendConfig) -> bool:
        """One quick GET: any answer below 500 means up; the circuit follows."""
        try:
            async with self._http().get(backend.url + HEALTH_PATHS[backend.name], headers=self._headers(backend),
                                        timeout=aiohttp.ClientTimeout(total=self.config.probe_timeout)) as response:
                await response.read()
                miss = None
                if response.status >= 500:
                    miss = Miss("error", f"health check answered HTTP {response.status}", transport=True)
        except TimeoutError:
            miss = Miss("timeout", f"health check got no answer within {self.config.probe_timeout:g}s", transport=True)
        except aiohttp.ClientError as e:
            miss = _as_miss(e, backend)
        if miss is None:
            self._mark_up(backend)
            return True
        self._mark_down(backend, miss, trip=True)
        return False

    async def check(self) -> None:
        """Probe every backend whose circuit admits it (not those cooling down)."""

        async def one(backend: BackendConfig) -> None:
            breaker = self._breakers[backend.name]
            if breaker.admit(self._clock()) is Admission.SKIP:
                return
            try:
                await self._probe(backend)
            finally:
                breaker.settle()

        await asyncio.gather(*(one(b) for b in self.backends))

    async def watch(self) -> None:
        """Keep the health cache fresh while nobody sends requests (the proxy runs this)."""
        while self.config.health_interval > 0:
            await self.check()
            await asyncio.sleep(self.config.health_interval)

    def _mark_up(self, backend: BackendConfig) -> None:
        if self._breakers[backend.name].succeeded():
            log.info("backend %s (%s) is up again", backend.name, backend.url)
        self._up.labels(backend.name).set(1)

    def _mark_down(self, backend: BackendConfig, miss: Miss, *, trip: bool = False) -> None:
        breaker = self._breakers[backend.name]
        if breaker.failed(miss.detail, self._clock(), trip=trip):
            log.warning("backend %s (%s) is down: %s; skipping it for %gs before the next probe",
                        backend.name, backend.url, miss.detail, self.config.cooldown)
        self._up.labels(backend.name).set(1 if breaker.state is BreakerState.CLOSED else 0)

    def health(self) -> dict[str, Any]:
        now = self._clock()
        backends = []
        for b in self.config.backends:
            entry: dict[str, Any] = {"name": b.name, "url": b.url}
            if b.url is None:
                entry |= {"state": DISABLED, "up": False}
            else:
                breaker = self._breakers[b.name]
                entry |= {"state": str(breaker.state), "up": breaker.state is BreakerState.CLOSED}
                if breaker.reason:
                    entry["reason"] = breaker.reason
                if breaker.state is not BreakerState.CLOSED:
                    entry["next_probe_in"] = round(breaker.remaining(now), 3)
            backends.append(entry)
        enabled = [e for e in backends if e["state"] != DISABLED]
        status = "healthy" if all(e["up"] for e in enabled) else "degraded" if any(e["up"] for e in enabled) else "down"
        return {"status": status, "backends": backends}

    # --- models

    async def models(self, path: str = "/api/tags") -> tuple[list[dict[str, Any]], list[str]]:
        """The model lists of the model backends (MLX, Ollama) merged, the first backend
        winning a name (it is the one a request goes to); each entry names its backend.
        Backends that are down or fail are left out; returns (models, who answered)."""

        async def one(backend: BackendConfig) -> list[dict[str, Any]] | None:
            if self._breakers[backend.name].state is not BreakerState.CLOSED:
                return None
            try:
                async with self._http().get(backend.url + path, headers=self._headers(backend),
                                            timeout=aiohttp.ClientTimeout(total=self.config.probe_timeout)) as response:
                    if response.status != 200:
                        return None
                    body = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                log.debug("%s %s failed: %s", backend.name, path, e)
                return None
            entries = body.get("models") if isinstance(body, dict) else None
            return [m for m in entries if isinstance(m, dict)] if isinstance(entries, list) else None

        chosen = [b for b in self.backends if b.name != "victoria"]
        lists = await asyncio.gather(*(one(b) for b in chosen))
        merged: dict[str, dict[str, Any]] = {}
        answered = []
        for backend, entries in zip(chosen, lists):
            if entries is None:
                continue
            answered.append(backend.name)
            for m in entries:
                merged.setdefault(str(m.get("name") or m.get("model")), m | {"backend": backend.name})
        return list(merged.values()), answered
