"""A streamed /v1/responses whose engine fails part-way: the open item is closed
incomplete and the stream ends with response.failed, as the `openai` client reads it."""

from __future__ import annotations

import openai
from openai.types.responses import ResponseFailedEvent

from conftest import make_config
from engine_helpers import fail_nth_call


async def test_an_engine_error_mid_stream_closes_the_open_item_and_ends_with_response_failed(app_client, test_model, monkeypatch):
    client = await app_client(make_config([{"name": "demo", "source": str(test_model), "preload": True}]))
    warm = await client.post("/v1/responses", json={"model": "demo", "input": "Hello!", "max_output_tokens": 1, "store": False})
    assert warm.status == 200

    # A lone request decodes on its own single stream, not in the batch.
    from mlx_server.engine.single import SingleStream

    fail_nth_call(monkeypatch, SingleStream, "next", 8, RuntimeError("[metal::malloc] Resource limit exceeded (simulated)"))
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0) as ai:
        stream = await ai.responses.create(model="demo", input="Hello!", max_output_tokens=50, temperature=0, stream=True)
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.failed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    item = events[-2].item
    assert item.type == "message" and item.status == "incomplete" and item.content[0].text == text == events[-4].text
    failed = events[-1]
    assert isinstance(failed, ResponseFailedEvent) and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and "Resource limit exceeded" in failed.response.error.message
    assert failed.response.output == [item]
