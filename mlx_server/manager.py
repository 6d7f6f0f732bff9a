"""Residency: which models are in memory, who is using them, and what goes when.

The manager is the single writer of residency. It runs on the event loop and never
awaits in the middle of a decision, so it needs no locks: every check-then-change
happens between two awaits. Models move through

    unloaded -> loading -> ready -> unloading -> unloaded      (+ failed, with its reason)

and every move goes through `_transition`. A lease (one per running request) is
the only thing that protects a model; a model that is loading, leased, awaited by
a request that was admitted to it or by one queued for its slot is never unloaded,
with one exception: a model whose every request is itself still waiting for memory
(none has started) may be unloaded for the request at the head of the memory queue,
and its requests load it again when their turn comes. Without it two models, each
waiting for the other's memory, would both time out.

Memory is counted in a ledger (`ledger.py`): weights, prompt caches, the KV that
each running request reserved before it ran (a batch pads every row to its longest,
so a model's reservation is its longest context times its rows), and the weights of
the loads under way, and what embedding requests reserved for their largest batch.
Loads and reservations that do not fit wait in one memory queue, by priority with
aging: its head unloads idle models (LRU), then asks the engine to give back prompt
caches, then waits for busy models to finish, up to `queue_timeout`; a request that
could never fit is refused at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from .admission import DEFAULT_PRIORITY, Granted, Priority, SlotQueue, effective_priority
from .config import FOREVER, Config, ModelConfig
from .errors import (
    BadRequest,
    InsufficientMemory,
    LoadFailed,
    MlxServerError,
    ModelNotFound,
    QueueFull,
    ShuttingDown,
)
from .ledger import ForwardLayout, KvLayout, Ledger, MlxMemory, ModelMemory, embedding_peak, forward_layout, kv_layout

log = logging.getLogger("mlx_server.manager")

GiB = 1 << 30
RETRY_FAILED_AFTER = 30.0  # seconds before a failed model may be tried again
SWEEP_INTERVAL = 0.5


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


_ALLOWED = {
    ModelState.UNLOADED: {ModelState.LOADING},
    ModelState.LOADING: {ModelState.READY, ModelState.FAILED, ModelState.UNLOADED},
    ModelState.READY: {ModelState.UNLOADING, ModelState.FAILED},  # failed: its backend lost it
    ModelState.UNLOADING: {ModelState.UNLOADED},
    ModelState.FAILED: {ModelState.LOADING},
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A model's files are on disk; `size` is what loading it will take."""

    path: Path
    size: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Loaded:
    tokenizer: Any
    size: int
    context_length: int
    details: dict[str, Any]
    kv_itemsize: int | None = None  # bytes per KV value, measured on the loaded model; None: config.json decides


class Backend(Protocol):
    """What the manager asks of the engine side; tests pass a fake."""

    async def prepare(self, model: ModelConfig) -> Prepared: ...

    async def load(self, model: ModelConfig, prepared: Prepared) -> Loaded: ...

    async def unload(self, name: str) -> int: ...


class Observer(Protocol):
    def model_loaded(self, name: str, result: str, seconds: float) -> None: ...

    def model_evicted(self, name: str, reason: str) -> None: ...

    def admission_waited(self, reason: str) -> None: ...

    def slot_granted(self, name: str, granted: Granted) -> None: ...


class _NoObserver:
    def model_loaded(self, name: str, result: str, seconds: float) -> None:
        pass

    def model_evicted(self, name: str, reason: str) -> None:
        pass

    def admission_waited(self, reason: str) -> None:
        pass

    def slot_granted(self, name: str, granted: Granted) -> None:
        pass


