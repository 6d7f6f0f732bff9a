"""What handlers and the engine thread exchange: a request goes in, events come out.

Plain records with no MLX in them, so the API layer imports them without the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MlxServerError
from .options import GenerationOptions

LogitsProcessor = Callable[[Any, Any], Any]  # mlx_lm's: (tokens, logits) -> logits


# --- what handlers send in -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompt: Sequence[int]
    max_tokens: int
    options: GenerationOptions = GenerationOptions(temperature=0.0)  # sampling, penalties, stop
    # Built on the engine thread (it may create MLX arrays), e.g. constrained decoding.
    logits_processor: Callable[[], LogitsProcessor] | None = None
    # None: no logprobs; N >= 0: each token's logprob plus its N most likely alternatives.
    logprobs: int | None = None


# --- what comes back -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str  # the token's own text (decoded alone)
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and, when asked, its top alternatives."""

    token: str
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextEvent:
    text: str
    # One entry per token generated since the previous TextEvent, when the request
    # asked for logprobs (GenerationRequest.logprobs is not None); else empty.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    output_tokens: tuple[int, ...]
    prompt_seconds: float  # submit -> first token
    decode_seconds: float  # first token -> done


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: MlxServerError


Event = TextEvent | DoneEvent | ErrorEvent


class GenerationJob:
    """One generation: the engine writes events, the handler reads them.

    The handler must call `cancel()` when it stops reading (in a `finally`); the
    engine drops the sequence at its next step.
    """

    __slots__ = ("request", "loop", "queue", "cancelled", "submitted_at")

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, TextEvent):
                return
