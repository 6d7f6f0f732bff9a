"""What the engine reports besides text: logprobs, live KV bytes, the buffer-cache
limit, and the single stream's prompt cache after a turn that ends on EOS."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from engine_helpers import LONG, start_engine

from mlx_server.engine import Engine
from mlx_server.jobs import DoneEvent, GenerationRequest, TextEvent
from mlx_server.options import GenerationOptions


@pytest.fixture
async def engine(test_model):
    engine = await start_engine(test_model)
    yield engine
    await engine.stop()


GREEDY = GenerationOptions(temperature=0.0)
SEEDED = GenerationOptions(temperature=0.0, seed=1)  # greedy, on the single-stream path


async def events_of(engine, prompt: list[int], **kwargs) -> list:
    job = engine.generate(GenerationRequest(model="m", prompt=prompt, **kwargs))
    return [e async for e in job.events()]


def eos_after(n: int, eos: int):
    """A logits-processor factory that forces EOS once `n` tokens have been generated."""

    def make():
        calls = 0

        def processor(tokens, logits):
            nonlocal calls
            calls += 1
            if calls <= n:
                return logits
            return logits + mx.where(mx.arange(logits.shape[-1]) == eos, 0.0, -mx.inf)

        return processor

    return make


@pytest.mark.parametrize("options", [GREEDY, SEEDED], ids=["batched", "single"])
async def test_logprobs_come_with_the_text_one_per_generated_token(engine, options):
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode("Why is the sky blue?")
    events = await events_of(engine, prompt, max_tokens=10, options=options, logprobs=3)
    done = events[-1]
    entries = [lp for e in events if isinstance(e, TextEvent) for lp in e.logprobs]
    assert isinstance(done, DoneEvent) and [e.token_id for e in entries] == list(done.output_tokens)
    for entry in entries:
        assert entry.token == tokenizer.decode([entry.token_id]) and entry.logprob <= 0
        assert len(entry.top) == 3 and [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.top[0].token_id == entry.token_id and entry.top[0].logprob == pytest.approx(entry.logprob)  # greedy
    plain = await events_of(engine, prompt, max_tokens=10, options=options)
    assert all(e.logprobs == () for e in plain if isinstance(e, TextEvent))
    assert "".join(e.text for e in plain[:-1]) == "".join(e.text for e in events[:-1])
    bare = await events_of(engine, prompt, max_tokens=4, options=options, logprobs=0)
    assert [lp.top for e in bare if isinstance(e, TextEvent) for lp in e.logprobs] == [()] * 4


async def test_kv_bytes_count_the_live_sequences(engine):
    job = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode(LONG), max_tokens=100_000))
    seeded = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode(LONG), max_tokens=100_000, options=SEEDED))
    for j in (job, seeded):
        assert isinstance(await asyncio.wait_for(j.queue.get(), 60), TextEvent)
    await asyncio.sleep(0.2)
    assert engine.stats.models["m"].kv_bytes > 0 and engine.stats.models["m"].sequences == 2
    job.cancel()
    seeded.cancel()
    for j in (job, seeded):
        _ = [e async for e in j.events()]
    deadline = asyncio.get_running_loop().time() + 5
    while engine.stats.models["m"].sequences and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert engine.stats.models["m"].kv_bytes == 0


async def test_the_buffer_cache_limit_is_set_on_the_engine_thread():
    original = mx.set_cache_limit(0)
    mx.set_cache_limit(original)
    engine = Engine(cache_limit_bytes=12_345_678)
    engine.start()
    await engine.started()
    try:
        assert mx.set_cache_limit(original) == 12_345_678
    finally:
        mx.set_cache_limit(original)
        await engine.stop()


async def test_a_single_stream_ending_on_eos_keeps_a_cache_that_matches_its_key(engine, test_model):
    """generate_step computes the EOS's keys and values before yielding it: the cache
    holds it, so its key must too; the next turn then equals the same turn served cold."""
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode(LONG * 2)
    first = await events_of(engine, prompt, max_tokens=50, options=SEEDED, logits_processor=eos_after(5, eos))
    done = first[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "stop" and done.completion_tokens == 5
    (entry,) = [e for e in engine._runners["m"].prompt_cache.entries.values() if len(e.tokens) > len(prompt)]
    assert list(entry.tokens) == prompt + list(done.output_tokens) + [eos]
    assert all(c.offset == len(entry.tokens) for c in entry.cache)
    turn = entry.tokens.tolist() + tokenizer.encode(" And what next?")
    warm = await events_of(engine, turn, max_tokens=8, options=SEEDED)
    assert warm[-1].cached_tokens == len(entry.tokens)
    await engine.unload("m")
    await engine.load("m", test_model, tokenizer, batch_size=8, prompt_cache_bytes=64 << 20)
    cold = await events_of(engine, turn, max_tokens=8, options=SEEDED)
    assert cold[-1].cached_tokens == 0 and cold[-1].output_tokens == warm[-1].output_tokens
