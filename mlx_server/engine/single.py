"""A sequence on its own `generate_step`, for what one batch cannot serve: a request
with a seed (its draws must not depend on its neighbours) or a model whose caches
cannot merge.

`generate_step` would prefill the whole prompt in one call, holding back every other
stream for as long as that takes; so the prompt goes through the model here first, in
slices the runner sizes like the batched path's, and `generate_step` starts on its
last token with the filled cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import libs
from .sampling import GuardedProcessors


class SingleStream:
    def __init__(self, model: Any, rest: list[int], cache: list, sampler: Any, processors: GuardedProcessors | None, max_tokens: int):
        self.model = model
        self.cache = cache  # filled in place: what the prompt cache keeps afterwards
        self.pending = rest[:-1]  # prompt tokens still to prefill
        self.last = rest[-1:]
        self.sampler = sampler
        self.processors = processors
        self.max_tokens = max_tokens
        self._steps: Iterator | None = None

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)

    def prefill(self, budget: int) -> int:
        """Run up to `budget` prompt tokens through the model; returns how many ran."""
        mx = libs.mx
        chunk, self.pending = self.pending[:budget], self.pending[budget:]
        with mx.stream(libs.lm_generate.generation_stream):
            self.model(mx.array(chunk)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
        mx.clear_cache()
        return len(chunk)

    def next(self) -> tuple[int, Any] | None:
        """The next token and its log-probabilities, or None when `max_tokens` ran out.

        generate_step computes each token's KV before yielding it (it works one step
        ahead): when a sequence ends on EOS, the cache holds the EOS too.
        """
        if self._steps is None:
            self._steps = libs.lm_generate.generate_step(
                libs.mx.array(self.last),
                self.model,
                max_tokens=self.max_tokens,
                sampler=self.sampler,
                logits_processors=[self.processors] if self.processors is not None else None,
                prompt_cache=self.cache,
            )
        return next(self._steps, None)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
