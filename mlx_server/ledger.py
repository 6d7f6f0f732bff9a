"""The memory ledger: what each model holds and what running requests will need.

Pure arithmetic, no MLX and no I/O: the manager owns the figures and asks this
module what they add up to. A model's footprint is its weights, its prompt cache,
the KV caches of its running sequences and, while it loads, the weights it is
about to read. A request's KV is reserved before it runs, from the model's
config.json, so admission can say no (or wait) instead of an allocation failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# mlx_lm's KVCache grows its buffers in steps of this many tokens (KVCache.step).
KV_STEP = 256

_DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
}


@dataclass(frozen=True, slots=True)
class KvLayout:
    """The shape of one model's KV cache: what one token costs in every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        """Keys and values, every layer: layers x KV heads x head dim x 2 x dtype bytes."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.dtype_bytes

    def bytes_for(self, tokens: int) -> int:
        """What a cache holding `tokens` allocates (mlx_lm rounds up to whole steps)."""
        if tokens <= 0:
            return 0
        return math.ceil(tokens / KV_STEP) * KV_STEP * self.bytes_per_token

    def tokens_within(self, nbytes: int) -> int:
        """The most tokens whose cache fits in `nbytes` (whole steps only)."""
        if nbytes <= 0:
            return 0
        return (nbytes // (KV_STEP * self.bytes_per_token)) * KV_STEP


def kv_layout(config: dict[str, Any]) -> KvLayout | None:
    """The KV layout a model's config.json declares; None when it does not say enough.

    Multimodal configs keep the language model's fields under `text_config`. The
    cache holds activations, so its dtype is the model's compute dtype (`torch_dtype`),
    not the quantized weights' bits.
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def read(key: str) -> Any:
        value = config.get(key)
        return value if value is not None else text.get(key)

    layers = read("num_hidden_layers")
    heads = read("num_attention_heads")
    kv_heads = read("num_key_value_heads") or heads
    head_dim = read("head_dim")
    hidden = read("hidden_size")
    if not head_dim and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    values = (layers, kv_heads, head_dim)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    dtype = str(read("torch_dtype") or read("dtype") or "float16")
    return KvLayout(layers, kv_heads, head_dim, _DTYPE_BYTES.get(dtype, 2))


@dataclass(frozen=True, slots=True)
class ModelMemory:
    """One model's line in the ledger, in bytes."""

    name: str
    weights: int = 0  # exact once loaded; the files' size while loading
    prompt_cache: int = 0
    kv_reserved: int = 0  # what the running requests reserved before they ran
    kv_measured: int = 0  # what their caches hold now, as the engine measured
    loading: int = 0  # a load in progress: the weights it is reading

    @property
    def kv(self) -> int:
        """KV counted against the budget: a reservation until the cache outgrows it."""
        return max(self.kv_reserved, self.kv_measured)

    @property
    def total(self) -> int:
        return self.weights + self.prompt_cache + self.kv + self.loading


@dataclass(frozen=True, slots=True)
class MlxMemory:
    """What MLX itself reports on the engine thread: allocated, and kept in its buffer cache."""

    active: int = 0
    cache: int = 0


@dataclass(frozen=True, slots=True)
class Ledger:
    """Every model's line plus what MLX itself reports, against the budget's ceiling."""

    models: tuple[ModelMemory, ...]
    ceiling: int
    mlx: MlxMemory = MlxMemory()

    @property
    def used(self) -> int:
        return sum(m.total for m in self.models)

    @property
    def kv(self) -> int:
        return sum(m.kv for m in self.models)

    @property
    def reserved(self) -> int:
        """Bytes promised but not (all) allocated yet: KV reservations and loads."""
        return sum(m.kv_reserved + m.loading for m in self.models)

    @property
    def free(self) -> int:
        return max(0, self.ceiling - self.used)