@dataclass(slots=True)
class _Record:
    config: ModelConfig
    slots: SlotQueue  # running requests and those waiting for a slot, by priority
    keep_alive: float
    state: ModelState = ModelState.UNLOADED
    error: str | None = None
    failed_at: float = -math.inf
    size: int = 0  # bytes on disk before loading, weights once loaded
    tokenizer: Any = None
    context_length: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    leases: int = 0  # running requests
    admitted_by: Counter[Priority] = field(default_factory=Counter)  # holding a slot, waiting for the model to be ready
    last_used: float = 0.0
    expires_at: float | None = None  # clock time; None while busy or kept forever
    settled: asyncio.Future | None = None  # resolves when a load or unload ends
    load_task: asyncio.Task | None = None
    load_admitted: bool = False  # a LOADING model whose turn has come: its weights count
    unload_requested: bool = False  # a manual unload waits for the last request to end
    layout: KvLayout | None = None  # what a token of KV costs; None: config.json does not say
    kv_contexts: list[int] = field(default_factory=list)  # each running request's reserved context (prompt + max tokens)
    waiting_for_memory: int = 0  # its leased requests still waiting in the memory queue (KV or activations)
    forward: ForwardLayout | None = None  # what an embedding slice holds; None: config.json does not say
    activations: int = 0  # what its running embedding requests reserved

    def kv_reserved(self, contexts: list[int] | None = None) -> int:
        """What a batch of `contexts` (default: the running ones) allocates at most: a
        batch cache pads every row to the longest, so rows x the longest context."""
        contexts = self.kv_contexts if contexts is None else contexts
        if self.layout is None or not contexts:
            return 0
        return len(contexts) * self.layout.bytes_for(max(contexts))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def admitted(self) -> int:
        return sum(self.admitted_by.values())

    @property
    def resident(self) -> bool:
        """Its memory is (being) taken: a load counts once it is admitted, not while it waits its turn."""
        if self.state is ModelState.LOADING:
            return self.load_admitted
        return self.state in (ModelState.READY, ModelState.UNLOADING)

    @property
    def protected(self) -> bool:
        # A slot is taken from admission to a request's last byte (leases and admitted
        # requests hold one) and stays taken at the hand-off to a queued request;
        # requests waiting for a slot protect the model too.
        return self.state is not ModelState.READY or self.slots.running > 0 or len(self.slots) > 0


@dataclass(slots=True)
class _Ticket:
    """One request's claim: its place in line, when it must give up, what it reserved."""

    deadline: float
    priority: Priority
    since: float
    order: int  # arrival order: breaks ties between equal times
    context: int = 0  # prompt + max tokens whose KV it reserved; 0: none
    activations: int = 0  # bytes it reserved for its largest embedding slice


@dataclass(slots=True)
class _MemoryWaiter:
    """A load, or a request's reservation (KV, embedding activations), waiting for memory."""

    record: _Record  # the model it is for
    ticket: _Ticket
    holds: bool  # a request holding `record`'s lease: evicting `record` sends it back to load it


class _ModelGone(Exception):
    """The model of a request waiting for memory was unloaded for the queue's head."""


@dataclass(frozen=True, slots=True)
class Lease:
    """What a request may use of its model while it holds the lease."""

    name: str
    config: ModelConfig
    tokenizer: Any
    context_length: int
    load_seconds: float
    ticket: _Ticket = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """One model's admission queue: requests waiting for a slot, by the priority they asked for."""

    name: str
    running: int
    max_concurrency: int
    waiting: dict[Priority, int]  # for a slot
    waiting_for_load: dict[Priority, int]  # holding a slot, waiting for the model to load
    oldest_wait: float  # seconds the longest wait for a slot has lasted so far; 0 when none

    def total(self, priority: Priority) -> int:
        return self.waiting[priority] + self.waiting_for_load[priority]


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    name: str
    state: ModelState
    error: str | None
    size: int
    active_requests: int
    queued: int
    pinned: bool
    keep_alive: float
    expires_at: float | None  # wall-clock seconds; None: never (pinned, forever, busy)
    last_used: float | None  # wall-clock seconds
    context_length: int
    details: dict[str, Any]
    memory: ModelMemory  # its line in the ledger


async def _nothing_freed(nbytes: int) -> int:
    return 0


def pick_victim(records: list[_Record], exclude: _Record | None = None) -> _Record | None:
    """The least recently used model that nothing protects and nobody pinned."""
    idle = [r for r in records if r is not exclude and not r.protected and not r.config.pinned]
    return min(idle, key=lambda r: r.last_used, default=None)


