"""The one thread that owns every MLX call: load, unload, prefill, decode, embed.

MLX streams are thread-local and Metal is not safe to drive from several threads,
so everything that touches `mlx` runs here. Handlers talk to the thread through a
queue of typed commands and get results back on their asyncio loop.

One loop iteration: take new commands, evaluate one time-boxed chunk of a loading
model's weights, one slice of an embedding job, then give every resident model with
work one step (round-robin), so no model starves and no load stalls another
model's streams for long. When nothing else runs, one prompt cache waiting for the
disk is saved (disk_tier.py).

If the thread dies anyway (something escaped every per-sequence and per-batch
guard), every live and queued job fails at once and `died()` returns, so the app
can exit and let its supervisor restart it: a dead engine is not a state to sit in.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..disk_cache import DiskPromptCache, model_identity
from ..errors import EngineDead, GenerationFailed
from ..jobs import ErrorEvent, GenerationJob, GenerationRequest
from . import libs
from .commands import Command, Embed, Generate, Load, ShrinkCaches, Stop, Unload, fail, resolve
from .disk_tier import DISK_MIN_TOKENS, DiskTier
from .embedding import Embedding, embedding_body
from .faults import FATAL, generation_error
from .loading import Loading, advance_load, start_load
from .memory import kv_itemsize, return_memory, tree_nbytes
from .outbox import Outbox
from .runner import ModelRunner
from .stats import EngineStats, LoadedWeights

log = logging.getLogger("mlx_server.engine")

STATS_INTERVAL = 0.05
IDLE_WAIT = 0.5  # how long the idle thread blocks on its inbox between stats updates


class Engine:
    """Owns the MLX thread. Every public method is called from the event loop.

    `cache_limit_bytes`: MLX's buffer-cache limit (`mx.set_cache_limit`), set on the
    thread when it starts; None leaves MLX's default. `disk_cache_gb` > 0 keeps
    prompt caches in `disk_cache_dir` across unloads and restarts, those of at least
    `disk_cache_min_tokens` tokens that are cheaper to read back than to prefill.
    """

    def __init__(
        self,
        *,
        cache_limit_bytes: int | None = None,
        disk_cache_gb: float = 0.0,
        disk_cache_dir: Path | None = None,
        disk_cache_min_tokens: int = DISK_MIN_TOKENS,
    ):
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()  # a command is queued only while the thread will take it
        self._closed: str | None = None  # why the inbox takes no more commands
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._load_stream: Any = None  # where weights are read, beside the generation stream; made on the thread
        self._cache_limit = cache_limit_bytes
        self._disk_cache_gb = disk_cache_gb if disk_cache_dir is not None else 0.0
        self._disk_cache_dir = disk_cache_dir
        self._disk_cache_min_tokens = disk_cache_min_tokens
        self._disk: DiskPromptCache | None = None  # opened on the thread
        self._runners: dict[str, ModelRunner] = {}
        self._cache_spills: Counter[str] = Counter()  # prompt-cache entries given back for memory, by model
        self._cache_drops: Counter[str] = Counter()
        self._loads: list[Loading] = []
        self._embeddings: list[Embedding] = []
        self._stopping = False
        self._outbox = Outbox()
        self.dead_reason: str | None = None
        self._death_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.stats = EngineStats()
        self._stats_at = 0.0
        self.device_info: dict[str, Any] = {}
        self._started = threading.Event()

    # -- event-loop side ------------------------------------------------------

    def start(self) -> None:
        """Start the thread; it imports MLX first, so requests queue until `started()`."""
        self._thread.start()

    async def started(self) -> None:
        """Return once the thread has imported MLX and read the device."""
        if not self._started.is_set():
            await asyncio.to_thread(self._started.wait)

    async def stop(self) -> None:
        """Unload everything and end the thread (its last act frees MLX memory)."""
        if not self._thread.is_alive():
            return
        try:
            await asyncio.wrap_future(self._submit(lambda done: Stop(done)))
        except EngineDead:
            pass
        await asyncio.to_thread(self._thread.join)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._closed is None and self._thread.is_alive()

    async def died(self) -> str:
        """Wait until the engine thread has died; returns why. (A clean `stop` is not a death.)"""
        with self._inbox_lock:
            if self.dead_reason is not None:
                return self.dead_reason
            waiter = asyncio.get_running_loop().create_future()
            self._death_waiters.append((asyncio.get_running_loop(), waiter))
        return await waiter

    async def load(self, name: str, path: Path, tokenizer: Any, *, batch_size: int, prompt_cache_bytes: int) -> LoadedWeights:
        """Load a model's weights (lazily, then evaluated in slices between decode steps)."""
        return await asyncio.wrap_future(self._submit(lambda done: Load(name, Path(path), tokenizer, batch_size, prompt_cache_bytes, done)))

    async def unload(self, name: str) -> int:
        """Drop a model and everything that refers to it; returns the bytes MLX freed."""
        return await asyncio.wrap_future(self._submit(lambda done: Unload(name, done)))

    async def shrink_caches(self, nbytes: int) -> int:
        """Give back up to `nbytes` of the models' prompt caches for the manager; returns the bytes freed."""
        return await asyncio.wrap_future(self._submit(lambda done: ShrinkCaches(nbytes, done)))

    async def embed(self, name: str, inputs: list[list[int]]) -> list[list[float]]:
        return await asyncio.wrap_future(self._submit(lambda done: Embed(name, list(inputs), done)))

    def generate(self, request: GenerationRequest) -> GenerationJob:
        """Queue a generation; raises EngineDead at once if the thread cannot take it."""
        job = GenerationJob(request, asyncio.get_running_loop())
        with self._inbox_lock:
            if not self._accepting():
                raise EngineDead(self._refusal())
            self._inbox.put(Generate(job))
        return job

    def _submit(self, make: Any) -> Future:
        done: Future = Future()
        with self._inbox_lock:
            if not self._accepting():
                done.set_exception(EngineDead(self._refusal()))
            else:
                self._inbox.put(make(done))
        return done

    def _accepting(self) -> bool:
        return self._closed is None and self._thread.is_alive()

    def _refusal(self) -> str:
        return self.dead_reason or self._closed or "not running"

    # -- engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            libs.import_mlx()
            mx = libs.mx
            self.device_info = dict(mx.device_info())
            limit = self.device_info.get("max_recommended_working_set_size")
            if limit and mx.metal.is_available():
                mx.set_wired_limit(limit)
            if self._cache_limit is not None:
                mx.set_cache_limit(self._cache_limit)
            self._load_stream = mx.new_stream(mx.default_device())
            self._disk = self._open_disk_cache()
            self._started.set()
            while not self._stopping:
                self._take_commands()
                self._advance_loads()
                self._advance_embeddings()
                decoding = any(r.decoding() for r in self._runners.values())
                for runner in list(self._runners.values()):
                    if runner.busy():
                        runner.step(decoding)
                self._outbox.flush()
                if not self._working():
                    self._save_one_prompt()
                self._publish_stats()
            self._close_inbox("the engine has stopped")
        except BaseException as e:  # the thread must never die silently
            log.critical("engine thread died: %s: %s", type(e).__name__, e, exc_info=True)
            self._die(f"{type(e).__name__}: {e}")
        finally:
            self._started.set()
            if libs.mx is not None:
                # MLX requires each thread that used it to clear its streams before it
                # ends; otherwise the process can abort at exit ("terminate called").
                # A load given up at stop or death may still be reading on its own stream.
                libs.mx.synchronize()
                if self._load_stream is not None:
                    libs.mx.synchronize(self._load_stream)
                libs.mx.clear_streams()

    def _working(self) -> bool:
        return bool(self._loads or self._embeddings) or any(r.busy() for r in self._runners.values())

    def _busy(self) -> bool:
        """Something to do this turn: the inbox is only polled, not waited on."""
        return self._working() or any(r.disk is not None and r.disk.pending for r in self._runners.values())

    def _take_commands(self) -> None:
        block = not self._busy()
        while True:
            try:
                command = self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            self._handle(command)

    def _handle(self, command: Command) -> None:
        match command:
            case Generate(job):
                self._insert(job)
            case Load():
                self._start_load(command)
            case Embed():
                self._start_embedding(command)
            case Unload(name, done):
                self._answer(done, lambda: self._unload(name))
            case ShrinkCaches(nbytes, done):
                self._answer(done, lambda: self._shrink_caches(nbytes))
            case Stop(done):
                self._answer(done, self._stop)

    @staticmethod
    def _answer(done: Future, work: Any) -> None:
        try:
            result = work()
        except FATAL:
            raise
        except BaseException as e:
            fail(done, e)
        else:
            resolve(done, result)

    def _insert(self, job: GenerationJob) -> None:
        if job.cancelled.is_set():
            return
        runner = self._runners.get(job.request.model)
        if runner is None:
            self._outbox.emit(job, ErrorEvent(GenerationFailed(f"model '{job.request.model}' is not loaded")))
            return
        runner.insert(job)

    def _stop(self) -> None:
        for name in list(self._runners):
            self._unload(name)
        for pending in (*self._loads, *self._embeddings):
            fail(pending.command.done, EngineDead("shutting down"))
        self._loads.clear()
        self._embeddings.clear()
        self._stopping = True

    # the disk prompt cache

    def _open_disk_cache(self) -> DiskPromptCache | None:
        if self._disk_cache_gb <= 0:
            return None
        try:
            return DiskPromptCache(self._disk_cache_dir, int(self._disk_cache_gb * (1 << 30)))
        except OSError as e:
            log.error("disk prompt cache in %s cannot be used, running without it: %s", self._disk_cache_dir, e)
            return None

    def _disk_tier(self, name: str, path: Path, model: Any) -> DiskTier | None:
        """This model's place in the disk cache, or None when it has no identity (files unreadable)."""
        if self._disk is None:
            return None
        try:
            identity = model_identity(name, path, libs.lm_cache.make_prompt_cache(model))
            return DiskTier(self._disk, identity, self._disk_cache_min_tokens)
        except OSError as e:
            log.warning("disk prompt cache off for '%s': cannot read its files: %s", name, e)
            return None

    def _shrink_caches(self, nbytes: int) -> int:
        """Free `nbytes` of prompt caches, from the model that keeps the most first."""
        freed = 0
        for runner in sorted(self._runners.values(), key=lambda r: r.cached_bytes(), reverse=True):
            if freed >= nbytes:
                break
            shrunk = runner.shrink_cache(nbytes - freed)
            freed += shrunk.nbytes
            self._cache_spills[runner.name] += shrunk.spilled
            self._cache_drops[runner.name] += shrunk.dropped
        if freed:
            return_memory()
            self._publish_stats(force=True)  # the manager reads the new figures as soon as this answers
        return freed

    def _save_one_prompt(self) -> None:
        for runner in self._runners.values():
            if runner.disk is not None and runner.disk.pending:
                runner.disk.save_one()
                return

    # loading

    def _start_load(self, command: Load) -> None:
        try:
            if command.name in self._runners:
                raise RuntimeError(f"model '{command.name}' is already loaded")
            self._loads.append(start_load(command, self._load_stream))
        except FATAL:
            raise
        except BaseException as e:
            fail(command.done, e)

    def _advance_loads(self) -> None:
        if not self._loads:
            return
        loading = self._loads[0]
        command = loading.command
        try:
            if not advance_load(loading, any(r.busy() for r in self._runners.values())):
                return
            self._loads.pop(0)
            model = loading.model
            runner = ModelRunner(
                command.name,
                model,
                command.tokenizer,
                weights_bytes=tree_nbytes(model.parameters()),
                batch_size=command.batch_size,
                prompt_cache_bytes=command.prompt_cache_bytes,
                outbox=self._outbox,
                disk=self._disk_tier(command.name, command.path, model),
            )
            self._runners[command.name] = runner
            self._publish_stats(force=True)
            resolve(command.done, LoadedWeights(runner.weights_bytes, libs.lm_utils.get_total_parameters(model), kv_itemsize(model)))
        except FATAL:
            raise
        except BaseException as e:
            if loading in self._loads:
                self._loads.remove(loading)
            self._runners.pop(command.name, None)
            loading.drop()
            return_memory()
            fail(command.done, e)

    def _unload(self, name: str) -> int:
        before = libs.mx.get_active_memory()
        for loading in [l for l in self._loads if l.name == name]:
            self._loads.remove(loading)
            loading.drop()
            fail(loading.command.done, RuntimeError(f"model '{name}' was unloaded while loading"))
        for job in [j for j in self._embeddings if j.name == name]:
            self._embeddings.remove(job)
            fail(job.command.done, GenerationFailed(f"model '{name}' was unloaded"))
        runner = self._runners.pop(name, None)
        if runner is not None:
            runner.close(GenerationFailed(f"model '{name}' was unloaded"))
            self._outbox.flush()
            if runner.disk is not None:  # what waits for an idle turn is kept all the same
                runner.disk.save_all()
            del runner
        return_memory()
        self._publish_stats(force=True)
        return max(0, before - libs.mx.get_active_memory())

    # embeddings

    def _start_embedding(self, command: Embed) -> None:
        runner = self._runners.get(command.name)
        body = embedding_body(runner.model) if runner else None
        if runner is None:
            fail(command.done, GenerationFailed(f"model '{command.name}' is not loaded"))
        elif body is None:
            fail(command.done, GenerationFailed(f"model '{command.name}' cannot produce embeddings"))
        else:
            self._embeddings.append(Embedding(command, body))

    def _advance_embeddings(self) -> None:
        """One bounded slice of the oldest embedding job, so decode steps go on meanwhile."""
        if not self._embeddings:
            return
        job = self._embeddings[0]
        if job.command.done.cancelled():  # its request went away
            self._embeddings.pop(0)
            return
        runner = self._runners[job.name]
        started = time.perf_counter()
        try:
            ran = job.advance(runner.prefill_budget(any(r.decoding() for r in self._runners.values())))
            runner.record_prefill_rate(ran, time.perf_counter() - started)
        except FATAL:
            raise
        except BaseException as e:
            self._embeddings.pop(0)
            fail(job.command.done, generation_error(e))
            return
        if job.complete:
            self._embeddings.pop(0)
            resolve(job.command.done, job.vectors)

    # stats and death

    def _publish_stats(self, *, force: bool = False) -> None:
        """A fresh snapshot for /health and /metrics, at most every STATS_INTERVAL."""
        now = time.perf_counter()
        if not force and now - self._stats_at < STATS_INTERVAL:
            return
        self._stats_at = now
        mx = libs.mx
        self.stats = EngineStats(
            active_memory=mx.get_active_memory(),
            cache_memory=mx.get_cache_memory(),
            peak_memory=mx.get_peak_memory(),
            models={r.name: r.stats() for r in self._runners.values()},
            cache_spills=dict(self._cache_spills),
            cache_drops=dict(self._cache_drops),
        )

    def _close_inbox(self, reason: str, *, dead: bool = False) -> list[Command]:
        """Take no more commands; returns those still queued."""
        with self._inbox_lock:
            self._closed = reason
            if dead:
                self.dead_reason = reason
            left = []
            while True:
                try:
                    left.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            waiters, self._death_waiters = (self._death_waiters, []) if dead else ([], self._death_waiters)
        error = EngineDead(reason)
        for command in left:
            if isinstance(command, Generate):
                self._outbox.emit(command.job, ErrorEvent(error))
            else:
                fail(command.done, error)
        self._outbox.flush()
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_settle, waiter, reason)
            except RuntimeError:  # that loop has closed
                pass
        return left

    def _die(self, reason: str) -> None:
        """Fail everything at once: live sequences, loads, embeddings, queued commands."""
        error = EngineDead(reason)
        for runner in self._runners.values():
            try:
                runner.close(error)
            except BaseException:  # keep failing the rest: nobody may wait forever
                log.exception("could not close '%s' after the engine died", runner.name)
        self._runners.clear()
        for pending in (*self._loads, *self._embeddings):
            fail(pending.command.done, error)
        self._loads.clear()
        self._embeddings.clear()
        self._close_inbox(reason, dead=True)


def _settle(waiter: asyncio.Future, reason: str) -> None:
    if not waiter.done():
        waiter.set_result(reason)
