"""The one thread that owns every MLX call: load, unload, prefill, decode, embed.

MLX streams are thread-local and Metal is not safe to drive from several threads,
so everything that touches `mlx` runs here. Handlers talk to the thread through a
`queue.SimpleQueue` of commands and get results back on their asyncio loop.

One loop iteration: take new commands, evaluate one time-boxed chunk of a loading
model's weights, then give every resident model with work one step (round-robin),
so no model starves and no load stalls another model's streams for long.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import gc
import importlib
import logging
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineDead, GenerationFailed, MlxServerError
from .jobs import DoneEvent, ErrorEvent, Event, GenerationJob, GenerationRequest, LogitsProcessor, TextEvent
from .options import GenerationOptions

log = logging.getLogger("mlx_server.engine")

LOAD_SLICE_SECONDS = 0.002  # longest a load may hold the thread between decode steps
PREFILL_STEP = 1024  # tokens per prefill chunk when nothing else is decoding
PREFILL_SLICE_SECONDS = 0.25  # otherwise: the longest one chunk may hold back other streams
PREFILL_FIRST_GUESS = 128  # chunk size before this model's prefill speed is known
EMBED_BATCH = 16  # sequences per embedding slice; its padded tokens follow the prefill budget
PROMPT_CACHE_ENTRIES = 64
MIN_CACHE_REUSE = 16  # shared tokens below which copying a cached KV state is not worth it
STATS_INTERVAL = 0.05


# MLX and mlx_lm (which imports transformers) take over a second to import. The engine
# thread imports them when it starts, so the HTTP server answers at once and no other
# thread ever imports, let alone calls, MLX.
mx: Any = None
lm_generate: Any = None  # mlx_lm.generate
lm_cache: Any = None  # mlx_lm.models.cache
lm_sample: Any = None  # mlx_lm.sample_utils
lm_utils: Any = None  # mlx_lm.utils
mlx_utils: Any = None  # mlx.utils


def _import_mlx() -> None:
    global mx, lm_generate, lm_cache, lm_sample, lm_utils, mlx_utils
    # import_module, not attribute access: the package `mlx_lm` exports a *function* `generate`.
    mx, mlx_utils = importlib.import_module("mlx.core"), importlib.import_module("mlx.utils")
    lm_generate = importlib.import_module("mlx_lm.generate")
    lm_cache = importlib.import_module("mlx_lm.models.cache")
    lm_sample = importlib.import_module("mlx_lm.sample_utils")
    lm_utils = importlib.import_module("mlx_lm.utils")


# --- what the engine reports -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedWeights:
    nbytes: int
    parameters: int


@dataclass(frozen=True, slots=True)
class ModelStats:
    weights_bytes: int
    prompt_cache_bytes: int
    sequences: int
    kv_bytes: int = 0  # KV caches of the running sequences, as their caches count them


@dataclass(frozen=True, slots=True)
class EngineStats:
    active_memory: int = 0
    cache_memory: int = 0
    peak_memory: int = 0
    models: dict[str, ModelStats] = field(default_factory=dict)


# --- engine-thread state -----------------------------------------------------------


def partial_marker(text: str, markers) -> int:
    """How many characters at the end of `text` may be the start of one of `markers`:
    streamed text holds those back until the next piece decides."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


class _StopMatcher:
    """Finds stop strings in streamed text, holding back what may start one."""

    __slots__ = ("stops", "held")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[: min(found)], True
        keep = partial_marker(buf, self.stops)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(slots=True)
class _CachedPrompt:
    tokens: np.ndarray  # int32: the tokens whose keys and values the cache holds
    cache: list
    nbytes: int


