"""Engine faults, each failing only what it belongs to; the engine dying; sliced
single-stream prefill; the single stream's prompt cache after EOS; logprobs; KV bytes."""

from __future__ import annotations

import asyncio
import ctypes
import time

import pytest
from engine_helpers import LONG, fail_nth_call, run, start_engine

from mlx_server.engine import Engine
from mlx_server.engine.prompt_cache import PromptCache
from mlx_server.engine.sequence import Sequence
from mlx_server.engine.single import SingleStream
from mlx_server.errors import EngineDead
from mlx_server.jobs import DoneEvent, ErrorEvent, GenerationRequest, TextEvent
from mlx_server.options import GenerationOptions


@pytest.fixture
async def engine(test_model):
    engine = await start_engine(test_model)
    yield engine
    await engine.stop()


SEEDED = GenerationOptions(temperature=0.0, seed=1)  # greedy, but on the single-stream path


class FakePanic(BaseException):
    """Like pyo3's PanicException (a Rust panic, e.g. from llguidance): not an Exception."""


def failing_processor(error: BaseException, after: int = 2):
    """A logits-processor factory whose processor raises `error` on its `after`+1-th call."""

    def make():
        calls = 0

        def processor(tokens, logits):
            nonlocal calls
            calls += 1
            if calls > after:
                raise error
            return logits

        return processor

    return make


async def settled(engine: Engine) -> bool:
    """Whether the model's live sequences drop to none (stats are published every 50 ms)."""
    deadline = time.monotonic() + 5
    while engine.stats.models["m"].sequences and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return engine.stats.models["m"].sequences == 0


def kill_engine_thread(engine: Engine) -> None:
    """Raise SystemExit inside the engine thread, wherever it is: something no guard may swallow."""
    ident = ctypes.c_ulong(engine._thread.ident)
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ident, ctypes.py_object(SystemExit)) == 1


@pytest.mark.parametrize(
    "error",
    [FakePanic("called `Option::unwrap()` on a `None` value"), RuntimeError("[metal::malloc] Resource limit exceeded")],
    ids=["panic", "mlx-error"],
)
async def test_a_failing_logits_processor_fails_its_sequence_and_three_of_four_finish(engine, error):
    prompts = [f"prompt number {i}" for i in range(4)]
    alone = [await run(engine, p, max_tokens=12) for p in prompts[1:]]
    results = await asyncio.gather(
        run(engine, prompts[0], max_tokens=12, logits_processor=failing_processor(error)),
        *(run(engine, p, max_tokens=12) for p in prompts[1:]),
    )
    failed = results[0][1]
    assert isinstance(failed, ErrorEvent) and type(error).__name__ in failed.error.message
    for (text, done), (text_alone, _) in zip(results[1:], alone):
        assert isinstance(done, DoneEvent) and done.completion_tokens == 12 and text == text_alone
    _, seeded = await run(engine, "seeded", max_tokens=12, options=SEEDED, logits_processor=failing_processor(error))
    assert isinstance(seeded, ErrorEvent) and type(error).__name__ in seeded.error.message
    assert engine.alive and await settled(engine)


async def test_an_exception_in_token_handling_fails_only_its_sequence(engine, monkeypatch):
    original = Sequence.take

    def take(self, token, logprobs, finish, eos_ids):
        if self.job.request.max_tokens == 33 and len(self.tokens) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return original(self, token, logprobs, finish, eos_ids)

    monkeypatch.setattr(Sequence, "take", take)
    results = await asyncio.gather(
        run(engine, "bad tokens", max_tokens=33),
        run(engine, "bad seeded tokens", max_tokens=33, options=SEEDED),
        *(run(engine, f"good {i}", max_tokens=10) for i in range(2)),
        run(engine, "good seeded", max_tokens=10, options=SEEDED),
    )
    assert all(isinstance(d, ErrorEvent) and "UnicodeDecodeError" in d.error.message for _, d in results[:2])
    assert all(isinstance(d, DoneEvent) and d.completion_tokens == 10 for _, d in results[2:])
    assert engine.alive


async def test_a_batch_step_that_raises_a_base_exception_fails_that_batch_only(engine, monkeypatch):
    from mlx_lm.generate import BatchGenerator

    fail_nth_call(monkeypatch, BatchGenerator, "next", 4, FakePanic("simulated panic in a batch step"))
    # Two unseeded requests share the batch (one alone would run on its single stream).
    *batched, seeded = await asyncio.gather(*(run(engine, f"batched {i}", max_tokens=20) for i in range(2)), run(engine, "seeded", max_tokens=20, options=SEEDED))
    assert all(isinstance(b[1], ErrorEvent) and "FakePanic" in b[1].error.message for b in batched)
    assert isinstance(seeded[1], DoneEvent) and seeded[1].completion_tokens == 20
    _, after = await run(engine, "after", max_tokens=5)
    assert isinstance(after, DoneEvent) and engine.alive


