"""What the engine keeps of finished sequences is counted and given back (issue 26):
saves queued for the disk count in the model's prompt-cache bytes, `shrink_caches`
frees them for the manager, and a batch's KV is the padded rectangle the manager
reserves (the caches' own `nbytes`)."""

from __future__ import annotations

import asyncio
import json

from engine_helpers import LONG, run, start_engine

from mlx_server.engine.disk_tier import DISK_MIN_TOKENS
from mlx_server.jobs import GenerationRequest, TextEvent
from mlx_server.ledger import kv_layout


def model_stats(engine):
    return engine.stats.models["m"]


async def test_a_save_waiting_for_the_disk_counts_and_is_written_when_memory_is_asked_for(test_model, tmp_path):
    # an in-memory prompt cache too small for the long prompt: only the disk queue holds it
    engine = await start_engine(test_model, prompt_cache_bytes=64 << 10, disk_cache_gb=0.1, disk_cache_dir=tmp_path)
    tokenizer = engine.tokenizer
    try:
        streaming = engine.generate(GenerationRequest(model="m", prompt=tokenizer.encode("keep going"), max_tokens=100_000))
        assert isinstance(await asyncio.wait_for(streaming.queue.get(), 60), TextEvent)  # the engine is never idle
        prompt = tokenizer.encode(LONG * 48)
        assert len(prompt) > DISK_MIN_TOKENS
        _ = [e async for e in engine.generate(GenerationRequest(model="m", prompt=prompt, max_tokens=4)).events()]
        await asyncio.sleep(0.2)
        runner = engine._runners["m"]
        (queued,) = runner.disk.pending
        assert runner.prompt_cache.nbytes == 0 and queued.nbytes > 100_000
        assert model_stats(engine).prompt_cache_bytes == queued.nbytes  # before: 0, invisible to the ledger
        assert await engine.shrink_caches(1) == queued.nbytes
        assert model_stats(engine).prompt_cache_bytes == 0 and not runner.disk.pending
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # spilled, not lost
        streaming.cancelled.set()
    finally:
        await engine.stop()


async def test_shrinking_drops_the_coldest_prompt_cache_entries_first(test_model):
    engine = await start_engine(test_model)
    try:
        for i in range(3):
            await run(engine, f"{i} {LONG * 4}", max_tokens=2)
        await asyncio.sleep(0.7)  # an idle engine publishes its figures every IDLE_WAIT
        cache = engine._runners["m"].prompt_cache
        sizes = [entry.nbytes for entry in cache.entries.values()]
        assert len(sizes) == 3 and model_stats(engine).prompt_cache_bytes == sum(sizes)
        newest = list(cache.entries)[-1]
        assert await engine.shrink_caches(1) == sizes[0]  # one entry, the oldest
        assert await engine.shrink_caches(sizes[1] + 1) == sizes[1] + sizes[2]
        assert model_stats(engine).prompt_cache_bytes == 0 and newest not in cache.entries
        assert engine.stats.cache_drops["m"] == 3 and engine.stats.cache_spills.get("m", 0) == 0  # no disk tier
        assert await engine.shrink_caches(1 << 30) == 0
        text, done = await run(engine, "still serving", max_tokens=3)
        assert done.completion_tokens == 3
    finally:
        await engine.stop()


async def test_a_batch_allocates_its_rows_at_the_longest_context_as_the_manager_reserves(test_model):
    """One long request and three short ones in one batch: the caches' own nbytes exceed
    the sum of what each request alone needs (the old reservation) and stay within rows x
    the longest context (the manager's)."""
    layout = kv_layout(json.loads((test_model / "config.json").read_text()))
    engine = await start_engine(test_model)
    try:
        tokenizer = engine.tokenizer
        long_prompt = tokenizer.encode(LONG * 60)
        long = engine.generate(GenerationRequest(model="m", prompt=long_prompt, max_tokens=400))
        assert isinstance(await asyncio.wait_for(long.queue.get(), 60), TextEvent)
        short_prompts = [tokenizer.encode(f"short {i}") for i in range(3)]
        shorts = [engine.generate(GenerationRequest(model="m", prompt=p, max_tokens=40)) for p in short_prompts]
        contexts = [len(long_prompt) + 400] + [len(p) + 40 for p in short_prompts]
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, model_stats(engine).kv_bytes)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        for job in shorts:
            _ = [e async for e in job.events()]
        sampler.cancel()
        long.cancel()
        _ = [e async for e in long.events()]
        separately = sum(layout.bytes_for(c) for c in contexts)
        rectangle = len(contexts) * layout.bytes_for(max(contexts))
        assert separately < peak <= rectangle, (separately, peak, rectangle)
    finally:
        await engine.stop()



async def test_a_long_entry_given_back_is_spilled_to_the_disk_tier(test_model, tmp_path):
    engine = await start_engine(test_model, disk_cache_gb=0.1, disk_cache_dir=tmp_path)
    try:
        prompt = engine.tokenizer.encode(LONG * 48)
        _ = [e async for e in engine.generate(GenerationRequest(model="m", prompt=prompt, max_tokens=2)).events()]
        kept = engine._runners["m"].prompt_cache.nbytes
        assert await engine.shrink_caches(1) == kept
        assert engine.stats.cache_spills["m"] == 1 and engine.stats.cache_drops.get("m", 0) == 0
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1
        text, done = await run(engine, LONG * 48, max_tokens=2)  # served from the disk now
        assert done.completion_tokens == 2 and engine._runners["m"].prompt_cache.nbytes > 0
    finally:
        await engine.stop()