class _PromptCache:
    """KV caches of finished sequences, found again by their longest shared prefix.

    A bounded LRU with a vectorised prefix compare per entry: well under a
    millisecond per lookup. (mlx_lm's LRUPromptCache searches a trie whose cost
    grows with every stored token: over a second at 256 entries of 2,000 tokens.)
    Engine thread only; its bytes count in the model's memory and go with it.
    """

    def __init__(self, max_bytes: int, max_entries: int = PROMPT_CACHE_ENTRIES):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.nbytes = 0
        self._entries: OrderedDict[int, _CachedPrompt] = OrderedDict()
        self._next_key = 0

    def fetch(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the best cache for `prompt` (trimmed to the shared prefix) and the tokens still to process."""
        wanted = np.asarray(prompt, dtype=np.int32)
        best, shared = None, 0
        for key, entry in self._entries.items():
            n = min(len(entry.tokens), len(wanted))
            if n <= shared:
                continue
            differs = np.flatnonzero(entry.tokens[:n] != wanted[:n])
            common = int(differs[0]) if differs.size else n
            if common > shared and (common == len(entry.tokens) or lm_cache.can_trim_prompt_cache(entry.cache)):
                best, shared = key, common
        reuse = min(shared, len(prompt) - 1)  # the last prompt token must run to give logits
        if best is None or reuse < MIN_CACHE_REUSE:
            return None, prompt
        entry = self._entries[best]
        if reuse < len(entry.tokens) and not lm_cache.can_trim_prompt_cache(entry.cache):
            return None, prompt
        self._entries.move_to_end(best)
        cache = copy.deepcopy(entry.cache)
        if reuse < len(entry.tokens):
            lm_cache.trim_prompt_cache(cache, len(entry.tokens) - reuse)
        return cache, prompt[reuse:]

    def insert(self, tokens: list[int], cache: list) -> None:
        nbytes = sum(c.nbytes for c in cache)
        if nbytes > self.max_bytes or not tokens:
            return
        stored = np.asarray(tokens, dtype=np.int32)
        if lm_cache.can_trim_prompt_cache(cache):  # it serves every prefix of itself too
            for key in [k for k, e in self._entries.items() if len(e.tokens) <= len(stored) and np.array_equal(e.tokens, stored[: len(e.tokens)])]:
                self.nbytes -= self._entries.pop(key).nbytes
        self._entries[self._next_key] = _CachedPrompt(stored, cache, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while self._entries and (self.nbytes > self.max_bytes or len(self._entries) > self.max_entries):
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes


@dataclass(slots=True)
class _Sequence:
    job: GenerationJob
    detokenizer: Any
    stops: _StopMatcher
    prompt: list[int]
    cached: int
    uid: int | None = None  # its place in the model's BatchGenerator
    stream: Iterator | None = None  # or its own generate_step, for requests batching cannot serve
    cache: list | None = None  # the single stream's KV cache, kept for the prompt cache
    prefilled: int = 0  # prompt tokens processed so far (batched path)
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None


@dataclass(slots=True)
class _Resident:
    name: str
    model: Any
    tokenizer: Any
    weights_bytes: int
    batchable: bool
    batch_size: int
    prompt_cache: _PromptCache
    batch: Any = None  # mlx_lm BatchGenerator, created on first use
    prefill_rate: float | None = None  # prompt tokens per second, measured
    in_batch: dict[int, _Sequence] = field(default_factory=dict)
    single: list[_Sequence] = field(default_factory=list)

    def busy(self) -> bool:
        return bool(self.in_batch or self.single)


@dataclass(slots=True)
class _Loading:
    name: str
    path: Path
    tokenizer: Any
    batch_size: int
    prompt_cache_bytes: int
    done: Future
    model: Any = None
    pending: list = field(default_factory=list)


@dataclass(slots=True)
class _Embedding:
    name: str
    body: Any  # the model without its output head: tokens -> final hidden states
    inputs: list[list[int]]
    done: Future
    vectors: list[list[float]] = field(default_factory=list)


@dataclass(slots=True)
class _Command:
    kind: str
    payload: Any = None
    done: Future | None = None


def _seeded_categorical(seed: int, temperature: float):
    key = mx.random.key(seed % (1 << 64))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, top_k: int, min_p: float):
    """Unseeded samplers are shared, so a batch of equal settings samples in one call."""
    return _make_sampler(temperature, top_p, top_k, min_p, None)


def _make_sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None):
    if temperature == 0:
        return lm_sample.greedy_sampler
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: lm_sample.apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: lm_sample.apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: lm_sample.apply_top_k(x, top_k))
    draw = (
        (lambda x: lm_sample.categorical_sampling(x, temperature))
        if seed is None
        else _seeded_categorical(seed, temperature)
    )

    def sampler(logprobs: mx.array) -> mx.array:
        for keep in filters:
            logprobs = keep(logprobs)
        return draw(logprobs)

    return sampler


def _sampler_for(p: GenerationOptions):
    if p.seed is None:
        return _shared_sampler(p.temperature, p.top_p, p.top_k, p.min_p)
    return _make_sampler(p.temperature, p.top_p, p.top_k, p.min_p, p.seed)


def _logits_processors(request: GenerationRequest) -> list[LogitsProcessor]:
    p = request.options
    window = p.repeat_last_n if p.repeat_last_n >= 0 else len(request.prompt)
    processors = []
    if window > 0:
        processors = lm_sample.make_logits_processors(
            None,
            p.repeat_penalty if p.repeat_penalty != 1.0 else None,
            window,
            p.presence_penalty or None,
            window,
            p.frequency_penalty or None,
            window,
        )
    if request.logits_processor is not None:
        processors.append(request.logits_processor())
    return processors


def _find_malloc_trim():
    """glibc keeps freed heap pages after a model is dropped; malloc_trim gives them back."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


_malloc_trim = _find_malloc_trim()


def _return_memory() -> None:
    """After dropping references: collect, empty MLX's buffer cache, return pages to the OS."""
    gc.collect()
    mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _nbytes(tree: Any) -> int:
    return mlx_utils.tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, tree, 0)


