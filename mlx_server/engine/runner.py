"""One resident model's generation: its batch, its single streams, their failures.

A lone request runs on a single stream (single.py), at mlx_lm's generate_step speed;
when a second unseeded request arrives, the lone one moves into the model's
BatchGenerator with its KV cache and its already-sampled token, and both go on
batched. Seeded requests, and every request of a model whose caches cannot merge,
keep single streams of their own.

Each engine iteration gives every busy runner one `step`: one BatchGenerator step
(a prefill slice and/or one token for each batched sequence), then one prefill slice
or one token for each single stream. A failure fails only what it belongs to: a
logits processor or a token's handling fails its own sequence; a batch step that
raises fails the sequences of that batch; nothing here ends the engine thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import GenerationFailed, MlxServerError
from ..jobs import ErrorEvent, GenerationJob
from . import libs
from .disk_tier import DiskTier
from .faults import FATAL, generation_error
from .memory import cache_nbytes, return_memory
from .outbox import Outbox
from .prompt_cache import PromptCache
from .sampling import GuardedProcessors, logits_processors, sampler_for
from .sequence import LogprobRecorder, Sequence
from .single import SingleStream
from .stats import CacheShrunk, ModelStats
from .stops import StopMatcher

log = logging.getLogger("mlx_server.engine")

PREFILL_STEP = 1024  # tokens per prefill chunk when nothing else is decoding
PREFILL_SLICE_SECONDS = 0.25  # otherwise: the longest one chunk may hold back other streams
PREFILL_FIRST_GUESS = 128  # chunk size before this model's prefill speed is known
MIN_PREFILL_SLICE = 32


class ModelRunner:
    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        *,
        weights_bytes: int,
        batch_size: int,
        prompt_cache_bytes: int,
        outbox: Outbox,
        disk: DiskTier | None = None,
    ):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.weights_bytes = weights_bytes
        self.batch_size = batch_size
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.outbox = outbox
        self.disk = disk  # prompt caches on disk, when the engine keeps them and this model has an identity
        self.batchable = all(hasattr(c, "merge") for c in libs.lm_cache.make_prompt_cache(model))
        self.batch: Any = None  # mlx_lm BatchGenerator, created on first use
        self.prefill_rate: float | None = None  # prompt tokens per second, measured
        self.in_batch: dict[int, Sequence] = {}
        self.single: list[Sequence] = []
        self.lone: Sequence | None = None  # the unseeded single stream that moves into the batch when company comes
        self.single_tokens = 0  # tokens decoded on each path (counters: they only go up)
        self.batched_tokens = 0

    def busy(self) -> bool:
        return bool(self.in_batch or self.single)

    def decoding(self) -> bool:
        """Some sequence is past its prompt: prefill must leave it room."""
        return any(s.first_token_at is not None for s in (*self.in_batch.values(), *self.single))

    def cached_bytes(self) -> int:
        """Finished sequences' KV it keeps: the prompt cache, and the saves queued for the disk
        that the prompt cache does not hold too (one too large for it, or dropped since)."""
        if self.disk is None:
            return self.prompt_cache.nbytes
        kept = {id(entry.cache) for entry in self.prompt_cache.entries.values()}
        return self.prompt_cache.nbytes + sum(save.nbytes for save in self.disk.pending if id(save.cache) not in kept)

    def shrink_cache(self, nbytes: int) -> CacheShrunk:
        """Give back up to `nbytes` of `cached_bytes`. The queued disk saves are written out
        first, then the coldest entries go: spilled to the disk tier (their prefix is served
        from there), or dropped where it is off or they are too short to be worth a file."""
        before = self.cached_bytes()
        if self.disk is not None:
            self.disk.save_all()
        spilled = dropped = 0
        for entry in self.prompt_cache.shrink(nbytes - (before - self.cached_bytes())):
            if self.disk is not None and self.disk.spill(entry.tokens.tolist(), entry.cache):
                spilled += 1
            else:
                dropped += 1
        return CacheShrunk(before - self.cached_bytes(), spilled, dropped)

    def stats(self) -> ModelStats:
        kv = self.batch.prompt_cache_nbytes if self.batch is not None else 0
        kv += sum(cache_nbytes(s.stream.cache) for s in self.single)
        return ModelStats(
            self.weights_bytes,
            self.cached_bytes(),
            len(self.in_batch) + len(self.single),
            kv,
            single_tokens=self.single_tokens,
            batched_tokens=self.batched_tokens,
        )

    # -- starting a sequence ----------------------------------------------------

    def insert(self, job: GenerationJob) -> None:
        request = job.request
        try:
            prompt = list(request.prompt)
            cache, rest = self.prompt_cache.fetch(prompt)
            if self.disk is not None:
                hit = self.disk.fetch(prompt, len(prompt) - len(rest))
                if hit is not None:
                    cache, rest = hit.cache, prompt[hit.reused :]
            processors = logits_processors(request)
            seq = Sequence(
                job=job,
                prompt=prompt,
                cached=len(prompt) - len(rest),
                detokenizer=self.tokenizer.detokenizer,
                stops=StopMatcher(request.options.stop),
                processors=GuardedProcessors(processors) if processors else None,
                logprobs=LogprobRecorder(self.tokenizer, request.logprobs) if request.logprobs is not None else None,
            )
            movable = self.batchable and request.options.seed is None
            if movable and (self.in_batch or self.lone is not None):
                if self.lone is not None:
                    with self._guard(self.lone):
                        self._move_to_batch(self.lone)
                self._insert_batched(seq, rest, cache, prompt[: seq.cached], request.max_tokens)
            else:
                if seq.processors is not None and len(prompt) > 1:
                    seq.processors.prefix = libs.mx.array(prompt[:-1])  # the stream itself starts at the last token
                cache = cache if cache is not None else libs.lm_cache.make_prompt_cache(self.model)
                seq.stream = SingleStream(self.model, rest, cache, sampler_for(request.options), seq.processors, request.max_tokens)
                self.single.append(seq)
                if movable:
                    self.lone = seq
        except FATAL:
            raise
        except BaseException as e:
            log.exception("could not start generation on '%s'", self.name)
            self.outbox.emit(job, ErrorEvent(GenerationFailed(f"generation failed: {type(e).__name__}: {e}")))

    def _insert_batched(self, seq: Sequence, rest: list[int], cache: list | None, held: list[int], max_tokens: int) -> None:
        """`cache` holds the keys and values of `held` (None: nothing yet); `rest` still goes through the model."""
        batch = self.batch or self._new_batch()
        (seq.uid,) = batch.insert(
            [rest],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[held],
            samplers=[sampler_for(seq.job.request.options)],
            logits_processors=[[seq.processors] if seq.processors else []],
        )
        self.in_batch[seq.uid] = seq

    def _move_to_batch(self, seq: Sequence) -> None:
        """The lone stream goes on in the batch from where it is, as if it had started there.

        Mid-prompt, the rest of its prompt is prefilled there. Decoding, its cache holds
        the prompt and every token handed out, and the token it sampled last is handed
        out now: the batch feeds that token first (as it feeds a prompt's last token)
        and samples the next one from it, so a greedy answer does not change.
        """
        stream: SingleStream = seq.stream
        self.single.remove(seq)
        self.lone = None
        seq.stream = None
        if seq.processors is not None:
            seq.processors.prefix = None  # the batch gives processors the whole context itself
        max_tokens = seq.job.request.max_tokens
        if not stream.decoding:
            rest = stream.pending + stream.last
            self._insert_batched(seq, rest, stream.cache, seq.prompt[: len(seq.prompt) - len(rest)], max_tokens)
            return
        held = seq.prompt + seq.tokens
        token, logprobs = stream.take_pending()
        if seq.fault is not None:  # a processor failed while sampling that token
            raise seq.fault
        self.single_tokens += 1
        finish = self._take_single(seq, token, logprobs)
        if finish is not None:
            self._keep_prompt(held, stream.cache)  # the last token was sampled, never fed
            self.outbox.emit(seq.job, seq.done(finish))
            return
        self._insert_batched(seq, [token], stream.cache, held, max_tokens - len(seq.tokens))

    def _new_batch(self) -> Any:
        self.batch = libs.lm_generate.BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=max(32, self.batch_size),
            prefill_batch_size=8,
            prefill_step_size=PREFILL_STEP,
        )
        return self.batch

    # -- one step ----------------------------------------------------------------

    def step(self, decoding: bool) -> None:
        """`decoding`: some stream of any model is past its prompt (prefill slices stay short)."""
        if self.in_batch:
            self._step_batch(decoding)
        for seq in list(self.single):
            self._step_single(seq, decoding)

    def prefill_budget(self, decoding: bool) -> int:
        """Prefill chunk size: as large as useful when nothing else is decoding,
        else what this model prefills in PREFILL_SLICE_SECONDS (no stream stalls long)."""
        if not decoding:
            return PREFILL_STEP
        if self.prefill_rate is None:
            return PREFILL_FIRST_GUESS
        return max(MIN_PREFILL_SLICE, min(PREFILL_STEP, int(self.prefill_rate * PREFILL_SLICE_SECONDS)))

    def record_prefill_rate(self, tokens: int, seconds: float) -> None:
        """Prompt tokens per second (smoothed): what sizes the next prefill or embedding slice."""
        if tokens >= 16 and seconds > 0:
            rate = tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else 0.5 * (self.prefill_rate + rate)

    def _step_batch(self, decoding: bool) -> None:
        cancelled = [seq for seq in self.in_batch.values() if seq.job.cancelled.is_set()]
        for seq in cancelled:
            with self._guard(seq):
                self._drop_batched(seq)
                self.outbox.emit(seq.job, seq.done("cancelled"))
        if not self.in_batch:
            return
        self.batch.prefill_step_size = self.prefill_budget(decoding)
        started = time.perf_counter()
        try:
            prompt_responses, responses = self.batch.next()
        except FATAL:
            raise
        except BaseException as e:  # an MLX error, MemoryError, a panic: this batch's sequences fail
            self._fail_batch(e)
            return
        self._measure_prefill(prompt_responses, time.perf_counter() - started)
        for seq in [s for s in self.in_batch.values() if s.fault is not None]:
            self._fail(seq, seq.fault)
        eos_ids = self.tokenizer.eos_token_ids
        self.batched_tokens += len(responses)
        for r in responses:
            seq = self.in_batch.get(r.uid)
            if seq is None:
                continue
            with self._guard(seq):
                event, finish = seq.take(r.token, r.logprobs, r.finish_reason, eos_ids)
                if event is not None:
                    self.outbox.emit(seq.job, event)
                if finish is not None:
                    self._finish_batched(seq, r)
                    self.outbox.emit(seq.job, seq.done(finish))

    def _measure_prefill(self, prompt_responses: list, seconds: float) -> None:
        processed = 0
        for r in prompt_responses:
            seq = self.in_batch.get(r.uid)
            if seq is not None:
                processed += r.progress[0] - seq.prefilled
                seq.prefilled = r.progress[0]
        self.record_prefill_rate(processed, seconds)

    def _finish_batched(self, seq: Sequence, response: Any) -> None:
        if response.finish_reason is None:  # ended by a stop string: still in the batch
            caches = self.batch.remove([seq.uid], return_prompt_caches=True)
            cache, tokens = caches.get(seq.uid, (None, None))
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        del self.in_batch[seq.uid]
        if cache is not None:
            self._keep_prompt(list(tokens), cache)

    def _step_single(self, seq: Sequence, decoding: bool) -> None:
        stream: SingleStream = seq.stream
        with self._guard(seq):
            if seq.job.cancelled.is_set():
                self._drop_single(seq)
                self.outbox.emit(seq.job, seq.done("cancelled"))
                return
            if stream.prefilling:
                started = time.perf_counter()
                ran = stream.prefill(self.prefill_budget(decoding))
                self.record_prefill_rate(ran, time.perf_counter() - started)
                return
            step = stream.next()
            if seq.fault is not None:
                raise seq.fault
            if step is None:
                finish = "length"
            else:
                self.single_tokens += 1
                finish = self._take_single(seq, *step)
            if finish is not None:
                self._drop_single(seq)
                # The cache holds the prompt, the tokens and, when it ended on EOS, the EOS.
                key = seq.prompt + seq.tokens + ([seq.eos] if seq.eos is not None else [])
                self._keep_prompt(key, stream.cache)
                self.outbox.emit(seq.job, seq.done(finish))

    def _take_single(self, seq: Sequence, token: int, logprobs: Any) -> str | None:
        """Hand out a single stream's token; returns why the sequence ended, if it did."""
        finish = None
        if token in self.tokenizer.eos_token_ids:
            finish = "stop"
        elif len(seq.tokens) + 1 >= seq.job.request.max_tokens:
            finish = "length"
        event, finish = seq.take(token, logprobs, finish, self.tokenizer.eos_token_ids)
        if event is not None:
            self.outbox.emit(seq.job, event)
        return finish

    def _keep_prompt(self, tokens: list[int], cache: list) -> None:
        """The answer is complete whether or not its cache is kept: a failure here is only logged."""
        try:
            self.prompt_cache.insert(tokens, cache)
            if self.disk is not None:
                self.disk.queue(tokens, cache, self.prefill_rate)
        except FATAL:
            raise
        except BaseException:
            log.exception("could not keep a prompt cache entry for '%s'", self.name)

    # -- failures ---------------------------------------------------------------------

    @contextmanager
    def _guard(self, seq: Sequence) -> Iterator[None]:
        """Whatever one sequence's handling raises fails that sequence only."""
        try:
            yield
        except FATAL:
            raise
        except BaseException as e:
            self._fail(seq, e)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        log.error("a sequence on '%s' failed: %s: %s", self.name, type(error).__name__, error, exc_info=None if isinstance(error, MlxServerError) else error)
        if seq.uid is not None:
            try:
                self._drop_batched(seq)
            except FATAL:
                raise
            except BaseException as e:  # the batch cannot even let go of it
                self.outbox.emit(seq.job, ErrorEvent(generation_error(error)))
                self._fail_batch(e)
                return
        else:
            self._drop_single(seq)
        self.outbox.emit(seq.job, ErrorEvent(generation_error(error)))

    def _drop_batched(self, seq: Sequence) -> None:
        if self.in_batch.pop(seq.uid, None) is not None and self.batch is not None:
            self.batch.remove([seq.uid])

    def _drop_single(self, seq: Sequence) -> None:
        if seq is self.lone:
            self.lone = None
        if seq in self.single:
            self.single.remove(seq)
            seq.stream.close()

    def _fail_batch(self, error: BaseException) -> None:
        log.error("batch step on '%s' failed: %s: %s", self.name, type(error).__name__, error)
        for seq in self.in_batch.values():
            self.outbox.emit(seq.job, ErrorEvent(generation_error(error)))
        self.in_batch.clear()
        if self.batch is not None:
            self.batch.close()
        self.batch = None
        return_memory()

    def close(self, error: MlxServerError) -> None:
        """Fail every sequence with `error` and drop the batch (unload, or the engine dying)."""
        for seq in [*self.in_batch.values(), *self.single]:
            self.outbox.emit(seq.job, ErrorEvent(error))
        for seq in self.single:
            seq.stream.close()
        self.in_batch.clear()
        self.single.clear()
        self.lone = None
        if self.batch is not None:
            self.batch.close()
        self.batch = None
        self.model = None
        self.prompt_cache = None
