"""The engine's disk prompt cache writes behind: never while a stream runs, and
whatever still waits is saved when its model unloads."""

from __future__ import annotations

import asyncio

from engine_helpers import LONG, run, start_engine
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.engine import Engine
from mlx_server.engine.disk_tier import DISK_MIN_TOKENS
from mlx_server.jobs import DoneEvent, GenerationRequest, TextEvent


async def test_saves_wait_for_an_idle_engine_and_an_unload_keeps_them(test_model, tmp_path):
    engine = await start_engine(test_model, disk_cache_gb=0.1, disk_cache_dir=tmp_path)
    tokenizer = engine.tokenizer
    try:
        streaming = engine.generate(GenerationRequest(model="m", prompt=tokenizer.encode("keep going"), max_tokens=100_000))
        assert isinstance(await asyncio.wait_for(streaming.queue.get(), 60), TextEvent)
        prompt = tokenizer.encode(LONG * 48)
        assert len(prompt) > DISK_MIN_TOKENS
        job = engine.generate(GenerationRequest(model="m", prompt=prompt, max_tokens=4))
        events = [e async for e in job.events()]
        assert isinstance(events[-1], DoneEvent)
        await asyncio.sleep(0.5)  # many engine turns, none of them idle
        assert not list(tmp_path.rglob("*.safetensors"))
        assert len(engine._runners["m"].disk.pending) == 1
        await engine.unload("m")  # fails the running stream, then saves what waits
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    finally:
        await engine.stop()


async def test_an_unusable_cache_directory_is_logged_and_the_engine_runs_without(test_model, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    engine = Engine(disk_cache_gb=0.1, disk_cache_dir=blocker / "prompts")
    engine.start()
    await engine.started()
    try:
        tokenizer = load_tokenizer(test_model)
        await engine.load("m", test_model, tokenizer, batch_size=8, prompt_cache_bytes=64 << 20)
        job = engine.generate(GenerationRequest(model="m", prompt=tokenizer.encode(LONG), max_tokens=4))
        events = [e async for e in job.events()]
        assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 4
        assert engine._runners["m"].disk is None
        assert "disk prompt cache in" in caplog.text and "running without it" in caplog.text
    finally:
        await engine.stop()


async def test_a_prompt_past_the_floor_is_saved_and_one_under_it_is_not(test_model, tmp_path):
    """A few hundred tokens make a file (the old fixed threshold was 1,024), weighed with
    the model's measured prefill rate; the floor is the engine's `disk_cache_min_tokens`."""
    engine = await start_engine(test_model, disk_cache_gb=0.1, disk_cache_dir=tmp_path, disk_cache_min_tokens=250)
    try:
        runner = engine._runners["m"]
        await run(engine, LONG * 8, max_tokens=2)  # 192 prompt tokens
        await asyncio.sleep(0.7)  # idle turns: anything queued is written
        assert not list(tmp_path.rglob("*.safetensors")) and runner.disk.prefill_rate == runner.prefill_rate
        await run(engine, LONG * 12, max_tokens=2)  # 288
        await asyncio.sleep(0.7)
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1
        assert runner.disk.prefill_rate is not None and engine._disk.read_rate > 0  # a write measures the disk
    finally:
        await engine.stop()
