"""The engine thread on the real test model: batching, stops, cancel, seeds, faults, memory."""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_helpers import LONG, fail_nth_call, run, start_engine

from mlx_server.engine import libs
from mlx_server.engine.prompt_cache import PromptCache
from mlx_server.engine.stops import StopMatcher
from mlx_server.jobs import DoneEvent, ErrorEvent, GenerationRequest
from mlx_server.options import GenerationOptions


@pytest.fixture
async def engine(test_model):
    engine = await start_engine(test_model)
    yield engine
    await engine.stop()


async def test_greedy_generation_is_deterministic_and_counts_tokens(engine):
    text1, done1 = await run(engine, LONG, max_tokens=24)
    text2, done2 = await run(engine, LONG, max_tokens=24)
    assert isinstance(done1, DoneEvent) and done1.finish_reason == "length"
    assert done1.completion_tokens == 24 and len(done1.output_tokens) == 24
    assert text1 == text2 and text1 == engine.tokenizer.decode(list(done1.output_tokens))
    assert done1.cached_tokens == 0 and done2.cached_tokens == done2.prompt_tokens - 1  # all but the last prompt token reused
    assert done1.prompt_tokens == len(engine.tokenizer.encode(LONG)) > 16


async def test_concurrent_requests_are_batched_and_all_complete(engine):
    results = await asyncio.gather(*(run(engine, f"prompt number {i}", max_tokens=16 + i) for i in range(10)))
    assert [d.completion_tokens for _, d in results] == [16 + i for i in range(10)]
    greedy_alone, _ = await run(engine, "prompt number 3", max_tokens=19)
    assert results[3][0] == greedy_alone  # batching does not change a greedy answer


async def test_stop_strings_end_generation_and_are_not_emitted(engine):
    full, _ = await run(engine, "Tell me", max_tokens=40)
    stop = full[12:15]
    assert len(stop) == 3
    text, done = await run(engine, "Tell me", max_tokens=40, options=GenerationOptions(temperature=0, stop=(stop,)))
    assert done.finish_reason == "stop"
    assert stop not in text and full.startswith(text) and len(text) == full.index(stop)


def test_stop_matcher_holds_back_partial_matches():
    libs.import_mlx()
    m = StopMatcher(("END",))
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X") == ("ENX", False)
    assert m.feed("yyEN") == ("yy", False)
    assert m.feed("Dzz") == ("", True)
    m = StopMatcher(("</s>", "\n\n"))
    assert m.feed("a\n") == ("a", False)
    assert m.feed("b") == ("\nb", False)
    assert m.feed("<") == ("", False)
    assert m.flush() == "<"


async def test_seeded_sampling_repeats_and_differs_by_seed(engine):
    hot = dict(max_tokens=24)
    a, _ = await run(engine, "Seeds", options=GenerationOptions(temperature=1.0, seed=7), **hot)
    b, _ = await run(engine, "Seeds", options=GenerationOptions(temperature=1.0, seed=7), **hot)
    c, _ = await run(engine, "Seeds", options=GenerationOptions(temperature=1.0, seed=8), **hot)
    assert a == b and a != c


async def test_cancel_stops_a_sequence_within_a_step(engine):
    job = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode("long"), max_tokens=100_000))
    seen = 0
    async for event in job.events():
        seen += 1
        if seen == 3:
            job.cancel()
    assert isinstance(event, DoneEvent) and event.finish_reason == "cancelled"  # the stream ends, nobody hangs
    deadline = time.monotonic() + 2
    while engine.stats.models["m"].sequences and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.stats.models["m"].sequences == 0


async def test_an_mlx_error_in_a_step_fails_those_requests_not_the_engine(engine, monkeypatch):
    from mlx_lm.generate import BatchGenerator

    restore = fail_nth_call(monkeypatch, BatchGenerator, "next", 3, MemoryError("simulated"))
    # Two requests share the batch (one alone would run on its single stream).
    results = await asyncio.gather(run(engine, "boom", max_tokens=50), run(engine, "boom too", max_tokens=50))
    assert all(isinstance(last, ErrorEvent) and "out of memory" in last.error.message for _, last in results)
    restore()
    text, done = await run(engine, "after", max_tokens=8)
    assert isinstance(done, DoneEvent) and done.completion_tokens == 8 and engine.alive


async def test_unknown_model_and_context_errors_are_events(engine):
    job = engine.generate(GenerationRequest(model="nope", prompt=[1, 2], max_tokens=4))
    events = [e async for e in job.events()]
    assert isinstance(events[-1], ErrorEvent) and "not loaded" in events[-1].error.message


async def test_embeddings_are_normalised_deterministic_and_hidden_sized(engine):
    ids = [engine.tokenizer.encode(t) for t in ("hello", "a longer sentence about memory", "hello")]
    vectors = await engine.embed("m", ids)
    assert len(vectors) == 3 and all(len(v) == 256 for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-4 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    alone = await engine.embed("m", ids[:1])
    assert alone[0] == pytest.approx(vectors[0], abs=1e-5)


async def test_unload_returns_the_memory(engine, test_model):
    weights = sum(f.stat().st_size for f in test_model.glob("*.safetensors"))
    freed = await engine.unload("m")
    await asyncio.sleep(0.6)  # stats are published on the engine's idle tick
    assert freed >= 0.9 * weights
    assert engine.stats.active_memory < 0.1 * weights and engine.stats.models == {}
    job = engine.generate(GenerationRequest(model="m", prompt=[1, 2, 3], max_tokens=4))
    events = [e async for e in job.events()]
    assert isinstance(events[-1], ErrorEvent)


async def test_prompt_cache_reuses_shared_prefixes_only_when_worth_it(engine):
    system = LONG * 3
    _, first = await run(engine, system + " First question?", max_tokens=8)
    _, second = await run(engine, system + " A different question?", max_tokens=8)
    shared = len(engine.tokenizer.encode(system))
    assert first.cached_tokens == 0
    assert shared - 2 <= second.cached_tokens < second.prompt_tokens  # the common prefix, nothing more
    _, short = await run(engine, "Tiny", max_tokens=4)
    _, short_again = await run(engine, "Tiny", max_tokens=4)
    assert short_again.cached_tokens == 0  # a few tokens are not worth copying a cache for


def test_prompt_cache_is_bounded_and_drops_covered_prefixes(monkeypatch):
    class FakeCache:
        def __init__(self, tokens, nbytes):
            self.offset, self.nbytes = tokens, nbytes

        def is_trimmable(self):
            return True

        def trim(self, n):
            self.offset -= n
            return n

    class FakeCacheModule:
        @staticmethod
        def can_trim_prompt_cache(cache):
            return all(c.is_trimmable() for c in cache)

        @staticmethod
        def trim_prompt_cache(cache, n):
            return [c.trim(n) for c in cache][0]

    monkeypatch.setattr(libs, "lm_cache", FakeCacheModule)
    cache = PromptCache(max_bytes=1000, max_entries=3)
    cache.insert(list(range(40)), [FakeCache(40, 100)])
    cache.insert(list(range(60)), [FakeCache(60, 150)])  # extends the first: the first goes
    assert cache.nbytes == 150 and len(cache.entries) == 1
    found, rest = cache.fetch(list(range(50)) + [999])
    assert found[0].offset == 50 and rest == [999]
    for i in range(4):
        cache.insert([1000 + i] * 30, [FakeCache(30, 100)])
    assert len(cache.entries) == 3 and cache.nbytes == 300  # bounded by count, LRU first
    cache.insert([7] * 30, [FakeCache(30, 5000)])  # larger than the whole budget: not kept
    assert cache.nbytes == 300


async def test_an_embedding_job_runs_in_slices_between_decode_steps(engine):
    texts = [engine.tokenizer.encode(f"short text {i}") for i in range(160)]  # ten slices of 16
    job = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode("stream"), max_tokens=100_000))
    arrivals = 0
    embedding = asyncio.ensure_future(engine.embed("m", texts))
    async for _ in job.events():
        arrivals += 1
        if embedding.done():
            break
    job.cancel()
    vectors = await embedding
    assert len(vectors) == 160 and vectors[1] == pytest.approx((await engine.embed("m", texts[1:2]))[0], abs=1e-5)
    assert arrivals > 3  # tokens kept flowing while the embeddings were computed


async def test_a_cancelled_embedding_job_is_dropped(engine):
    texts = [engine.tokenizer.encode(LONG * 6) for _ in range(200)]
    embedding = asyncio.ensure_future(engine.embed("m", texts))
    await asyncio.sleep(0.05)
    embedding.cancel()
    _, done = await run(engine, "after", max_tokens=4)
    assert isinstance(done, DoneEvent) and not engine._embeddings