class Engine:
    """Owns the MLX thread. Every public method is called from the event loop."""

    def __init__(self, *, load_slice_seconds: float = LOAD_SLICE_SECONDS):
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._load_slice = load_slice_seconds
        self._residents: dict[str, _Resident] = {}
        self._loads: list[_Loading] = []
        self._embeddings: list[_Embedding] = []
        self._decoding = False  # some stream, of any model, is past its prompt
        self._stopping = False
        self._emit_batch: list[tuple[GenerationJob, Event]] = []
        self.dead_reason: str | None = None
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
        await asyncio.wrap_future(self._submit("stop"))
        await asyncio.to_thread(self._thread.join)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    def _submit(self, kind: str, payload: Any = None) -> Future:
        done: Future = Future()
        if not self.alive:
            done.set_exception(EngineDead(self.dead_reason or "not running"))
            return done
        self._inbox.put(_Command(kind, payload, done))
        return done

    async def load(self, name: str, path: Path, tokenizer: Any, *, batch_size: int, prompt_cache_bytes: int) -> LoadedWeights:
        """Load a model's weights (lazily, then evaluated in slices between decode steps)."""
        return await asyncio.wrap_future(self._submit("load", (name, Path(path), tokenizer, batch_size, prompt_cache_bytes)))

    async def unload(self, name: str) -> int:
        """Drop a model and everything that refers to it; returns the bytes MLX freed."""
        return await asyncio.wrap_future(self._submit("unload", name))

    async def embed(self, name: str, inputs: list[list[int]]) -> list[list[float]]:
        return await asyncio.wrap_future(self._submit("embed", (name, inputs)))

    def generate(self, request: GenerationRequest) -> GenerationJob:
        job = GenerationJob(request, asyncio.get_running_loop())
        if not self.alive:
            raise EngineDead(self.dead_reason or "not running")
        self._inbox.put(_Command("generate", job))
        return job

    # -- engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            _import_mlx()
            self.device_info = dict(mx.device_info())
            limit = self.device_info.get("max_recommended_working_set_size")
            if limit and mx.metal.is_available():
                mx.set_wired_limit(limit)
            self._started.set()
            while not self._stopping:
                self._take_commands()
                self._advance_loads()
                self._advance_embeddings()
                self._decoding = any(
                    s.first_token_at is not None for r in self._residents.values() for s in (*r.in_batch.values(), *r.single)
                )
                for resident in list(self._residents.values()):
                    if resident.busy():
                        self._step(resident)
                self._flush_events()
                self._publish_stats()
        except BaseException as e:  # the thread must never die silently
            log.exception("engine thread died")
            self._die(f"{type(e).__name__}: {e}")
        finally:
            self._started.set()
            if mx is not None:
                # MLX requires each thread that used it to clear its streams before it
                # ends; otherwise the process can abort at exit ("terminate called").
                mx.synchronize()
                mx.clear_streams()

    def _busy(self) -> bool:
        return bool(self._loads or self._embeddings) or any(r.busy() for r in self._residents.values())

    def _take_commands(self) -> None:
        block = not self._busy()
        while True:
            try:
                command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            self._handle(command)

    def _handle(self, command: _Command) -> None:
        if command.kind == "generate":
            self._insert(command.payload)
            return
        if command.kind == "load":
            self._start_load(_Loading(*command.payload, done=command.done))
            return
        try:
            if command.kind == "unload":
                result = self._unload(command.payload)
            elif command.kind == "embed":
                self._start_embedding(*command.payload, done=command.done)
                return
            elif command.kind == "stop":
                result = self._stop()
            else:
                raise ValueError(f"unknown engine command {command.kind!r}")
        except BaseException as e:
            _fail(command.done, e)
        else:
            _resolve(command.done, result)

    def _stop(self) -> None:
        for name in list(self._residents):
            self._unload(name)
        for pending in (*self._loads, *self._embeddings):
            _fail(pending.done, EngineDead("shutting down"))
        self._loads.clear()
        self._embeddings.clear()
        self._stopping = True

    # loading: lazy load, then evaluate the weights in time-boxed slices

    def _start_load(self, loading: _Loading) -> None:
        try:
            if loading.name in self._residents:
                raise RuntimeError(f"model '{loading.name}' is already loaded")
            loading.model, _ = lm_utils.load_model(loading.path, lazy=True)
            loading.pending = [a for _, a in mlx_utils.tree_flatten(loading.model.parameters())]
            loading.pending.reverse()
        except BaseException as e:
            _fail(loading.done, e)
            return
        self._loads.append(loading)

    def _advance_loads(self) -> None:
        if not self._loads:
            return
        loading = self._loads[0]
        deadline = time.perf_counter() + self._load_slice
        try:
            while loading.pending and time.perf_counter() < deadline:
                mx.eval(loading.pending.pop())
            if loading.pending:
                return
            self._loads.pop(0)
            model = loading.model
            cache = lm_cache.make_prompt_cache(model)
            resident = _Resident(
                name=loading.name,
                model=model,
                tokenizer=loading.tokenizer,
                weights_bytes=_nbytes(model.parameters()),
                batchable=all(hasattr(c, "merge") for c in cache),
                batch_size=loading.batch_size,
                prompt_cache=_PromptCache(loading.prompt_cache_bytes),
            )
            del cache
            self._residents[loading.name] = resident
            self._publish_stats(force=True)
            _resolve(loading.done, LoadedWeights(resident.weights_bytes, lm_utils.get_total_parameters(model)))
        except BaseException as e:
            self._loads.remove(loading)
            loading.model = None
            loading.pending.clear()
            _return_memory()
            _fail(loading.done, e)

    def _unload(self, name: str) -> int:
        before = mx.get_active_memory()
        for loading in [l for l in self._loads if l.name == name]:
            self._loads.remove(loading)
            _fail(loading.done, RuntimeError(f"model '{name}' was unloaded while loading"))
        for job in [j for j in self._embeddings if j.name == name]:
            self._embeddings.remove(job)
            _fail(job.done, GenerationFailed(f"model '{name}' was unloaded"))
        resident = self._residents.pop(name, None)
        if resident is not None:
            for seq in [*resident.in_batch.values(), *resident.single]:
                self._emit(seq.job, ErrorEvent(GenerationFailed(f"model '{name}' was unloaded")))
            self._flush_events()
            if resident.batch is not None:
                resident.batch.close()
            resident.in_batch.clear()
            resident.single.clear()
            resident.batch = None
            resident.model = None
            resident.prompt_cache = None
            del resident
        _return_memory()
        self._publish_stats(force=True)
        return max(0, before - mx.get_active_memory())

    # generation

    def _insert(self, job: GenerationJob) -> None:
        request = job.request
        resident = self._residents.get(request.model)
        if job.cancelled.is_set():
            return
        if resident is None:
            self._emit(job, ErrorEvent(GenerationFailed(f"model '{request.model}' is not loaded")))
            return
        try:
            prompt = list(request.prompt)
            cache, rest = resident.prompt_cache.fetch(prompt)
            seq = _Sequence(
                job=job,
                detokenizer=resident.tokenizer.detokenizer,
                stops=_StopMatcher(request.options.stop),
                prompt=prompt,
                cached=len(prompt) - len(rest),
            )
            sampler = _sampler_for(request.options)
            processors = _logits_processors(request)
            if resident.batchable and request.options.seed is None:
                batch = resident.batch or self._new_batch(resident)
                (seq.uid,) = batch.insert(
                    [rest],
                    max_tokens=[request.max_tokens],
                    caches=[cache],
                    all_tokens=[prompt[: seq.cached]],
                    samplers=[sampler],
                    logits_processors=[processors],
                )
                resident.in_batch[seq.uid] = seq
            else:
                seq.cache = cache if cache is not None else lm_cache.make_prompt_cache(resident.model)
                seq.stream = lm_generate.generate_step(
                    mx.array(rest),
                    resident.model,
                    max_tokens=request.max_tokens,
                    sampler=sampler,
                    logits_processors=processors or None,
                    prompt_cache=seq.cache,
                    prefill_step_size=PREFILL_STEP,
                )
                resident.single.append(seq)
        except Exception as e:
            log.exception("could not start generation on '%s'", request.model)
            self._emit(job, ErrorEvent(GenerationFailed(f"generation failed: {type(e).__name__}: {e}")))

    def _new_batch(self, resident: _Resident) -> Any:
        resident.batch = lm_generate.BatchGenerator(
            resident.model,
            stop_tokens=[[t] for t in resident.tokenizer.eos_token_ids],
            completion_batch_size=max(32, resident.batch_size),
            prefill_batch_size=8,
            prefill_step_size=PREFILL_STEP,
        )
        return resident.batch

    def _step(self, resident: _Resident) -> None:
        cancelled = [uid for uid, s in resident.in_batch.items() if s.job.cancelled.is_set()]
        if cancelled:
            resident.batch.remove(cancelled)
            for uid in cancelled:
                self._finish(resident.in_batch.pop(uid), "cancelled")
        if resident.in_batch:
            resident.batch.prefill_step_size = self._prefill_step(resident)
            started = time.perf_counter()
            try:
                prompt_responses, responses = resident.batch.next()
            except Exception as e:  # MLX error or MemoryError: fail this batch, keep serving
                self._fail_batch(resident, e)
            else:
                self._measure_prefill(resident, prompt_responses, time.perf_counter() - started)
                for r in responses:
                    seq = resident.in_batch.get(r.uid)
                    if seq is None:
                        continue
                    if self._on_token(resident, seq, r.token, r.finish_reason):
                        self._finish_batched(resident, seq, r)
        for seq in list(resident.single):
            self._step_single(resident, seq)

    def _prefill_step(self, resident: _Resident) -> int:
        """Prefill chunk size: as large as useful when nothing else is decoding,
        else what this model prefills in PREFILL_SLICE_SECONDS (no stream stalls long)."""
        if not self._decoding:
            return PREFILL_STEP
        if resident.prefill_rate is None:
            return PREFILL_FIRST_GUESS
        return max(32, min(PREFILL_STEP, int(resident.prefill_rate * PREFILL_SLICE_SECONDS)))

    def _measure_prefill(self, resident: _Resident, prompt_responses: list, seconds: float) -> None:
        processed = 0
        for r in prompt_responses:
            seq = resident.in_batch.get(r.uid)
            if seq is not None:
                processed += r.progress[0] - seq.prefilled
                seq.prefilled = r.progress[0]
        _record_prefill_rate(resident, processed, seconds)

    def _step_single(self, resident: _Resident, seq: _Sequence) -> None:
        if seq.job.cancelled.is_set():
            resident.single.remove(seq)
            seq.stream.close()
            self._finish(seq, "cancelled")
            return
        try:
            token, _ = next(seq.stream)
        except StopIteration:
            token = None
        except Exception as e:
            resident.single.remove(seq)
            self._emit(seq.job, ErrorEvent(_generation_error(e)))
            return
        if token is None:
            finished = self._finish(seq, "length")
        else:
            finish = None
            if token in resident.tokenizer.eos_token_ids:
                finish = "stop"
            elif len(seq.tokens) + 1 >= seq.job.request.max_tokens:
                finish = "length"
            finished = self._on_token(resident, seq, token, finish)
        if finished:
            resident.single.remove(seq)
            seq.stream.close()
            resident.prompt_cache.insert(seq.prompt + seq.tokens, seq.cache)

    def _on_token(self, resident: _Resident, seq: _Sequence, token: int, finish: str | None) -> bool:
        """Detokenize one token and emit its text; True when the sequence is done."""
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if finish == "stop" and token in resident.tokenizer.eos_token_ids:
            seq.detokenizer.finalize()
        else:
            seq.tokens.append(token)
            seq.detokenizer.add_token(token)
            if finish is not None:
                seq.detokenizer.finalize()
        text, stopped = seq.stops.feed(seq.detokenizer.last_segment)
        if stopped:
            finish = "stop"
        elif finish is not None:
            text += seq.stops.flush()
        if text:
            self._emit(seq.job, TextEvent(text))
        if finish is None:
            return False
        return self._finish(seq, finish)

    def _finish(self, seq: _Sequence, reason: str) -> bool:
        now = time.perf_counter()
        first = seq.first_token_at or now
        self._emit(
            seq.job,
            DoneEvent(
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                cached_tokens=seq.cached,
                completion_tokens=len(seq.tokens),
                output_tokens=tuple(seq.tokens),
                prompt_seconds=first - seq.job.submitted_at,
                decode_seconds=now - first,
            ),
        )
        return True

    def _finish_batched(self, resident: _Resident, seq: _Sequence, response: Any) -> None:
        del resident.in_batch[seq.uid]
        if response.finish_reason is None:  # ended by a stop string: still in the batch
            caches = resident.batch.remove([seq.uid], return_prompt_caches=True)
            cache, tokens = caches.get(seq.uid, (None, None))
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        if cache is not None:
            resident.prompt_cache.insert(list(tokens), cache)

    def _fail_batch(self, resident: _Resident, error: Exception) -> None:
        log.error("batch step on '%s' failed: %s: %s", resident.name, type(error).__name__, error)
        for seq in resident.in_batch.values():
            self._emit(seq.job, ErrorEvent(_generation_error(error)))
        resident.in_batch.clear()
        if resident.batch is not None:
            resident.batch.close()
        resident.batch = None
        _return_memory()

    # embeddings: mean-pooled, L2-normalised final hidden states

    def _start_embedding(self, name: str, inputs: list[list[int]], *, done: Future) -> None:
        resident = self._residents.get(name)
        body = getattr(resident.model, "model", None) if resident else None
        if resident is None:
            _fail(done, GenerationFailed(f"model '{name}' is not loaded"))
        elif body is None or not callable(body):
            _fail(done, GenerationFailed(f"model '{name}' cannot produce embeddings"))
        else:
            self._embeddings.append(_Embedding(name, body, list(inputs), done))

    def _advance_embeddings(self) -> None:
        """One bounded slice of the oldest embedding job, so decode steps go on meanwhile."""
        if not self._embeddings:
            return
        job = self._embeddings[0]
        if job.done.cancelled():  # its request went away
            self._embeddings.pop(0)
            return
        resident = self._residents[job.name]
        budget = self._prefill_step(resident)
        start = len(job.vectors)
        end, width = start, 0
        while end < len(job.inputs) and end - start < EMBED_BATCH:
            wider = max(width, len(job.inputs[end]))
            if end > start and wider * (end - start + 1) > budget:
                break
            width, end = wider, end + 1
        started = time.perf_counter()
        try:
            job.vectors.extend(_embed_slice(job.body, job.inputs[start:end], width))
            _record_prefill_rate(resident, width * (end - start), time.perf_counter() - started)
        except Exception as e:
            self._embeddings.pop(0)
            _fail(job.done, _generation_error(e))
            return
        if len(job.vectors) == len(job.inputs):
            self._embeddings.pop(0)
            _resolve(job.done, job.vectors)

    # events and stats

    def _emit(self, job: GenerationJob, event: Event) -> None:
        self._emit_batch.append((job, event))

    def _flush_events(self) -> None:
        """Hand this step's events to their loops: one wake-up per loop per step."""
        if not self._emit_batch:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationJob, Event]]] = {}
        for job, event in self._emit_batch:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._emit_batch = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass

    def _publish_stats(self, *, force: bool = False) -> None:
        """A fresh snapshot for /health and /metrics, at most every STATS_INTERVAL."""
        now = time.perf_counter()
        if not force and now - self._stats_at < STATS_INTERVAL:
            return
        self._stats_at = now
        self.stats = EngineStats(
            active_memory=mx.get_active_memory(),
            cache_memory=mx.get_cache_memory(),
            peak_memory=mx.get_peak_memory(),
            models={
                r.name: ModelStats(r.weights_bytes, r.prompt_cache.nbytes, len(r.in_batch) + len(r.single))
                for r in self._residents.values()
            },
        )

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        error = EngineDead(reason)
        for resident in self._residents.values():
            for seq in [*resident.in_batch.values(), *resident.single]:
                self._emit(seq.job, ErrorEvent(error))
        for pending in (*self._loads, *self._embeddings):
            _fail(pending.done, error)
        self._flush_events()
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command.kind == "generate":
                self._emit(command.payload, ErrorEvent(error))
            elif command.done is not None:
                _fail(command.done, error)
        self._flush_events()


