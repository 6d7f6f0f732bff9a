"""One streaming chat client for every server, so both sides pay the same client costs.

Two wire formats: Ollama `/api/chat` NDJSON and OpenAI `/v1/chat/completions` SSE.
Every stream records when each piece of content arrived, client side.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

STREAM_TIMEOUT = aiohttp.ClientTimeout(total=1800, sock_read=600)  # the real model prefills 1,500 tokens in minutes here


@dataclass(frozen=True, slots=True)
class Target:
    """A server and a model on it: `api` is "ollama" (NDJSON) or "openai" (SSE)."""

    label: str
    url: str
    api: str
    model: str


@dataclass(frozen=True, slots=True)
class Stream:
    sent: float
    arrivals: tuple[float, ...]  # perf_counter() of each piece of non-empty content
    end: float
    tokens: int  # as the server counts them (eval_count / usage); pieces if cut short
    text: str

    @property
    def ttft(self) -> float:
        return (self.arrivals[0] if self.arrivals else self.end) - self.sent

    @property
    def seconds(self) -> float:
        return self.end - self.sent

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def session() -> aiohttp.ClientSession:
    """Unlimited connections: 32 concurrent streams must not queue in the client."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=STREAM_TIMEOUT)


def _body(target: Target, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, dict[str, Any]]:
    if target.api == "ollama":
        options = {"temperature": 0, "num_predict": max_tokens}
        return "/api/chat", {"model": target.model, "messages": messages, "stream": True, "options": options}
    body = {
        "model": target.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return "/v1/chat/completions", body


def _parse(api: str, line: bytes) -> tuple[str, int | None, bool]:
    """One wire line -> (content, completion tokens if reported, end of stream)."""
    text = line.decode("utf-8").strip()
    if not text:
        return "", None, False
    if api == "openai":
        if not text.startswith("data:"):
            return "", None, False
        text = text[5:].strip()
        if text == "[DONE]":
            return "", None, True
    obj = json.loads(text)
    if "error" in obj:
        raise RuntimeError(f"server error mid-stream: {obj['error']}")
    if api == "ollama":
        content = obj.get("message", {}).get("content", "")
        return content, obj.get("eval_count") if obj.get("done") else None, bool(obj.get("done"))
    usage = obj.get("usage") or {}
    choices = obj.get("choices") or [{}]
    content = (choices[0].get("delta") or {}).get("content") or ""
    return content, usage.get("completion_tokens"), False


async def stream_chat(
    http: aiohttp.ClientSession,
    target: Target,
    messages: list[dict[str, str]],
    max_tokens: int,
    *,
    stop: asyncio.Event | None = None,
) -> Stream:
    """Stream one chat to its end (or until `stop` is set) and time every piece."""
    path, body = _body(target, messages, max_tokens)
    arrivals: list[float] = []
    pieces: list[str] = []
    tokens: int | None = None
    sent = time.perf_counter()
    async with http.post(target.url + path, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{target.label}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            now = time.perf_counter()
            content, count, finished = _parse(target.api, line)
            if content:
                arrivals.append(now)
                pieces.append(content)
            if count is not None:
                tokens = count
            if finished or (stop is not None and stop.is_set()):
                break
    end = time.perf_counter()
    return Stream(sent, tuple(arrivals), end, len(arrivals) if tokens is None else tokens, "".join(pieces))


async def concurrent(http: aiohttp.ClientSession, target: Target, conversations: list[list[dict[str, str]]], max_tokens: int) -> tuple[float, list[Stream]]:
    """All conversations at once: (wall seconds from the first send to the last end, streams)."""
    started = time.perf_counter()
    streams = await asyncio.gather(*(stream_chat(http, target, m, max_tokens) for m in conversations))
    return time.perf_counter() - started, list(streams)


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: HTTP {response.status}: {(await response.text())[:300]}")
        return await response.json()
