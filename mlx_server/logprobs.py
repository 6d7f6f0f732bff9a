"""Token log-probabilities: the request's ask, and each API's shape for the answer.

The engine attaches to each TextEvent the logprobs of the tokens generated since
the previous one (jobs.TokenLogprob). `LogprobTap` collects them as the events pass
on to the output parser, so a streamed chunk carries the tokens read since the
chunk before it, and a whole answer carries them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .errors import BadRequest, brief
from .jobs import DoneEvent, TextEvent, TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's and Ollama's limit
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' integer `logprobs`


def logprobs_request(logprobs: Any, top_logprobs: Any) -> int | None:
    """`logprobs` (bool) and `top_logprobs` (0-20) -> GenerationRequest.logprobs."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(f"'logprobs' must be a boolean, got {brief(logprobs)}", param="logprobs")
    if top_logprobs is not None:
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {brief(top_logprobs)}", param="top_logprobs")
        if not logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def completion_logprobs_request(value: Any) -> int | None:
    """/v1/completions: `logprobs` is the number of alternatives (0-5), or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(f"'logprobs' must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, got {brief(value)}", param="logprobs")
    return value


class LogprobTap:
    """Passes events through and keeps their logprobs: `take()` since the last take, `all`."""

    def __init__(self) -> None:
        self.all: list[TokenLogprob] = []
        self._taken = 0

    async def tap(self, events: AsyncIterator[TextEvent | DoneEvent]) -> AsyncIterator[TextEvent | DoneEvent]:
        async for event in events:
            if isinstance(event, TextEvent):
                self.all.extend(event.logprobs)
            yield event

    def take(self) -> list[TokenLogprob]:
        out = self.all[self._taken :]
        self._taken = len(self.all)
        return out


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _with_top(entry: TokenLogprob) -> dict[str, Any]:
    return _token(entry.token, entry.logprob) | {"top_logprobs": [_token(t.token, t.logprob) for t in entry.top]}


def ollama_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Ollama's `logprobs`: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    return [_with_top(e) for e in entries]


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat's `choices[].logprobs`."""
    return {"content": [_with_top(e) for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' legacy shape: parallel lists, and text offsets from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }

