"""What the engine reports: snapshots, replaced whole, read from any thread."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LoadedWeights:
    nbytes: int
    parameters: int
    kv_itemsize: int | None = None  # bytes per value its KV caches hold; None: no plain KV cache


@dataclass(frozen=True, slots=True)
class ModelStats:
    weights_bytes: int
    prompt_cache_bytes: int
    sequences: int
    kv_bytes: int = 0  # KV caches of the running sequences, as their caches count them
    single_tokens: int = 0  # tokens decoded on single streams (a lone request, a seeded one), ever
    batched_tokens: int = 0  # tokens decoded in the BatchGenerator, ever


@dataclass(frozen=True, slots=True)
class CacheShrunk:
    """What one model gave back of its prompt cache when the manager needed memory."""

    nbytes: int
    spilled: int  # entries written to the disk tier
    dropped: int  # entries let go (no disk tier, or too short to be worth a file)


@dataclass(frozen=True, slots=True)
class EngineStats:
    active_memory: int = 0
    cache_memory: int = 0
    peak_memory: int = 0
    models: dict[str, ModelStats] = field(default_factory=dict)
    cache_spills: dict[str, int] = field(default_factory=dict)  # per model, ever (counters: they outlive unloads)
    cache_drops: dict[str, int] = field(default_factory=dict)