async def test_a_failing_prompt_cache_insert_leaves_the_answer_whole(engine, monkeypatch):
    def broken(self, tokens, cache):
        raise RuntimeError("simulated")

    monkeypatch.setattr(PromptCache, "insert", broken)
    for options in (GenerationOptions(temperature=0.0), SEEDED):
        _, done = await run(engine, LONG, max_tokens=6, options=options)
        assert isinstance(done, DoneEvent) and done.completion_tokens == 6
    assert engine.alive


async def test_when_the_engine_thread_dies_every_job_fails_at_once_and_new_ones_are_refused(engine):
    jobs = [engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode(f"stream {i}"), max_tokens=100_000, options=o))
            for i, o in enumerate((GenerationOptions(temperature=0.0), SEEDED))]
    for job in jobs:
        assert isinstance(await asyncio.wait_for(job.queue.get(), 60), TextEvent)
    died = asyncio.ensure_future(engine.died())
    kill_engine_thread(engine)
    assert "SystemExit" in await asyncio.wait_for(died, 10)
    for job in jobs:
        events = [e async for e in job.events()]
        assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, EngineDead)
    assert not engine.alive
    with pytest.raises(EngineDead):
        engine.generate(GenerationRequest(model="m", prompt=[1, 2, 3], max_tokens=4))
    with pytest.raises(EngineDead):
        await asyncio.wait_for(engine.embed("m", [[1, 2, 3]]), 1)
    assert "SystemExit" in await asyncio.wait_for(engine.died(), 1)  # asked after the fact


async def test_a_job_queued_while_the_engine_dies_gets_an_error_not_a_hang(engine):
    """generate() used to check `alive`, then queue: a job queued after the dying thread
    had drained its inbox waited forever. The queue is held here across that moment."""

    class SlowInbox:
        def __init__(self, inner):
            self.inner = inner

        def put(self, command):
            kill_engine_thread(engine)
            time.sleep(1.0)  # the thread dies (and drains what it can) meanwhile
            self.inner.put(command)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine._inbox = SlowInbox(engine._inbox)
    try:
        job = engine.generate(GenerationRequest(model="m", prompt=[1, 2, 3], max_tokens=4))
    except EngineDead:
        return  # refused at once: as good
    event = await asyncio.wait_for(job.queue.get(), 10)
    assert isinstance(event, ErrorEvent) and isinstance(event.error, EngineDead)


async def test_a_seeded_long_prompt_is_prefilled_in_slices_while_another_stream_runs(engine, monkeypatch):
    slices: list[tuple[int, float, float]] = []  # (tokens, start, end)
    original = SingleStream.prefill

    def timed(self, budget):
        start = time.perf_counter()
        ran = original(self, budget)
        slices.append((ran, start, time.perf_counter()))
        return ran

    stream = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode("keep streaming"), max_tokens=100_000))
    arrivals: list[float] = []

    async def watch():
        async for event in stream.events():
            arrivals.append(time.perf_counter())

    watcher = asyncio.ensure_future(watch())
    while len(arrivals) < 3:
        await asyncio.sleep(0.01)
    monkeypatch.setattr(SingleStream, "prefill", timed)  # the other stream (a lone one: single too) is past its prompt
    long_prompt = engine.tokenizer.encode(LONG * 40)
    assert len(long_prompt) > 500
    job = engine.generate(GenerationRequest(model="m", prompt=long_prompt, max_tokens=2, options=SEEDED))
    events = [e async for e in job.events()]
    stream.cancel()
    await watcher
    assert isinstance(events[-1], DoneEvent) and events[-1].prompt_tokens == len(long_prompt)
    assert sum(n for n, _, _ in slices) == len(long_prompt) - 1 and len(slices) >= 5
    first, last = slices[0][1], slices[-1][2]
    during = [t for t in arrivals if first <= t <= last]
    assert len(during) >= len(slices) // 2  # the other stream kept getting tokens between slices
    gaps = [b - a for a, b in zip([first, *during], [*during, last])]
    prefill_seconds = sum(end - start for _, start, end in slices)
    # One slice is ~PREFILL_SLICE_SECONDS of prefill; unsliced, the gap would be the whole prefill.
    assert max(gaps) < prefill_seconds / 3, (max(gaps), prefill_seconds, len(slices))
