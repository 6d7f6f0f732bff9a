"""The manager's Backend over the engine: files, tokenizer, then weights.

Finding files (maybe downloading) and building the tokenizer are not MLX work, so
they run in worker threads; only the weights go to the engine thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .config import MemoryConfig, ModelConfig
from .engine import Engine
from .ledger import MlxMemory
from .manager import Loaded, Prepared
from .sources import context_length, describe, locate


class MlxBackend:
    def __init__(self, engine: Engine, memory: MemoryConfig):
        self._engine = engine
        self._prompt_cache_bytes = int(memory.prompt_cache_mb * (1 << 20))

    async def prepare(self, model: ModelConfig) -> Prepared:
        await self._engine.started()  # admission needs the device's limits
        local = await asyncio.to_thread(locate, model)
        return Prepared(local.path, local.weights_bytes, local.config)

    async def load(self, model: ModelConfig, prepared: Prepared) -> Loaded:
        tokenizer = await load_tokenizer(prepared)
        weights = await self._engine.load(
            model.name,
            prepared.path,
            tokenizer,
            batch_size=model.max_concurrency,
            prompt_cache_bytes=self._prompt_cache_bytes,
        )
        return Loaded(
            tokenizer=tokenizer,
            size=weights.nbytes,
            context_length=context_length(model, prepared.info),
            details=describe(prepared.info, weights.parameters),
            kv_itemsize=weights.kv_itemsize,
        )

    async def unload(self, name: str) -> int:
        return await self._engine.unload(name)

    async def shrink_caches(self, nbytes: int) -> int:
        return await self._engine.shrink_caches(nbytes)

    # What the engine measured, for the manager's ledger (snapshots: no MLX call here).

    def cache_bytes(self, name: str) -> int:
        stats = self._engine.stats.models.get(name)
        return stats.prompt_cache_bytes if stats else 0

    def kv_bytes(self, name: str) -> int:
        stats = self._engine.stats.models.get(name)
        return stats.kv_bytes if stats else 0

    def mlx_memory(self) -> MlxMemory:
        stats = self._engine.stats
        return MlxMemory(active=stats.active_memory, cache=stats.cache_memory)

    def device_limit(self) -> int | None:
        """Metal's recommended working set, the budget's ceiling on a Mac; None elsewhere."""
        return self._engine.device_info.get("max_recommended_working_set_size")


async def load_tokenizer(prepared: Prepared) -> Any:
    """mlx_lm's tokenizer wrapper (HF tokenizer + streaming detokenizer), in a worker
    thread: not MLX work, but it imports and reads files."""
    try:
        return await asyncio.to_thread(_read_tokenizer, prepared.path, prepared.info.get("eos_token_id"))
    except Exception as e:
        raise RuntimeError(f"cannot load the tokenizer from {prepared.path}: {type(e).__name__}: {e}") from None


def _read_tokenizer(path: Path, eos_token_ids: Any) -> Any:
    from mlx_lm.tokenizer_utils import load

    return load(path, eos_token_ids=eos_token_ids)
