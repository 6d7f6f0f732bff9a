"""A lone request on its single stream, and its move into the batch when a second
request arrives: the answer (tokens, logprobs, stops, length) is the one it would
have given alone, and the engine's per-path token counters show which path ran."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from engine_helpers import LONG, start_engine

from mlx_server.engine import Engine
from mlx_server.jobs import DoneEvent, GenerationRequest, TextEvent
from mlx_server.options import GenerationOptions

PROMPT = "Summarise the plan in one line: " + LONG
COMPANION = "Tell me"


@pytest.fixture
async def engine(test_model):
    engine = await start_engine(test_model)
    yield engine
    await engine.stop()


async def settled_stats(engine: Engine):
    """The model's stats once no sequence runs (snapshots are published every 50 ms)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = engine.stats.models["m"]
        if stats.sequences == 0:
            await asyncio.sleep(0.1)  # one more snapshot, taken after the last token
            return engine.stats.models["m"]
        await asyncio.sleep(0.02)
    raise AssertionError("sequences still running")


def request(engine: Engine, prompt: str, **kwargs) -> GenerationRequest:
    kwargs.setdefault("max_tokens", 48)
    return GenerationRequest(model="m", prompt=engine.tokenizer.encode(prompt), **kwargs)


async def collect(engine: Engine, req: GenerationRequest, *, company_after: int | None = None, company=None, cancel_after: int | None = None):
    """All events of `req`; after `company_after` text events, `company` (a request) is
    started beside it (its events are gathered too); after `cancel_after`, it is cancelled."""
    job = engine.generate(req)
    events, companion = [], None
    async for event in job.events():
        events.append(event)
        texts = sum(isinstance(e, TextEvent) for e in events)
        if company_after is not None and companion is None and texts >= company_after:
            companion = asyncio.ensure_future(collect(engine, company))
        if cancel_after is not None and texts >= cancel_after:
            job.cancel()
    other = await companion if companion is not None else None
    return events, other


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextEvent))


def logprobs_of(events):
    return [lp for e in events if isinstance(e, TextEvent) for lp in e.logprobs]


def late_substring(text: str) -> str:
    """Three characters first seen in the second half of `text`: a stop string met after the move."""
    for i in range(len(text) // 2, len(text) - 3):
        if text.index(text[i : i + 3]) >= len(text) // 2:
            return text[i : i + 3]
    raise AssertionError(f"no late substring in {text!r}")


async def test_a_lone_request_decodes_on_its_single_stream_not_the_batch(engine):
    before = await settled_stats(engine)
    events, _ = await collect(engine, request(engine, PROMPT))
    done = events[-1]
    after = await settled_stats(engine)
    assert isinstance(done, DoneEvent) and done.completion_tokens == 48
    assert after.batched_tokens == before.batched_tokens
    assert after.single_tokens - before.single_tokens == done.completion_tokens


@pytest.mark.parametrize(
    "options",
    [GenerationOptions(temperature=0.0), GenerationOptions(temperature=0.0, repeat_penalty=1.3, repeat_last_n=16)],
    ids=["greedy", "with-penalty"],
)
async def test_a_lone_stream_moved_mid_generation_answers_as_if_alone(engine, options):
    alone, _ = await collect(engine, request(engine, PROMPT, options=options, logprobs=2))
    before = await settled_stats(engine)
    moved, other = await collect(engine, request(engine, PROMPT, options=options, logprobs=2), company_after=8, company=request(engine, COMPANION, max_tokens=30))
    after = await settled_stats(engine)
    assert moved[-1].output_tokens == alone[-1].output_tokens  # token for token
    assert text_of(moved) == text_of(alone) and moved[-1].finish_reason == alone[-1].finish_reason == "length"
    a, m = logprobs_of(alone), logprobs_of(moved)
    assert len(a) == len(m) == 48
    assert [x.token_id for x in a] == [x.token_id for x in m]
    assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-3) for x, y in zip(a, m))
    assert all([t.token_id for t in x.top] == [t.token_id for t in y.top] for x, y in zip(a, m))
    companion = other[0][-1]
    assert isinstance(companion, DoneEvent)
    single = after.single_tokens - before.single_tokens
    batched = after.batched_tokens - before.batched_tokens
    assert 8 <= single < 48 and single + batched == 48 + companion.completion_tokens  # it started alone, then went on batched


async def test_two_requests_at_once_move_the_first_before_it_decodes(engine):
    alone, _ = await collect(engine, request(engine, PROMPT))
    first = engine.generate(request(engine, PROMPT))
    second = engine.generate(request(engine, COMPANION))
    first_events = [e async for e in first.events()]
    second_events = [e async for e in second.events()]
    assert first_events[-1].output_tokens == alone[-1].output_tokens
    assert isinstance(second_events[-1], DoneEvent)


async def test_stop_strings_and_max_tokens_hold_across_the_move(engine):
    full, _ = await collect(engine, request(engine, PROMPT, max_tokens=60))
    text = text_of(full)
    stop = late_substring(text)
    options = GenerationOptions(temperature=0.0, stop=(stop,))
    moved, _ = await collect(engine, request(engine, PROMPT, max_tokens=60, options=options), company_after=4, company=request(engine, COMPANION))
    assert moved[-1].finish_reason == "stop" and text_of(moved) == text[: text.index(stop)]
    short, _ = await collect(engine, request(engine, PROMPT, max_tokens=12), company_after=11, company=request(engine, COMPANION, max_tokens=5))
    assert short[-1].finish_reason == "length" and short[-1].output_tokens == full[-1].output_tokens[:12]


async def test_a_moved_stream_can_be_cancelled(engine):
    events, other = await collect(
        engine, request(engine, PROMPT, max_tokens=100_000), company_after=3, company=request(engine, COMPANION, max_tokens=10), cancel_after=6
    )
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "cancelled"
    assert isinstance(other[0][-1], DoneEvent)
    assert (await settled_stats(engine)).sequences == 0


async def test_a_seeded_request_keeps_its_own_stream(engine):
    seeded = GenerationOptions(temperature=1.0, seed=3)
    alone, _ = await collect(engine, request(engine, PROMPT, options=seeded))
    before = await settled_stats(engine)
    beside, other = await collect(engine, request(engine, PROMPT, options=seeded), company_after=4, company=request(engine, COMPANION))
    after = await settled_stats(engine)
    assert beside[-1].output_tokens == alone[-1].output_tokens
    assert isinstance(other[0][-1], DoneEvent)
    assert after.batched_tokens == before.batched_tokens  # the companion ran alone too: nothing to batch with
