"""The one completion pipeline every API family shares: lease -> tokenize -> reserve
-> engine (or distributed group) job -> events.

Handlers parse their own shapes into a `CompletionSpec`, enter `completion()`, and
format the events; they never touch the engine's or the manager's internals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import BadRequest
from ..jobs import DoneEvent, ErrorEvent, GenerationJob, GenerationRequest, TextEvent
from ..manager import Lease
from ..metrics import Metrics
from ..options import GenerationOptions
from ..prompts import chat_prompt
from ..tools import OutputParser, starts_in_thinking
from .keys import ENGINE, GROUPS, MANAGER, METRICS, MODEL_KEY, TOKENS_KEY
from .priority import request_priority


@dataclass(frozen=True, slots=True)
class CompletionSpec:
    """An API-neutral completion: what to run, on which model, with which options."""

    model: str
    build_prompt: Callable[[Any], list[int]]  # tokenizer -> token ids; runs in a worker thread
    options: GenerationOptions
    keep_alive: float | None = None
    # (tokenizer, token budget) -> a factory the engine calls to build a logits processor
    # (structured output); runs in a worker thread, as building it can take a second
    constrain: Callable[[Any, int], Callable[[], Any]] | None = None
    logprobs: int | None = None  # GenerationRequest.logprobs


def chat_spec(
    model: str,
    messages: list[dict[str, Any]],
    options: GenerationOptions,
    keep_alive: float | None,
    *,
    tools: list[dict[str, Any]],
    think: bool | str | None,
    constrain: Callable[[Any, int], Callable[[], Any]] | None,
    logprobs: int | None = None,
) -> CompletionSpec:
    """A completion whose prompt is the model's chat template applied to `messages`."""

    def build(tokenizer: Any) -> list[int]:
        return chat_prompt(tokenizer, messages, tools=tools, think=think)

    return CompletionSpec(model, build, options, keep_alive, constrain=constrain, logprobs=logprobs)


@dataclass(slots=True)
class Completion:
    lease: Lease
    job: GenerationJob | None
    prompt: list[int]
    metrics: Metrics
    started: float
    done: DoneEvent | None = None

    async def events(self) -> AsyncIterator[TextEvent | DoneEvent]:
        """Text as it is decoded, then one DoneEvent; an engine error is raised."""
        if self.job is None:  # nothing to generate (num_predict 0)
            self.done = DoneEvent("length", len(self.prompt), 0, 0, (), 0.0, 0.0)
            yield self.done
            return
        async for event in self.job.events():
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, DoneEvent):
                self.done = event
                self.metrics.observe_generation(self.lease.name, event.prompt_tokens, event.completion_tokens, event.prompt_seconds, event.cached_tokens)
            yield event

    def output_parser(self, tools: list[dict[str, Any]] | None) -> OutputParser:
        """Splits this completion's text into content, thinking and tool calls."""
        tokenizer = self.lease.tokenizer
        return OutputParser(tokenizer, tools=tools, thinking=starts_in_thinking(tokenizer, self.prompt))



class PromptTooLong(BadRequest):
    """The prompt fills the context; the numbers let an API word it its own way."""

    def __init__(self, prompt_tokens: int, context: int):
        super().__init__(f"prompt is {prompt_tokens} tokens but the context window is {context} tokens", param="num_ctx")
        self.prompt_tokens = prompt_tokens
        self.context = context


def token_budget(prompt_tokens: int, context: int, options: GenerationOptions) -> int:
    """How many tokens may be generated: num_predict, capped by what the context has left."""
    room = context - prompt_tokens
    if room <= 0:
        raise PromptTooLong(prompt_tokens, context)
    return room if options.num_predict < 0 else min(options.num_predict, room)


@asynccontextmanager
async def completion(request: web.Request, spec: CompletionSpec) -> AsyncIterator[Completion]:
    """Hold the model's lease for as long as the handler is inside this block."""
    app = request.app
    request[MODEL_KEY] = spec.model
    started = time.perf_counter()
    async with app[MANAGER].lease(spec.model, keep_alive=spec.keep_alive, priority=request_priority(request)) as lease:
        request[MODEL_KEY] = lease.name
        prompt = await asyncio.to_thread(spec.build_prompt, lease.tokenizer)
        if not prompt:
            raise BadRequest("the prompt is empty after templating")
        context = min(lease.context_length, spec.options.num_ctx or lease.context_length)
        max_tokens = token_budget(len(prompt), context, spec.options)
        # Reserve the sequence's KV cache before it runs; without num_predict it may be cut to what fits.
        max_tokens = await app[MANAGER].reserve(lease, len(prompt), max_tokens, flexible=spec.options.num_predict < 0)
        job = None
        if max_tokens > 0:
            processor = await asyncio.to_thread(spec.constrain, lease.tokenizer, max_tokens) if spec.constrain else None
            generator = app[GROUPS] if lease.config.distributed is not None else app[ENGINE]
            job = generator.generate(
                GenerationRequest(
                    model=lease.name,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    options=spec.options,
                    logits_processor=processor,
                    logprobs=spec.logprobs,
                )
            )
        result = Completion(lease, job, prompt, app[METRICS], started)
        try:
            yield result
        finally:
            if job is not None:
                job.cancel()
            if result.done is not None:
                request[TOKENS_KEY] = result.done.completion_tokens


def durations_ns(c: Completion) -> dict[str, int]:
    """Ollama's timing fields, in integer nanoseconds."""
    done = c.done
    assert done is not None
    return {
        "total_duration": int((time.perf_counter() - c.started) * 1e9),
        "load_duration": int(c.lease.load_seconds * 1e9),
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": int(done.prompt_seconds * 1e9),
        "eval_count": done.completion_tokens,
        "eval_duration": int(done.decode_seconds * 1e9),
    }
