"""The ledger takes the KV dtype from the loaded weights (issue 24): config.json's
`torch_dtype` is a hint, often missing from hand-converted models, and a quantized
model computes at its scales' dtype. What the manager reserves then matches what the
caches hold (their own `nbytes`) within 10%."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import start_engine
from mlx_lm import convert
from test_manager import LAYOUT, MiB, hold_kv, line, make_kv

from mlx_server.jobs import GenerationRequest, TextEvent
from mlx_server.ledger import kv_layout


def variant(base: Path, root: Path, name: str, **convert_options) -> Path:
    """`base` converted by mlx_lm (dtype, quantization), with `torch_dtype` removed."""
    out = root / name
    convert(hf_path=str(base), mlx_path=str(out), **convert_options)
    config = json.loads((out / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def variants(test_model, tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """name: (model directory, bytes per KV value it computes in)."""
    root = tmp_path_factory.mktemp("kv-dtype")
    return {
        "float32": (variant(test_model, root, "f32", dtype="float32"), 4),
        "float16": (variant(test_model, root, "f16", dtype="float16"), 2),
        "bfloat16": (variant(test_model, root, "bf16", dtype="bfloat16"), 2),
        "4-bit, bfloat16 scales": (variant(test_model, root, "q4", quantize=True, q_group_size=64, q_bits=4, dtype="bfloat16"), 2),
        "8-bit, float32 scales": (variant(test_model, root, "q8", quantize=True, q_group_size=64, q_bits=8, dtype="float32"), 4),
    }


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "4-bit, bfloat16 scales", "8-bit, float32 scales"])
async def test_reservation_matches_the_caches_without_torch_dtype(variants, name):
    path, itemsize = variants[name]
    config = json.loads((path / "config.json").read_text())
    assert "torch_dtype" not in config
    engine = await start_engine(path)
    try:
        assert engine.weights.kv_itemsize == itemsize
        layout = replace(kv_layout(config), dtype_bytes=itemsize)
        prompt = engine.tokenizer.encode("how many bytes " * 20)
        job = engine.generate(GenerationRequest(model="m", prompt=prompt, max_tokens=600 - len(prompt)))
        measured = 0
        async for event in job.events():
            measured = max(measured, engine.stats.models["m"].kv_bytes)
            if not isinstance(event, TextEvent):
                break
        reserved = layout.bytes_for(600)
        assert abs(measured - reserved) <= 0.1 * reserved, (measured, reserved)
    finally:
        await engine.stop()


async def test_the_manager_reserves_at_the_dtype_the_loaded_model_reports():
    """config.json says float32 (4 bytes); the loaded model computes in 2: the reservation halves."""
    manager, backend = make_kv([{"name": "a"}], budget_mb=16)
    loads = backend.load

    async def measured_load(model, prepared):
        return replace(await loads(model, prepared), kv_itemsize=2)

    backend.load = measured_load
    task, release, granted = await hold_kv(manager, "a", 100, 412)
    assert LAYOUT["torch_dtype"] == "float32" and line(manager, "a").kv_reserved == 1 * MiB  # 512 tokens x 2 KiB
    release.set()
    await task
