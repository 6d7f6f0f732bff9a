"""One generation on the engine thread: its tokens, their text, their logprobs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..jobs import DoneEvent, GenerationJob, TextEvent, TokenLogprob, TopLogprob
from . import libs
from .sampling import GuardedProcessors
from .stops import StopMatcher


class LogprobRecorder:
    """Each generated token's logprob and, when asked, its top alternatives.

    Only built for requests that ask: reading a logprob waits for the step, and
    the top-k is a partition of the whole vocabulary.
    """

    __slots__ = ("pending", "tokenizer", "top")

    def __init__(self, tokenizer: Any, top: int):
        self.tokenizer = tokenizer
        self.top = top
        self.pending: list[TokenLogprob] = []

    def record(self, token: int, logprobs: Any) -> None:
        """`logprobs`: the step's log-probabilities over the vocabulary (after processors)."""
        mx = libs.mx
        alternatives: tuple[TopLogprob, ...] = ()
        if self.top > 0:
            k = min(self.top, logprobs.shape[-1])
            ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
            pairs = sorted(zip(ids.tolist(), logprobs[ids].tolist()), key=lambda p: -p[1])
            alternatives = tuple(TopLogprob(self._text(i), i, v) for i, v in pairs if math.isfinite(v))
        self.pending.append(TokenLogprob(self._text(token), token, logprobs[token].item(), alternatives))

    def take(self) -> tuple[TokenLogprob, ...]:
        taken, self.pending = tuple(self.pending), []
        return taken

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])


@dataclass(slots=True, eq=False)
class Sequence:
    job: GenerationJob
    prompt: list[int]
    cached: int  # prompt tokens whose KV came from the prompt cache
    detokenizer: Any
    stops: StopMatcher
    processors: GuardedProcessors | None
    logprobs: LogprobRecorder | None
    uid: int | None = None  # its place in the model's BatchGenerator
    stream: Any = None  # or its own SingleStream, for requests batching cannot serve
    prefilled: int = 0  # prompt tokens processed so far (batched path)
    tokens: list[int] = field(default_factory=list)  # generated, without a final EOS
    eos: int | None = None  # the EOS that ended it, if one did
    first_token_at: float | None = None

    @property
    def fault(self) -> BaseException | None:
        """What one of its logits processors raised during the last step."""
        return self.processors.fault if self.processors is not None else None

    def take(self, token: int, logprobs: Any, finish: str | None, eos_ids: Any) -> tuple[TextEvent | None, str | None]:
        """One sampled token: the text now safe to emit (if any) and, once done, why it ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if finish == "stop" and token in eos_ids:
            self.eos = token
            self.detokenizer.finalize()
        else:
            self.tokens.append(token)
            if self.logprobs is not None:
                self.logprobs.record(token, logprobs)
            self.detokenizer.add_token(token)
            if finish is not None:
                self.detokenizer.finalize()
        text, stopped = self.stops.feed(self.detokenizer.last_segment)
        if stopped:
            finish = "stop"
        elif finish is not None:
            text += self.stops.flush()
        entries = self.logprobs.take() if self.logprobs is not None and (text or finish) else ()
        return (TextEvent(text, entries) if text or entries else None), finish

    def done(self, reason: str) -> DoneEvent:
        now = time.perf_counter()
        first = self.first_token_at or now
        return DoneEvent(
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached,
            completion_tokens=len(self.tokens),
            output_tokens=tuple(self.tokens),
            prompt_seconds=first - self.job.submitted_at,
            decode_seconds=now - first,
        )