class Manager:
    def __init__(
        self,
        config: Config,
        backend: Backend,
        *,
        total_memory: int,
        device_limit: Callable[[], int | None] = lambda: None,
        observer: Observer | None = None,
        cache_bytes: Callable[[str], int] = lambda name: 0,
        kv_bytes: Callable[[str], int] = lambda name: 0,
        mlx_memory: Callable[[], MlxMemory] = MlxMemory,
        shrink_caches: Callable[[int], Awaitable[int]] = _nothing_freed,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.config = config
        self._backend = backend
        self._observer = observer or _NoObserver()
        self._cache_bytes = cache_bytes  # each model's prompt cache, as the engine measured it
        self._kv_bytes = kv_bytes  # each model's live KV caches, as the engine measured them
        self._mlx_memory = mlx_memory
        self._clock = clock
        self._wall = wall
        self._records = {
            m.name: _Record(m, SlotQueue(m.max_concurrency, aging=config.server.priority_aging, clock=clock), config.keep_alive_of(m))
            for m in config.models
        }
        memory = config.memory
        self.budget = int(memory.budget_gb * GiB) if memory.budget_gb is not None else max(0, total_memory - int(memory.reserve_gb * GiB))
        self._device_limit = device_limit  # Metal's recommended working set; None elsewhere
        self._shrink_caches = shrink_caches
        self._changed = asyncio.Event()
        self._load_turn = asyncio.Lock()  # one load admitted at a time (its reading may overlap the next)
        self._loading: _Record | None = None  # whose turn it is
        self._memory_queue: list[_MemoryWaiter] = []
        self._arrivals = itertools.count()
        self._closing = False
        self._tasks: set[asyncio.Task] = set()

    # -- queries ----------------------------------------------------------------

    def resolve(self, name: str) -> ModelConfig:
        model = self.config.find(name) if isinstance(name, str) else None
        if model is None:
            raise ModelNotFound(name)
        return model

    def _line(self, record: _Record) -> ModelMemory:
        """`record`'s line in the ledger: what goes when it is unloaded, or what its load takes."""
        if record.state is ModelState.LOADING:
            return ModelMemory(record.name, loading=record.size if record.load_admitted else 0)
        if record.state is ModelState.READY:
            return ModelMemory(
                record.name,
                weights=record.size,
                prompt_cache=self._cache_bytes(record.name),
                kv_reserved=record.kv_reserved(),
                kv_measured=self._kv_bytes(record.name),
                activations=record.activations,
            )
        if record.state is ModelState.UNLOADING:
            return ModelMemory(record.name, weights=record.size)
        return ModelMemory(record.name)

    def _memory_of(self, record: _Record) -> int:
        return self._line(record).total

    def ledger(self) -> Ledger:
        return Ledger(tuple(self._line(r) for r in self._records.values()), self._ceiling(), self._mlx_memory())

    def queue_depth(self) -> int:
        return sum(len(r.slots) + r.admitted for r in self._records.values())

    def queue_snapshot(self) -> list[QueueSnapshot]:
        return [
            QueueSnapshot(
                r.name, r.slots.running, r.config.max_concurrency, r.slots.waiting(),
                {p: r.admitted_by[p] for p in Priority}, r.slots.oldest_wait(),
            )
            for r in self._records.values()
        ]

    def snapshot(self) -> list[ModelSnapshot]:
        now, wall = self._clock(), self._wall()
        return [
            ModelSnapshot(
                name=r.name,
                state=r.state,
                error=r.error,
                size=self._memory_of(r),
                active_requests=r.leases,
                queued=len(r.slots) + r.admitted,
                pinned=r.config.pinned,
                keep_alive=r.keep_alive,
                expires_at=None if r.expires_at is None else wall + (r.expires_at - now),
                last_used=wall + (r.last_used - now) if r.last_used else None,
                context_length=r.context_length,
                details=r.details,
                memory=self._line(r),
            )
            for r in self._records.values()
        ]

    # -- leases -----------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, name: str, *, keep_alive: float | None = None, priority: Priority | None = None) -> AsyncIterator[Lease]:
        """Hold `name` resident for one request: from admission to its last byte.

        `priority` orders the wait for a slot; None: the model's configured priority.
        """
        record = self._records[self.resolve(name).name]
        if self._closing:
            raise ShuttingDown()
        now = self._clock()
        deadline = now + self.config.server.queue_timeout
        priority = next((p for p in (priority, record.config.priority) if p is not None), DEFAULT_PRIORITY)
        ticket = _Ticket(deadline, priority, now, next(self._arrivals))
        await self._take_slot(record, deadline, priority)
        record.admitted_by[priority] += 1
        started = self._clock()
        try:
            await self._ready(record, ticket)
        except BaseException:
            record.admitted_by[priority] -= 1
            record.slots.release()
            self._went_idle(record)
            raise
        record.admitted_by[priority] -= 1
        record.leases += 1
        record.expires_at = None
        # Ollama semantics: the latest request decides; without one, the model's own setting.
        record.keep_alive = self.config.keep_alive_of(record.config) if keep_alive is None else keep_alive
        try:
            yield Lease(record.name, record.config, record.tokenizer, record.context_length, self._clock() - started, ticket)
        finally:
            if ticket.context:
                record.kv_contexts.remove(ticket.context)
            record.activations -= ticket.activations
            record.leases -= 1
            record.last_used = self._clock()
            record.slots.release()
            self._went_idle(record)

    async def _take_slot(self, record: _Record, deadline: float, priority: Priority) -> None:
        """A running slot of `record`'s, in priority order when they are all taken."""
        limit = self.config.server.max_queue
        if record.slots.full and self.queue_depth() >= limit:
            raise QueueFull(
                f"server busy: '{record.name}' is running {record.leases} requests and "
                f"{self.queue_depth()} are queued (max_queue {limit})",
                retry_after=2.0,
            )
        try:
            granted = await record.slots.acquire(priority, deadline - self._clock())
        except TimeoutError:
            raise QueueFull(
                f"model '{record.name}' is busy: {record.leases} requests running "
                f"(max_concurrency {record.config.max_concurrency}); timed out waiting",
                retry_after=5.0,
            ) from None
        finally:
            self._notify()
        self._observer.slot_granted(record.name, granted)

    async def _ready(self, record: _Record, ticket: _Ticket) -> None:
        """Return once `record` is ready, loading it if needed (one load at a time)."""
        while record.state is not ModelState.READY:
            if self._closing:
                raise ShuttingDown()
            if record.state is ModelState.FAILED and self._clock() - record.failed_at < RETRY_FAILED_AFTER:
                raise LoadFailed(record.name, record.error or "unknown error", retry_after=max(1.0, RETRY_FAILED_AFTER - (self._clock() - record.failed_at)))
            if record.state in (ModelState.UNLOADED, ModelState.FAILED):
                self._start_load(record, ticket)
            assert record.settled is not None
            # Not bounded here: admission gives up at the deadline and settles every waiter
            # with its 503; a load that is under way ends by itself.
            await asyncio.shield(record.settled)
            if record.state is ModelState.FAILED:
                raise LoadFailed(record.name, record.error or "unknown error", retry_after=RETRY_FAILED_AFTER)

    async def reserve(self, lease: Lease, prompt_tokens: int, max_tokens: int, *, flexible: bool) -> int:
        """Reserve the KV cache a request will fill before it runs; returns the tokens it may generate.

        The reservation covers the prompt plus `max_tokens` in a row as long as the
        model's longest running context (a batch pads rows to the longest), and ends with
        the lease. The request waits its turn in the memory queue (see `_wait_for_room`)
        until its `queue_timeout`, then gets a 503. A request that could never
        fit, even with every other unpinned model gone, is a 400 at once, unless it is
        `flexible` (its `max_tokens` is only what the context has left, no num_predict
        was given): then it is lowered to what can fit, and the sequence stops there
        with done_reason "length". A sequence never outgrows its reservation.
        """
        record = self._records[lease.name]
        layout = record.layout
        if layout is None or max_tokens <= 0:
            return max_tokens
        own = layout.bytes_for(prompt_tokens + max_tokens)
        room = self._ceiling() - self._fixed_bytes(record)
        if own > room:
            fits = layout.tokens_within(room) - prompt_tokens
            if not flexible or fits <= 0:
                raise BadRequest(
                    f"this request can never fit in memory: its KV cache ({prompt_tokens} prompt + {max_tokens} "
                    f"generated tokens) needs {own / GiB:.3f} GiB, and {room / GiB:.3f} GiB of the "
                    f"{self._ceiling() / GiB:.3f} GiB memory budget is left beside the weights of '{record.name}' and "
                    f"of the pinned models; send a shorter prompt or a smaller num_predict / max_tokens",
                    param="num_predict",
                )
            log.info(
                "'%s': a request without num_predict may generate %d tokens, not %d: that is what %.3f GiB of KV "
                "cache left in the budget holds (it stops with done_reason length)",
                record.name, fits, max_tokens, room / GiB,
            )
            max_tokens = fits
        context = prompt_tokens + max_tokens

        def growth() -> int:
            return record.kv_reserved([*record.kv_contexts, context]) - record.kv_reserved()

        await self._reserve_room(growth, record, lease.ticket, f"the KV cache of a {context}-token request to '{record.name}'")
        record.kv_contexts.append(context)
        lease.ticket.context = context
        return max_tokens

    async def reserve_activations(self, lease: Lease, lengths: list[int]) -> None:
        """Reserve what the largest slice of an embedding request holds before the engine
        runs it (a long input's attention scores grow with its length squared); it ends
        with the lease. Waits like a KV reservation; a 400 if it could never fit."""
        record = self._records[lease.name]
        if record.forward is None or not lengths:
            return
        need = embedding_peak(record.forward, lengths)
        room = self._ceiling() - self._fixed_bytes(record)
        if need > room:
            raise BadRequest(
                f"these inputs can never be embedded in memory: their largest batch ({max(lengths)} tokens at most) "
                f"needs {need / GiB:.3f} GiB of activations and {room / GiB:.3f} GiB of the {self._ceiling() / GiB:.3f} GiB "
                f"memory budget is left beside the weights of '{record.name}'; send shorter inputs",
                param="input",
            )
        await self._reserve_room(lambda: need, record, lease.ticket, f"embedding {len(lengths)} inputs with '{record.name}'")
        record.activations += need
        lease.ticket.activations += need

    async def _reserve_room(self, need: Callable[[], int], record: _Record, ticket: _Ticket, what: str) -> None:
        """`_make_room` for a request holding `record`'s lease: if the model is unloaded for
        the head of the memory queue meanwhile, load it again, then wait on."""
        while True:
            try:
                return await self._make_room(need, record, ticket, what)
            except _ModelGone:
                await self._ready(record, ticket)

    def _fixed_bytes(self, record: _Record) -> int:
        """What nothing can free while `record` serves: its own weights and pinned models' weights.
        (Prompt caches are not counted here: they shrink, so a request they hold back waits.)"""
        pinned = sum(r.size for r in self._records.values() if r.config.pinned and r.resident and r is not record)
        return record.size + pinned

    def _went_idle(self, record: _Record) -> None:
        """A lease or a wait ended: arm keep_alive once nothing uses the model."""
        self._notify()
        if record.leases or record.admitted or record.state is not ModelState.READY:
            return
        if record.unload_requested:
            if not record.protected:
                self._spawn(self._evict(record, "manual"))
            return
        if record.config.pinned or record.keep_alive == FOREVER:
            record.expires_at = None
            return
        record.expires_at = self._clock() + record.keep_alive
        if record.keep_alive <= 0:
            self._spawn(self._evict(record, "keep_alive"))

    # -- loading ----------------------------------------------------------------

    def _start_load(self, record: _Record, ticket: _Ticket) -> None:
        self._transition(record, ModelState.LOADING)
        record.settled = asyncio.get_running_loop().create_future()
        record.load_task = self._spawn(self._load(record, ticket))

    async def _load(self, record: _Record, ticket: _Ticket) -> None:
        """Prepare, take the load turn, make room, then read the weights. The turn covers
        admission only: once admitted, the weights count in the ledger, so the next load
        may be admitted beside them while these are read (a group's start takes minutes)."""
        started = self._clock()
        try:
            prepared = await self._backend.prepare(record.config)
            record.size = prepared.size
            record.layout = kv_layout(prepared.info)
            if record.layout is None:
                log.warning("'%s': config.json gives no KV layout (layers, KV heads, head dim): its KV is not reserved", record.name)
            await self._take_load_turn(record, ticket.deadline)
            try:
                await self._admit(record, ticket)
                record.load_admitted = True
            finally:
                self._loading = None
                self._load_turn.release()
            loaded = await self._backend.load(record.config, prepared)
        except asyncio.CancelledError:
            self._fail(record, "loading was cancelled (shutting down)")
            raise
        except (InsufficientMemory, QueueFull) as e:  # others are busy: not the model's fault, try again later
            self._transition(record, ModelState.UNLOADED)
            self._settle(record, e)
            self._notify()
            self._observer.model_loaded(record.name, "no_memory", self._clock() - started)
            log.warning("could not load '%s': %s", record.name, e.message)
            return
        except Exception as e:
            reason = e.message if isinstance(e, MlxServerError) else f"{type(e).__name__}: {e}"
            self._fail(record, reason)
            self._observer.model_loaded(record.name, "error", self._clock() - started)
            log.error("model '%s' failed to load: %s", record.name, reason)
            return
        record.tokenizer = loaded.tokenizer
        record.size = loaded.size
        if record.layout is not None and loaded.kv_itemsize:  # the weights, not the metadata, say what a token costs
            record.layout = replace(record.layout, dtype_bytes=loaded.kv_itemsize)
        record.forward = forward_layout(prepared.info, loaded.kv_itemsize or (record.layout.dtype_bytes if record.layout else 2))
        record.context_length = loaded.context_length
        record.details = loaded.details
        record.last_used = self._clock()
        self._transition(record, ModelState.READY)
        seconds = self._clock() - started
        self._observer.model_loaded(record.name, "success", seconds)
        log.info("loaded '%s' (%.1f MB) in %.2fs", record.name, record.size / 1e6, seconds)
        self._settle(record)
        self._went_idle(record)

    def fail(self, name: str, reason: str) -> None:
        """The backend lost a ready model (a rank of its distributed group died): it is
        `failed` with the reason, and a request after the back-off loads it again."""
        record = self._records.get(name)
        if record is None or record.state is not ModelState.READY:
            return
        record.expires_at = None
        self._fail(record, reason)
        log.error("model '%s' failed while loaded: %s", name, reason)

    def _fail(self, record: _Record, reason: str) -> None:
        record.error = reason
        record.failed_at = self._clock()
        record.tokenizer = None
        self._transition(record, ModelState.FAILED)
        self._settle(record)
        self._notify()

    async def _take_load_turn(self, record: _Record, deadline: float) -> None:
        """Wait for the load under way (if any) to end: loads are admitted one at a time."""
        if self._load_turn.locked():
            self._observer.admission_waited("load")
            ahead = self._loading
            try:
                await asyncio.wait_for(self._load_turn.acquire(), max(0.0, deadline - self._clock()))
            except TimeoutError:
                raise QueueFull(
                    f"timed out waiting to load '{record.name}': '{ahead.name if ahead else 'another model'}' is loading",
                    retry_after=5.0,
                ) from None
        else:
            await self._load_turn.acquire()
        self._loading = record

    def _load_short(self, record: _Record) -> int:
        """Bytes missing under the ceiling for `record`'s weights beside every other resident model."""
        others = sum(self._memory_of(r) for r in self._records.values() if r.resident and r is not record)
        return others + record.size - self._ceiling()

    def _fits(self, record: _Record) -> bool:
        limit = self.config.memory.max_loaded_models
        resident = sum(1 for r in self._records.values() if r.resident and r is not record)
        return self._load_short(record) <= 0 and (limit == 0 or resident < limit)

    def _used(self) -> int:
        """Everything the ledger holds: what the next load or reservation must fit beside."""
        return sum(self._memory_of(r) for r in self._records.values())

    def _ceiling(self) -> int:
        device = self._device_limit()
        return self.budget if device is None else min(self.budget, device)

    async def _admit(self, record: _Record, ticket: _Ticket) -> None:
        """Make room for `record`'s weights: unload idle models (LRU), or wait for busy ones."""
        ceiling = self._ceiling()
        if record.size > ceiling:
            raise MlxServerError(f"it needs {record.size / GiB:.2f} GiB but the memory budget is {ceiling / GiB:.2f} GiB")

        def refusal() -> InsufficientMemory:
            return InsufficientMemory(
                f"not enough memory to load '{record.name}' ({record.size / GiB:.2f} GiB of "
                f"{self.budget / GiB:.2f} GiB budget): held by {self._holders(record)}",
                retry_after=10.0,
            )

        await self._wait_for_room(
            lambda: self._fits(record), lambda: self._load_short(record), _MemoryWaiter(record, ticket, holds=False), refusal
        )

    async def _make_room(self, need: Callable[[], int], record: _Record, ticket: _Ticket, what: str) -> None:
        """Return once `need()` more bytes fit under the ceiling beside everything held now;
        _ModelGone when `record` was unloaded meanwhile for the head of the queue."""

        def short() -> int:
            return self._used() + need() - self._ceiling()

        def refusal() -> InsufficientMemory:
            return InsufficientMemory(
                f"not enough memory for {what} ({need() / GiB:.3f} GiB; {self._used() / GiB:.3f} of "
                f"{self._ceiling() / GiB:.3f} GiB budget in use, held by {self._holders(None)}); "
                f"timed out waiting for running requests to finish",
                retry_after=5.0,
            )

        await self._wait_for_room(lambda: short() <= 0, short, _MemoryWaiter(record, ticket, holds=True), refusal)

    async def _wait_for_room(
        self, fits: Callable[[], bool], short: Callable[[], int], waiter: _MemoryWaiter, refusal: Callable[[], InsufficientMemory]
    ) -> None:
        """Until `fits()` with nobody ahead in the memory queue (`short()`: the bytes
        missing). Only the head makes room: it unloads idle models (LRU, never its own),
        then models whose every request waits behind it, then asks for prompt caches back;
        else it waits for busy models to finish. `refusal()` at the ticket's deadline."""
        if not self._memory_queue and fits():
            return
        record = waiter.record
        self._memory_queue.append(waiter)
        record.waiting_for_memory += waiter.holds
        try:
            waited = False
            while True:
                if waiter.holds and record.state is not ModelState.READY:
                    raise _ModelGone()
                head = waiter is self._memory_head()
                if head and fits():
                    return
                if head and await self._free_for(waiter, short()):
                    continue
                if not waited:
                    self._observer.admission_waited("memory")
                    waited = True
                remaining = waiter.ticket.deadline - self._clock()
                if remaining <= 0:
                    raise refusal()
                self._changed.clear()
                # Woken by any lease, load, unload or change of head; and every sweep interval,
                # because what the engine measures (prompt caches, live KV) changes silently.
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(remaining, SWEEP_INTERVAL))
        finally:
            self._memory_queue.remove(waiter)
            record.waiting_for_memory -= waiter.holds
            self._notify()

    def _memory_head(self) -> _MemoryWaiter:
        """The waiter served next: best priority after aging, then the earliest."""
        now, aging = self._clock(), self.config.server.priority_aging
        return min(
            self._memory_queue,
            key=lambda w: (effective_priority(w.ticket.priority, w.ticket.since, now, aging), w.ticket.since, w.ticket.order),
        )

    async def _free_for(self, waiter: _MemoryWaiter, short: int) -> bool:
        """Free memory for the queue's head; False when nothing could be freed now."""
        records = list(self._records.values())
        victim = pick_victim(records, exclude=waiter.record) or self._stalled(waiter.record)
        if victim is not None:
            await self._unload(victim, "lru")
            return True
        cached = sum(self._cache_bytes(r.name) for r in records if r.state is ModelState.READY)
        if short > 0 and cached > 0:
            freed = await self._shrink_caches(short)
            if freed > 0:
                log.info("gave back %.1f MB of prompt caches for memory", freed / 1e6)
                return True
        return False

    def _stalled(self, exclude: _Record) -> _Record | None:
        """A ready, unpinned model (not `exclude`) whose every request is waiting in the memory
        queue: none has started, so unloading it breaks nothing, and each loads it again later."""
        stalled = [
            r for r in self._records.values()
            if r is not exclude and r.state is ModelState.READY and not r.config.pinned
            and r.leases > 0 and r.leases == r.waiting_for_memory and r.admitted == 0
        ]
        return min(stalled, key=lambda r: r.last_used, default=None)

    def _holders(self, exclude: _Record | None) -> str:
        """Who holds the memory, for a 503 that says why."""
        held = [
            f"'{r.name}' ({self._memory_of(r) / GiB:.3f} GiB, {r.leases} active{', pinned' if r.config.pinned else ''})"
            for r in self._records.values()
            if r.resident and r is not exclude
        ]
        return ", ".join(held) or "nothing"

    # -- unloading --------------------------------------------------------------

    async def _evict(self, record: _Record, reason: str) -> bool:
        """Unload `record` if it is still idle; False when something claimed it meanwhile."""
        if record.protected or record.state is not ModelState.READY:
            return False
        await self._unload(record, reason)
        return True

    async def _unload(self, record: _Record, reason: str) -> None:
        size = record.size
        self._transition(record, ModelState.UNLOADING)
        record.settled = asyncio.get_running_loop().create_future()
        record.expires_at = None
        freed = 0
        try:
            freed = await self._backend.unload(record.name)
        finally:
            record.tokenizer = None
            self._transition(record, ModelState.UNLOADED)
            record.keep_alive = self.config.keep_alive_of(record.config)
            self._settle(record)
            self._notify()
        self._observer.model_evicted(record.name, reason)
        log.info("unloaded '%s' (reason=%s, %.1f MB weights, %.1f MB freed)", record.name, reason, size / 1e6, freed / 1e6)

    async def unload(self, name: str) -> str:
        """Unload on request: now when idle, else as soon as its last request ends (a load
        under way finishes first, so the requests waiting for it are served)."""
        record = self._records[self.resolve(name).name]
        if record.state is ModelState.READY and not record.protected:
            await self._unload(record, "manual")
            return "unloaded"
        if record.state in (ModelState.UNLOADED, ModelState.FAILED):
            return "not loaded"
        record.unload_requested = True
        return "scheduled"

    async def evict_idle(self, reason: str, *, enough: Callable[[], bool]) -> list[str]:
        """Unload idle, unpinned models in LRU order until `enough()` or none is left."""
        evicted: list[str] = []
        while not enough():
            victim = pick_victim(list(self._records.values()))
            if victim is None:
                break
            await self._unload(victim, reason)
            evicted.append(victim.name)
        return evicted

    def sweep(self) -> list[str]:
        """Start unloading every idle model whose keep_alive has run out."""
        now = self._clock()
        due = [
            r for r in self._records.values()
            if r.expires_at is not None and r.expires_at <= now and r.state is ModelState.READY and not r.protected
        ]
        for record in due:
            self._spawn(self._evict(record, "keep_alive"))
        return [r.name for r in due]

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Preload the `preload: true` models and, meanwhile, expire idle ones; runs until cancelled."""
        self._spawn(self._preload())
        while True:
            self.sweep()
            await asyncio.sleep(SWEEP_INTERVAL)

    async def _preload(self) -> None:
        for model in self.config.models:
            if model.preload and not self._closing:
                try:
                    async with self.lease(model.name):
                        pass
                except Exception as e:  # the daemon serves on; the model's state says why
                    log.error("could not preload '%s': %s", model.name, e.message if isinstance(e, MlxServerError) else repr(e))

    async def close(self) -> None:
        """Stop loading: a request waiting for a load gets a 503 instead of holding the exit."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(BaseException):
                await task

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for running and queued requests to end; returns how many are left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def busy() -> int:
            return sum(r.leases for r in self._records.values()) + self.queue_depth()

        while busy() and loop.time() < deadline:
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        return busy()

    # -- the one place state changes -------------------------------------------

    def _transition(self, record: _Record, state: ModelState) -> None:
        if state not in _ALLOWED[record.state]:
            raise RuntimeError(f"model '{record.name}': illegal transition {record.state} -> {state}")
        log.debug("model '%s': %s -> %s", record.name, record.state, state)
        record.state = state
        if state is ModelState.LOADING:
            record.error = None
        else:
            record.load_admitted = False
        if state in (ModelState.UNLOADED, ModelState.FAILED):
            record.unload_requested = False

    def _settle(self, record: _Record, error: Exception | None = None) -> None:
        """Wake the requests waiting on a load or unload; `error` is raised to each."""
        settled = record.settled
        if settled is None or settled.done():
            return
        if error is None:
            settled.set_result(record.state)
        else:
            settled.set_exception(error)
            settled.add_done_callback(lambda f: f.exception())  # retrieved even with no waiter

    def _notify(self) -> None:
        self._changed.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
