"""The ledger's arithmetic, checked against the caches mlx_lm really builds."""

from __future__ import annotations

import json

import pytest

from mlx_server.ledger import (
    KV_STEP,
    KvLayout,
    Ledger,
    MlxMemory,
    ModelMemory,
    kv_layout,
)
from mlx_server.testing import make_test_model


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    return make_test_model(tmp_path_factory.mktemp("fp16") / "tiny16", dtype="float16", layers=3)


def run_prompt(model_dir, tokens: int) -> tuple[KvLayout, int]:
    """Prefill `tokens` tokens through the model, then decode one: the cache's own nbytes."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    cache = make_prompt_cache(model)
    prompt = mx.array([[i % 500 + 5 for i in range(tokens)]])
    logits = model(prompt, cache=cache)
    model(mx.argmax(logits[:, -1:, :], axis=-1), cache=cache)
    mx.eval([c.state for c in cache])
    layout = kv_layout(json.loads((model_dir / "config.json").read_text()))
    assert layout is not None
    return layout, sum(c.nbytes for c in cache)


@pytest.mark.parametrize("tokens", [40, 700, 1500])
def test_the_ledger_figure_is_within_10_percent_of_a_real_cache(test_model, tokens):
    layout, nbytes = run_prompt(test_model, tokens)
    assert layout.bytes_per_token == 4 * 2 * 64 * 2 * 4  # layers x KV heads x head dim x 2 x float32
    figure = layout.bytes_for(tokens + 1)
    assert abs(figure - nbytes) <= 0.10 * nbytes, (figure, nbytes)


def test_a_half_precision_cache_costs_half(fp16_model):
    layout, nbytes = run_prompt(fp16_model, 600)
    assert layout.dtype_bytes == 2
    assert abs(layout.bytes_for(601) - nbytes) <= 0.10 * nbytes, (layout.bytes_for(601), nbytes)


def test_layout_from_configs_of_several_shapes():
    qwen32b = {"num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8, "hidden_size": 5120, "torch_dtype": "bfloat16"}
    layout = kv_layout(qwen32b)
    assert layout == KvLayout(64, 8, 128, 2)  # head dim from hidden size / heads
    assert layout.bytes_for(32 * 1024) == 8 * (1 << 30)  # the 8 GiB for a 32k sequence
    nested = kv_layout({"model_type": "vlm", "text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 32}})
    assert nested == KvLayout(2, 4, 32, 2)  # no KV heads: as many as attention heads; no dtype: 16 bits
    assert kv_layout({"num_hidden_layers": 2}) is None
    assert kv_layout({"num_hidden_layers": True, "num_attention_heads": 4, "head_dim": 8}) is None


def test_rounding_to_whole_cache_steps():
    layout = KvLayout(1, 1, 1, 1)  # 2 bytes a token
    assert layout.bytes_for(0) == 0
    assert layout.bytes_for(1) == layout.bytes_for(KV_STEP) == 2 * KV_STEP
    assert layout.bytes_for(KV_STEP + 1) == 4 * KV_STEP
    assert layout.tokens_within(4 * KV_STEP + 1) == 2 * KV_STEP
    assert layout.tokens_within(2 * KV_STEP - 1) == 0


def test_ledger_totals():
    loading = ModelMemory("b", loading=300)
    ready = ModelMemory("a", weights=1000, prompt_cache=50, kv_reserved=200, kv_measured=120)
    grown = ModelMemory("c", weights=10, kv_reserved=100, kv_measured=180)
    assert ready.kv == 200 and grown.kv == 180  # a reservation until the cache outgrows it
    ledger = Ledger((ready, loading, grown), ceiling=2000, mlx=MlxMemory(active=1200, cache=30))
    assert ledger.used == 1250 + 300 + 190
    assert ledger.reserved == 200 + 300 + 100 and ledger.kv == 200 + 180
    assert ledger.free == 2000 - 1740
