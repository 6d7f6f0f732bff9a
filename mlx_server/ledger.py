"""The memory ledger: what each model holds and what running requests will need.

Pure arithmetic, no MLX and no I/O: the manager owns the figures and asks this
module what they add up to. A model's footprint is its weights, its prompt cache,
the KV caches of its running sequences and, while it loads, the weights it is
about to read. A request's KV is reserved before it runs, from the model's
config.json's shape and the dtype the loaded model computes in, so admission can
say no (or wait) instead of an allocation failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# mlx_lm's KVCache grows its buffers in steps of this many tokens (KVCache.step).
KV_STEP = 256
EMBED_ROWS = 16  # inputs per embedding slice at most
EMBED_SLICE_TOKENS = 1024  # padded tokens per embedding slice at most (one input longer than this runs alone)

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
    cache holds activations, so its dtype is the model's compute dtype, not the
    quantized weights' bits: `torch_dtype` is only the hint used before the load
    (the manager replaces it with what the loaded model measures).
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
class ForwardLayout:
    """What a forward pass without a cache (an embedding slice) holds at its peak: about
    10 x hidden + 5 x intermediate values per token (a layer's residual, norms, q/k/v,
    attention output, the MLP's gate, up and product, as MLX keeps them alive), and each
    row's attention scores with their softmax (1.25 x heads x width x width). The factors
    are fitted, with a margin, to MLX's own peak memory (tests/test_embedding_memory.py)."""

    hidden: int
    intermediate: int
    heads: int
    dtype_bytes: int

    def peak_bytes(self, rows: int, width: int) -> int:
        tokens = rows * width
        per_token = 10 * self.hidden + 5 * self.intermediate
        return self.dtype_bytes * (tokens * per_token + (5 * rows * self.heads * width * width) // 4)


def forward_layout(config: dict[str, Any], dtype_bytes: int) -> ForwardLayout | None:
    """From config.json's shape; None when it does not say enough."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    values = [config.get(k) or text.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    return ForwardLayout(*values, dtype_bytes)


def embedding_slice(lengths: list[int], start: int, budget: int) -> tuple[int, int]:
    """(end, width): the inputs from `start` that one embedding slice runs, padded to `width`:
    at most EMBED_ROWS of them, their padded tokens within `budget` (capped at
    EMBED_SLICE_TOKENS), and always at least one. The engine slices so; the ledger
    reserves the largest slice before the request runs."""
    budget = min(budget, EMBED_SLICE_TOKENS)
    end, width = start, 0
    while end < len(lengths) and end - start < EMBED_ROWS:
        wider = max(width, lengths[end])
        if end > start and wider * (end - start + 1) > budget:
            break
        width, end = wider, end + 1
    return end, width


def embedding_peak(layout: ForwardLayout, lengths: list[int]) -> int:
    """The most one slice of these inputs holds, sliced at the largest budget the engine uses."""
    peak, start = 0, 0
    while start < len(lengths):
        end, width = embedding_slice(lengths, start, EMBED_SLICE_TOKENS)
        peak = max(peak, layout.peak_bytes(end - start, width))
        start = end
    return peak


@dataclass(frozen=True, slots=True)
class ModelMemory:
    """One model's line in the ledger, in bytes."""

    name: str
    weights: int = 0  # exact once loaded; the files' size while loading
    prompt_cache: int = 0
    kv_reserved: int = 0  # what the running requests reserved before they ran
    kv_measured: int = 0  # what their caches hold now, as the engine measured
    loading: int = 0  # a load in progress: the weights it is reading
    activations: int = 0  # what its running embedding requests reserved for their largest slice

    @property
    def kv(self) -> int:
        """KV counted against the budget: a reservation until the cache outgrows it."""
        return max(self.kv_reserved, self.kv_measured)

    @property
    def total(self) -> int:
        return self.weights + self.prompt_cache + self.kv + self.loading + self.activations


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
        """Bytes promised but not (all) allocated yet: KV and activation reservations, and loads."""
        return sum(m.kv_reserved + m.loading + m.activations for m in self.models)

    @property
    def free(self) -> int:
        return max(0, self.ceiling - self.used)
