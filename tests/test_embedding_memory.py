"""Embedding requests reserve their activations before they run (issue 24): the largest
slice's peak, as MLX itself measures it, is within what the ledger reserves; a request
whose slice does not fit waits in the memory queue, and one that never could is a 400."""

from __future__ import annotations

import asyncio
import json
import time

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model
from test_manager import MiB, line, make_kv

from mlx_server.engine import libs
from mlx_server.engine.embedding import embed_slice, embedding_body
from mlx_server.errors import BadRequest
from mlx_server.ledger import EMBED_ROWS, embedding_peak, embedding_slice, forward_layout

SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}


@pytest.mark.parametrize(("rows", "width"), [(16, 64), (4, 256), (1, 1024), (1, 2500)])
def test_the_reservation_covers_mlxs_measured_peak(test_model, rows, width):
    libs.import_mlx()
    model, _ = load_model(test_model)
    mx.eval(model.parameters())
    layout = forward_layout(json.loads((test_model / "config.json").read_text()), 4)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    embed_slice(embedding_body(model), [[5] * width] * rows, width)
    measured = mx.get_peak_memory() - before
    assert measured <= layout.peak_bytes(rows, width) <= 1.5 * measured


def test_the_largest_slice_decides_and_the_engine_slices_the_same_way():
    layout = forward_layout(SHAPE, 4)
    lengths = [10] * 40 + [900] + [30] * 3
    assert embedding_slice(lengths, 0, 1024) == (EMBED_ROWS, 10)
    assert embedding_slice(lengths, 32, 1024) == (40, 10)
    assert embedding_slice(lengths, 40, 1024) == (41, 900)  # one long input runs alone
    assert embedding_slice(lengths, 40, 100) == (41, 900)  # ...whatever the budget
    assert embedding_peak(layout, lengths) == layout.peak_bytes(1, 900)


def make_embedding_model(budget_mb: float, **kwargs):
    manager, backend = make_kv([{"name": "e", "max_concurrency": 4}], budget_mb=budget_mb, **kwargs)
    backend.configs = {"e": SHAPE}
    return manager, backend


async def test_an_embedding_request_reserves_its_largest_slice_until_it_ends():
    manager, backend = make_embedding_model(64)
    async with manager.lease("e") as lease:
        await manager.reserve_activations(lease, [900, 10, 10])
        need = embedding_peak(forward_layout(SHAPE, 2), [900, 10, 10])  # no torch_dtype: 16-bit until measured
        assert line(manager, "e").activations == need and manager.ledger().reserved == need
    assert line(manager, "e").activations == 0


async def test_an_embedding_request_that_does_not_fit_waits_for_another_to_end():
    need = embedding_peak(forward_layout(SHAPE, 2), [1000])
    manager, backend = make_embedding_model(4 + 1.5 * need / MiB, clock=time.monotonic, server={"queue_timeout": 5})
    first_in, release = asyncio.Event(), asyncio.Event()

    async def first():
        async with manager.lease("e") as lease:
            await manager.reserve_activations(lease, [1000])
            first_in.set()
            await release.wait()

    holder = asyncio.create_task(first())
    await first_in.wait()
    async with manager.lease("e") as lease:
        second = asyncio.create_task(manager.reserve_activations(lease, [1000]))
        await asyncio.sleep(0.1)
        assert not second.done() and manager.waits["memory"] == 1
        release.set()
        await asyncio.wait_for(second, 1)
        assert line(manager, "e").activations == need
    await holder


async def test_inputs_whose_slice_could_never_fit_are_a_400_naming_them():
    manager, backend = make_embedding_model(8)
    async with manager.lease("e") as lease:
        with pytest.raises(BadRequest, match="can never be embedded in memory") as e:
            await manager.reserve_activations(lease, [4000])
    assert e.value.param == "input"
