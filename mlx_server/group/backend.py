"""Distributed models to the manager and to the handlers.

`GroupBackend` is the manager's Backend for models with a `distributed` key: load
launches the group and waits for every shard, unload stops every rank. It is also
what `completion()` submits such a model's generations to, with the Engine's
`generate(request) -> GenerationJob` shape: the prompt's token ids go to rank 0,
token ids come back and are detokenized and matched against stop strings here, as
the engine does for local models. `DispatchBackend` picks it or the engine's
backend per model.

A rank that dies, or hangs (its heartbeat stops: process.py), fails the group's
running requests with the reason, stops the rest of the group, and tells the manager
(`on_failure`), which marks the model failed; the next request after the back-off
launches a new group.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..config import ModelConfig
from ..engine import Engine
from ..engine.stops import StopMatcher
from ..errors import BadRequest, GenerationFailed
from ..jobs import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationJob,
    GenerationRequest,
    TextEvent,
)
from ..loader import load_tokenizer
from ..manager import Backend, Loaded, Prepared
from ..sources import context_length, describe, locate
from .checks import check_rank0_here, check_shardable
from .process import GroupProcess, GroupStatus
from .protocol import GenerateCommand, Sampling, decode, encode

log = logging.getLogger("mlx_server.group")

CANCEL_POLL = 0.25  # how often a stream checks whether its request was cancelled
FAILURE_REASON_WAIT = 3.0  # a stream cut short waits this long for the watcher's reason


class GroupBackend:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._groups: dict[str, GroupProcess] = {}
        self._dying: weakref.WeakSet[GroupProcess] = weakref.WeakSet()  # failed, still being stopped
        self._tokenizers: dict[str, Any] = {}
        # (name, reason): the manager's `fail`, set once the manager exists
        self.on_failure: Callable[[str, str], None] = lambda name, reason: None

    # -- the manager's Backend ----------------------------------------------------

    async def prepare(self, model: ModelConfig) -> Prepared:
        dist = model.distributed
        assert dist is not None
        # Admission needs the device's limits, and the engine thread's imports of mlx_lm and
        # transformers must be done before the checks below import them from a worker thread.
        await self._engine.started()
        local = await asyncio.to_thread(locate, model)
        await asyncio.to_thread(check_shardable, dist, local.path, local.config)
        await asyncio.to_thread(check_rank0_here, dist)
        # Charged on this host: its ranks' share of the weights (all of them for `ranks: N`).
        here = dist.ranks if not (dist.hosts or dist.hostfile) else 1
        return Prepared(local.path, local.weights_bytes * here // dist.ranks, local.config)

    async def load(self, model: ModelConfig, prepared: Prepared) -> Loaded:
        tokenizer = await load_tokenizer(prepared)
        name = model.name
        group = GroupProcess(name, model.distributed, prepared.path, lambda reason: self._died(name, group, reason))
        self._groups[name] = group
        try:
            info = await group.start()
        except BaseException:
            self._groups.pop(name, None)
            raise
        self._tokenizers[name] = tokenizer
        here = socket.gethostname()
        local_bytes = sum(r.shard_bytes for r in info.ranks if r.host == here)
        log.info("model '%s': %d ranks up (%s)", name, len(info.ranks), ", ".join(f"{r.rank}:{r.host}/{r.pid}" for r in info.ranks))
        return Loaded(
            tokenizer=tokenizer,
            size=local_bytes,
            context_length=context_length(model, prepared.info),
            details=describe(prepared.info, 0),
        )

    async def unload(self, name: str) -> int:
        group = self._groups.pop(name, None)
        self._tokenizers.pop(name, None)
        if group is None:
            return 0
        freed = sum(r.shard_bytes for r in group.status().ranks if r.pid in group.local_pids())
        await group.stop()
        return freed

    async def close(self) -> None:
        """At shutdown, after the manager's unloads: stop whatever group is left."""
        groups = [*self._groups.values(), *self._dying]
        self._groups.clear()
        await asyncio.gather(*(g.stop() for g in groups))

    def _died(self, name: str, group: GroupProcess, reason: str) -> None:
        self._dying.add(group)
        if self._groups.get(name) is group:
            del self._groups[name]
            self._tokenizers.pop(name, None)
            self.on_failure(name, f"distributed group failed: {reason}")

    # -- what status and metrics show ------------------------------------------------

    def status(self, name: str) -> GroupStatus | None:
        group = self._groups.get(name)
        return group.status() if group is not None else None

    # -- generation: the Engine's shape -------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationJob:
        job = GenerationJob(request, asyncio.get_running_loop())
        group = self._groups.get(request.model)
        if request.logits_processor is not None or request.logprobs is not None:
            job.queue.put_nowait(ErrorEvent(BadRequest(
                f"model '{request.model}' is distributed over several ranks: structured output and logprobs "
                f"are not available for it"
            )))
        elif group is None or group.state != "up":
            job.queue.put_nowait(ErrorEvent(GenerationFailed(f"the distributed group of '{request.model}' is not running")))
        else:
            stream = _Stream(job, group, self._tokenizers[request.model])
            job.loop.create_task(stream.run())
        return job


