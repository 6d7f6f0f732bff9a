"""One model's side of the on-disk prompt cache (../disk_cache.py): lookups, and
saves written behind.

A save (serialise, fsync, checksum) takes long enough to stall every stream, so a
finished cache waits in a short queue and the engine saves one entry per loop turn
when nothing else runs, and all of a model's entries before it unloads or the
engine stops (a keep_alive unload, an eviction or a shutdown keeps them).
A failing disk never fails a request: lookups and saves only log.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..disk_cache import DiskHit, DiskPromptCache, ModelIdentity
from .prompt_cache import MIN_CACHE_REUSE

log = logging.getLogger("mlx_server.engine")

DISK_MIN_GAIN = 256  # a file is read only when it saves this many more prompt tokens than the in-memory hit
DISK_MIN_TOKENS = 1024  # shorter caches are not worth a file: prefilling them costs about what reading does
PENDING_SAVES = 4  # finished caches waiting for an idle turn; older ones make way


@dataclass(frozen=True, slots=True)
class PendingSave:
    tokens: list[int]
    cache: list  # holds exactly `tokens`; no longer changed by anyone (the in-memory cache copies on fetch)


class DiskTier:
    def __init__(self, store: DiskPromptCache, identity: ModelIdentity):
        self.store = store
        self.identity = identity
        self.pending: deque[PendingSave] = deque(maxlen=PENDING_SAVES)

    def fetch(self, prompt: Sequence[int], reused: int) -> DiskHit | None:
        """A stored cache that beats the in-memory hit of `reused` tokens by DISK_MIN_GAIN, if any."""
        try:
            return self.store.fetch(self.identity, prompt, min_reuse=max(MIN_CACHE_REUSE, reused + DISK_MIN_GAIN))
        except Exception:  # the prompt is served from memory or prefilled instead
            log.exception("disk prompt cache: lookup for '%s' failed", self.identity.name)
            return None

    def queue(self, tokens: Sequence[int], cache: list) -> None:
        if len(tokens) >= DISK_MIN_TOKENS:
            self.pending.append(PendingSave(list(tokens), cache))

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
