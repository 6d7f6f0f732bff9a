"""One model's side of the on-disk prompt cache (../disk_cache.py): lookups, and
saves written behind.

A save (serialise, fsync, checksum) takes long enough to stall every stream, so a
finished cache waits in a short queue and the engine saves one entry per loop turn
when nothing else runs, and all of a model's entries before it unloads or the
engine stops (a keep_alive unload, an eviction or a shutdown keeps them).
A failing disk never fails a request: lookups and saves only log.

What is worth a file is measured, not assumed: a cache is saved when reading it
back costs less than prefilling its tokens again (`worth_a_file`), from this
model's measured prefill rate and the store's measured read rate, and only from
`min_tokens` up (memory.disk_cache_min_tokens): a file per short chat would push
out the long shared prefixes the tier is for.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..disk_cache import DiskHit, DiskPromptCache, ModelIdentity
from .memory import cache_nbytes
from .prompt_cache import MIN_CACHE_REUSE

log = logging.getLogger("mlx_server.engine")

DISK_MIN_TOKENS = 256  # the default floor: no file for fewer tokens, and none read to save fewer (README)
PENDING_SAVES = 4  # finished caches waiting for an idle turn; older ones make way


@dataclass(frozen=True, slots=True)
class PendingSave:
    tokens: list[int]
    cache: list  # holds exactly `tokens`; no longer changed by anyone (the in-memory cache copies on fetch)
    nbytes: int  # memory it holds until it is written: counted in the model's prompt cache bytes


def worth_a_file(tokens: int, nbytes: int, *, min_tokens: int, prefill_rate: float | None, read_rate: float | None) -> bool:
    """Whether a cache of `tokens` held in `nbytes` is worth saving: reading it back
    (bytes / `read_rate`, bytes/s) costs less than prefilling it (tokens / `prefill_rate`,
    tokens/s). Unknown rates say yes: the save is what measures the disk. `nbytes` as
    memory holds it, spare room included, errs towards no file."""
    if tokens < min_tokens:
        return False
    if prefill_rate is None or read_rate is None:
        return True
    return nbytes / read_rate < tokens / prefill_rate


class DiskTier:
    def __init__(self, store: DiskPromptCache, identity: ModelIdentity, min_tokens: int = DISK_MIN_TOKENS):
        self.store = store
        self.identity = identity
        self.min_tokens = min_tokens
        self.prefill_rate: float | None = None  # the model's, as of the last cache queued (tokens/s)
        self.pending: deque[PendingSave] = deque(maxlen=PENDING_SAVES)

    def fetch(self, prompt: Sequence[int], reused: int) -> DiskHit | None:
        """A stored cache that beats the in-memory hit of `reused` tokens by `min_tokens`, if any."""
        try:
            return self.store.fetch(self.identity, prompt, min_reuse=max(MIN_CACHE_REUSE, reused + self.min_tokens))
        except Exception:  # the prompt is served from memory or prefilled instead
            log.exception("disk prompt cache: lookup for '%s' failed", self.identity.name)
            return None

    def queue(self, tokens: Sequence[int], cache: list, prefill_rate: float | None) -> None:
        self.prefill_rate = prefill_rate
        nbytes = cache_nbytes(cache)
        if self._worth_a_file(len(tokens), nbytes):
            self.pending.append(PendingSave(list(tokens), cache, nbytes))

    def spill(self, tokens: Sequence[int], cache: list) -> bool:
        """Write a cache the memory cannot keep now; True when the disk holds it afterwards."""
        if not self._worth_a_file(len(tokens), cache_nbytes(cache)):
            return False
        try:
            return self.store.save(self.identity, tokens, cache)
        except Exception:
            log.exception("disk prompt cache: spilling %d tokens of '%s' failed", len(tokens), self.identity.name)
            return False

    def save_one(self) -> None:
        if not self.pending:
            return
        entry = self.pending.popleft()
        try:
            self.store.save(self.identity, entry.tokens, entry.cache)
        except Exception:  # the store logs the ordinary failures itself; this is anything else
            log.exception("disk prompt cache: saving %d tokens of '%s' failed", len(entry.tokens), self.identity.name)

    def save_all(self) -> None:
        while self.pending:
            self.save_one()

    def _worth_a_file(self, tokens: int, nbytes: int) -> bool:
        return worth_a_file(tokens, nbytes, min_tokens=self.min_tokens, prefill_rate=self.prefill_rate, read_rate=self.store.read_rate)
