"""Tokenizers without a model: for counting tokens and describing a model.

`/v1/messages/count_tokens` and `/api/show` need only the tokenizer, so they must
not take a lease (which loads the weights, maybe evicting another model). The
tokenizer is read from the model's files with mlx_lm's loader, the same way the
model's loader reads it, in a worker thread, and kept for the next request.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .sources import peek

MAX_CACHED = 16  # tokenizers kept; a large one holds tens of MB


@lru_cache(maxsize=MAX_CACHED)
def _cached(path: Path, eos_token_ids: Any) -> Any:
    from mlx_lm.tokenizer_utils import load  # as loader.py loads it; no MLX work

    return load(path, eos_token_ids=eos_token_ids)


def tokenizer_of(model: ModelConfig) -> Any | None:
    """Blocking: the model's tokenizer, or None when its files are not on disk yet."""
    local = peek(model)
    if local is None:
        return None
    eos = local.config.get("eos_token_id")
    return _cached(local.path, tuple(eos) if isinstance(eos, list) else eos)


async def model_tokenizer(model: ModelConfig) -> Any | None:
    """The model's tokenizer, or None when its files are not on disk yet (nothing is downloaded)."""
    return await asyncio.to_thread(tokenizer_of, model)