class _Stream:
    """One request to rank 0: token ids in, events out; the connection is the request."""

    def __init__(self, job: GenerationJob, group: GroupProcess, tokenizer: Any):
        self.job = job
        self.group = group
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopMatcher(job.request.options.stop)
        self.tokens: list[int] = []
        self.first_token_at: float | None = None

    async def run(self) -> None:
        request = self.job.request
        seed = request.options.seed if request.options.seed is not None else random.getrandbits(63)
        command = GenerateCommand(tuple(request.prompt), request.max_tokens, Sampling.of(request.options, seed % (1 << 63)))
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.group.port, limit=1 << 20)
            writer.write(encode(command.to_json()))
            await writer.drain()
            await self._read(reader)
        except (OSError, ValueError) as e:
            await self._failed(f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug here must still end the request
            log.exception("stream from the group of '%s' failed", request.model)
            self._emit(ErrorEvent(GenerationFailed(f"generation failed: {type(e).__name__}: {e}")))
        finally:
            if writer is not None:
                writer.close()  # also how rank 0 learns of a cancel or a stop string

    async def _read(self, reader: asyncio.StreamReader) -> None:
        pending = None
        while True:
            pending = pending or asyncio.ensure_future(reader.readline())
            done, _ = await asyncio.wait({pending}, timeout=CANCEL_POLL)
            if self.job.cancelled.is_set():
                pending.cancel()
                self._finish("cancelled")
                return
            if not done:
                continue
            line, pending = pending.result(), None
            if not line:
                await self._failed("rank 0 closed the stream before the end")
                return
            message = decode(line)
            if "token" in message:
                if self._on_token(int(message["token"])):
                    return
            elif "done" in message:
                self.detokenizer.finalize()
                self._finish(str(message["done"]), self.stops.feed(self.detokenizer.last_segment)[0] + self.stops.flush())
                return
            else:
                await self._failed(str(message.get("error", message)))
                return

    def _on_token(self, token: int) -> bool:
        """As the engine's `_on_token`: True when a stop string ended the request."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.tokenizer.eos_token_ids:
            return False  # rank 0 sends "done" next
        self.tokens.append(token)
        self.detokenizer.add_token(token)
        text, stopped = self.stops.feed(self.detokenizer.last_segment)
        if stopped:
            self._finish("stop", text)
            return True
        if text:
            self._emit(TextEvent(text))
        return False

    def _finish(self, reason: str, text: str = "") -> None:
        if text:
            self._emit(TextEvent(text))
        now = time.perf_counter()
        first = self.first_token_at or now
        self._emit(DoneEvent(
            finish_reason=reason,
            prompt_tokens=len(self.job.request.prompt),
            cached_tokens=0,
            completion_tokens=len(self.tokens),
            output_tokens=tuple(self.tokens),
            prompt_seconds=first - self.job.submitted_at,
            decode_seconds=now - first,
        ))

    async def _failed(self, detail: str) -> None:
        """The stream broke: say why, with the watcher's reason when a rank died."""
        try:
            reason = await asyncio.wait_for(asyncio.shield(self.group.failure), FAILURE_REASON_WAIT)
        except TimeoutError:
            reason = detail
        self._emit(ErrorEvent(GenerationFailed(f"the distributed group of '{self.job.request.model}' failed mid-request: {reason}")))

    def _emit(self, event: Event) -> None:
        self.job.queue.put_nowait(event)


class DispatchBackend:
    """The manager's one Backend: distributed models to `groups`, the others to `local`."""

    def __init__(self, local: Backend, groups: GroupBackend, distributed: set[str]):
        self._local = local
        self._groups = groups
        self._distributed = distributed

    def _for(self, model: ModelConfig) -> Backend:
        return self._groups if model.distributed is not None else self._local

    async def prepare(self, model: ModelConfig) -> Prepared:
        return await self._for(model).prepare(model)

    async def load(self, model: ModelConfig, prepared: Prepared) -> Loaded:
        return await self._for(model).load(model, prepared)

    async def unload(self, name: str) -> int:
        return await (self._groups if name in self._distributed else self._local).unload(name)
