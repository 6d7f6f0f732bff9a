"""Giving memory back after a model or a batch is dropped, and counting bytes."""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any

from . import libs


def _find_malloc_trim():
    """glibc keeps freed heap pages after a model is dropped; malloc_trim gives them back."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


_malloc_trim = _find_malloc_trim()


def return_memory() -> None:
    """After dropping references: collect, empty MLX's buffer cache, return pages to the OS."""
    gc.collect()
    libs.mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def tree_nbytes(tree: Any) -> int:
    mx = libs.mx
    return libs.mlx_utils.tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, tree, 0)


def kv_itemsize(model: Any) -> int | None:
    """Bytes per value of `model`'s KV caches, from the graph of one token through a fresh
    cache: the dtype the model computes in, whatever config.json says (or omits).
    Nothing is evaluated (a lazy array knows its dtype); None when no layer keeps plain keys."""
    mx = libs.mx
    cache = libs.lm_cache.make_prompt_cache(model)
    try:
        model(mx.array([[0]]), cache=cache)
    except Exception:  # a model that needs more than tokens to run: config.json's dtype stands
        return None
    sizes = [c.keys.dtype.size for c in cache if isinstance(getattr(c, "keys", None), mx.array)]
    return max(sizes, default=None)


def cache_nbytes(cache: list | None) -> int:
    """Bytes of one sequence's KV cache (a list of per-layer caches), as they count them."""
    return sum(c.nbytes for c in cache) if cache else 0