def _record_prefill_rate(resident: _Resident, tokens: int, seconds: float) -> None:
    """Prompt tokens per second (smoothed): what sizes the next prefill or embedding slice."""
    if tokens >= 16 and seconds > 0:
        rate = tokens / seconds
        resident.prefill_rate = rate if resident.prefill_rate is None else 0.5 * (resident.prefill_rate + rate)


def _embed_slice(body: Any, chunk: list[list[int]], width: int) -> list[list[float]]:
    """Mean-pooled, L2-normalised final hidden states; right padding is masked out
    (causal attention keeps it from touching the real tokens)."""
    tokens = mx.array([t + [0] * (width - len(t)) for t in chunk])
    lengths = mx.array([len(t) for t in chunk])[:, None]
    hidden = body(tokens).astype(mx.float32)
    mask = (mx.arange(width)[None, :] < lengths)[..., None]
    pooled = (hidden * mask).sum(axis=1) / lengths
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled.tolist()


def _deliver(items: list[tuple[GenerationJob, Event]]) -> None:
    for job, event in items:
        job.queue.put_nowait(event)


def _resolve(done: Future | None, result: Any) -> None:
    if done is not None and not done.done():
        done.set_result(result)


def _fail(done: Future | None, error: BaseException) -> None:
    if done is not None and not done.done():
        done.set_exception(error)


def _generation_error(error: BaseException) -> MlxServerError:
    if isinstance(error, MlxServerError):
        return error
    if isinstance(error, MemoryError):
        return GenerationFailed("out of memory while generating")
    return GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
