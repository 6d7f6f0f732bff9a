"""KV caches of finished sequences, found again by their longest shared prefix."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import libs
from .memory import cache_nbytes

PROMPT_CACHE_ENTRIES = 64
MIN_CACHE_REUSE = 16  # shared tokens below which copying a cached KV state is not worth it


@dataclass(slots=True)
class CachedPrompt:
    tokens: np.ndarray  # int32: the tokens whose keys and values the cache holds
    cache: list
    nbytes: int


class PromptCache:
    """A bounded LRU with a vectorised prefix compare per entry: well under a
    millisecond per lookup. (mlx_lm's LRUPromptCache searches a trie whose cost
    grows with every stored token: over a second at 256 entries of 2,000 tokens.)
    Engine thread only; its bytes count in the model's memory and go with it.
    """

    def __init__(self, max_bytes: int, max_entries: int = PROMPT_CACHE_ENTRIES):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.nbytes = 0
        self.entries: OrderedDict[int, CachedPrompt] = OrderedDict()
        self._next_key = 0

    def fetch(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the best cache for `prompt` (trimmed to the shared prefix) and the tokens still to process."""
        lm_cache = libs.lm_cache
        wanted = np.asarray(prompt, dtype=np.int32)
        best, shared = None, 0
        for key, entry in self.entries.items():
            n = min(len(entry.tokens), len(wanted))
            if n <= shared:
                continue
            differs = np.flatnonzero(entry.tokens[:n] != wanted[:n])
            common = int(differs[0]) if differs.size else n
            if common > shared and (common == len(entry.tokens) or lm_cache.can_trim_prompt_cache(entry.cache)):
                best, shared = key, common
        reuse = min(shared, len(prompt) - 1)  # the last prompt token must run to give logits
        if best is None or reuse < MIN_CACHE_REUSE:
            return None, prompt
        entry = self.entries[best]
        if reuse < len(entry.tokens) and not lm_cache.can_trim_prompt_cache(entry.cache):
            return None, prompt
        self.entries.move_to_end(best)
        cache = copy.deepcopy(entry.cache)
        if reuse < len(entry.tokens):
            lm_cache.trim_prompt_cache(cache, len(entry.tokens) - reuse)
        return cache, prompt[reuse:]

    def insert(self, tokens: list[int], cache: list) -> None:
        """Keep `cache`, which must hold the keys and values of exactly `tokens`."""
        nbytes = cache_nbytes(cache)
        if nbytes > self.max_bytes or not tokens:
            return
        stored = np.asarray(tokens, dtype=np.int32)
        if libs.lm_cache.can_trim_prompt_cache(cache):  # it serves every prefix of itself too
            for key in [k for k, e in self.entries.items() if len(e.tokens) <= len(stored) and np.array_equal(e.tokens, stored[: len(e.tokens)])]:
                self.nbytes -= self.entries.pop(key).nbytes
        self.entries[self._next_key] = CachedPrompt(stored, cache, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while self.entries and (self.nbytes > self.max_bytes or len(self.entries) > self.max_entries):
            self.nbytes -= self.entries.popitem(last=False)[1].nbytes

    def shrink(self, nbytes: int) -> list[CachedPrompt]:
        """Take out the least recently used entries until `nbytes` are gone or none is left;
        returns them. (Entries are copied on fetch: none is in use by a running sequence.)"""
        target, taken = self.nbytes - nbytes, []
        while self.entries and self.nbytes > target:
            taken.append(self.entries.popitem(last=False)[1])
            self.nbytes -= taken[-1].nbytes
        return taken
