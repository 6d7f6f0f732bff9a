"""One chat turn through each of the daemon's generation routes, streamed or not, read
back into one shape, every line decoded as strict UTF-8 (callers then count U+FFFD:
a multi-byte character split across tokens must never reach a client broken)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

ROUTES = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/messages")
DONE = {"stop": "stop", "length": "length", "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    chunks: tuple[str, ...]  # the text pieces as streamed (one piece when not streamed)
    count: int  # eval_count / completion_tokens / output_tokens
    done_reason: str  # "stop" or "length", whatever the route calls them
    cached_tokens: int | None  # prompt tokens served from the prompt cache, where the route says
    context: tuple[int, ...] | None  # /api/generate: prompt + answer token ids


def _lines(response: httpx.Response) -> list[dict]:
    """NDJSON objects or SSE `data:` payloads; a line that is not valid UTF-8 raises."""
    payloads = []
    for raw in b"".join(response.iter_bytes()).splitlines():
        line = raw.decode("utf-8", errors="strict")  # httpx's own line reader would hide bad bytes as U+FFFD
        if line.startswith("data: "):
            line = line[6:]
            if line == "[DONE]":
                continue
        elif not line.startswith("{"):
            continue  # SSE `event:` lines and blanks
        payloads.append(json.loads(line))
    return payloads


def body_for(route: str, messages: list[dict], max_tokens: int, stream: bool, prompt_text: str | None = None, **extra) -> dict:
    """The request body of `route` for a chat (system first, then turns), greedy."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    options = {"temperature": 0, "num_predict": max_tokens}
    if route == "/api/generate":
        assert len(turns) == 1, "/api/generate takes one user prompt"
        body = {"prompt": turns[0]["content"], "system": system[0] if system else "", "options": options}
    elif route == "/api/chat":
        body = {"messages": messages, "options": options}
    elif route == "/v1/chat/completions":
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True} if stream else None}
    elif route == "/v1/completions":
        body = {"prompt": prompt_text, "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True} if stream else None}
    else:
        body = {"messages": turns, "system": system[0] if system else None, "max_tokens": max_tokens, "temperature": 0}
    if "options" in body:
        body["options"] |= extra.pop("options", {})
    body = {k: v for k, v in body.items() if v is not None}
    return {"model": "demo", "stream": stream, **body, **extra}


def ask(url: str, route: str, messages: list[dict], max_tokens: int, *, stream: bool, prompt_text: str | None = None, timeout: float = 300, **extra) -> Answer:
    body = body_for(route, messages, max_tokens, stream, prompt_text, **extra)
    with httpx.Client(timeout=timeout) as client, client.stream("POST", url + route, json=body) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{route} answered {response.status_code}: {response.text}")
        payloads = _lines(response)
    return _read(route, payloads, stream)


def _read(route: str, payloads: list[dict], stream: bool) -> Answer:
    chunks: list[str] = []
    count = cached = context = reason = None
    for p in payloads:
        if route in ("/api/generate", "/api/chat"):
            chunks.append(p["response"] if route == "/api/generate" else p["message"]["content"])
            if p.get("done"):
                count, reason, context = p["eval_count"], p["done_reason"], p.get("context")
        elif route in ("/v1/chat/completions", "/v1/completions"):
            for choice in p.get("choices", []):
                piece = choice["text"] if route == "/v1/completions" else (choice.get("delta") or choice.get("message") or {}).get("content")
                chunks.append(piece or "")
                reason = choice.get("finish_reason") or reason
            if p.get("usage"):
                count = p["usage"]["completion_tokens"]
                cached = (p["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        elif not stream:  # /v1/messages
            chunks += [block["text"] for block in p["content"] if block["type"] == "text"]
            count, reason = p["usage"]["output_tokens"], p["stop_reason"]
            cached = p["usage"].get("cache_read_input_tokens")
        elif p["type"] == "content_block_delta":
            chunks.append(p["delta"].get("text", ""))
        elif p["type"] == "message_delta":
            count, reason = p["usage"]["output_tokens"], p["delta"]["stop_reason"]
        elif p["type"] == "message_start":
            cached = p["message"]["usage"].get("cache_read_input_tokens")
    assert count is not None and reason is not None, f"{route}: no final count or done reason in {payloads[-1:]}"
    return Answer("".join(chunks), tuple(chunks), count, DONE[reason], cached, tuple(context) if context else None)
