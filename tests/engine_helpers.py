"""Shared by the engine's tests: an engine with the test model loaded as "m", and a runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.engine import Engine
from mlx_server.jobs import GenerationRequest, TextEvent

LONG = "The quick brown fox jumps over the lazy dog while the server streams tokens."


async def start_engine(model: Path, *, prompt_cache_bytes: int = 64 << 20, **engine_options) -> Engine:
    """A started engine with `model` loaded as "m"; its tokenizer and LoadedWeights ride along
    as `engine.tokenizer` and `engine.weights`."""
    engine = Engine(**engine_options)
    engine.start()
    await engine.started()
    tokenizer = load_tokenizer(model)
    engine.weights = await engine.load("m", model, tokenizer, batch_size=8, prompt_cache_bytes=prompt_cache_bytes)
    engine.tokenizer = tokenizer
    return engine


async def run(engine: Engine, prompt: str, **kwargs):
    """(text, last event) of one generation."""
    job = engine.generate(GenerationRequest(model="m", prompt=engine.tokenizer.encode(prompt), **kwargs))
    events = [e async for e in job.events()]
    return "".join(e.text for e in events if isinstance(e, TextEvent)), events[-1]


def fail_nth_call(monkeypatch, owner: type, name: str, n: int, error: BaseException) -> Callable[[], None]:
    """`owner.name` raises `error` on its `n`-th call (a fault at a chosen step); returns
    what puts the original back."""
    original = getattr(owner, name)
    calls = 0

    def failing(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return lambda: monkeypatch.setattr(owner, name, original)
