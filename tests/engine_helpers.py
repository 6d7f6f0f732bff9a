"""Shared by the engine's tests: an engine with the test model loaded as "m", and a runner."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.engine import Engine
from mlx_server.jobs import GenerationRequest, TextEvent

LONG = "The quick brown fox jumps over the lazy dog while the server streams tokens."


async def start_engine(model: Path) -> Engine:
    """A started engine with `model` loaded as "m"; its tokenizer rides along as `engine.tokenizer`."""
    engine = Engine()
    engine.start()
    await engine.started()
    tokenizer = load_tokenizer(model)
    await engine.load("m", model, tokenizer, batch_size=8, prompt_cache_bytes=64 << 20)
    engine.tokenizer = tokenizer
    return engine


async def run(engine: Engine, prompt: str, **kwargs):
    """(text, last event) of one generation."""
    job = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode(prompt), **kwargs))
    events = [e async for e in job.events()]
    return "".join(e.text for e in events if isinstance(e, TextEvent)), events[-1]
