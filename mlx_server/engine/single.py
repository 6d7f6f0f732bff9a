"""A sequence on its own decode loop: a lone request (no batching overhead), a request
with a seed (its draws must not depend on its neighbours) or a model whose caches
cannot merge.

The loop is mlx_lm's `generate_step` (same model call, processors, normalisation,
sampler, and one step computed ahead), written out so that its state is reachable:
a lone stream that gets company moves into the batch with its cache and the token it
has already sampled (`take_pending`). The prompt goes through the model first, in
slices the runner sizes like the batched path's, so no other stream stalls for long.
"""

from __future__ import annotations

from typing import Any

from . import libs
from .sampling import GuardedProcessors

CLEAR_CACHE_EVERY = 256  # tokens, as generate_step


class SingleStream:
    def __init__(self, model: Any, rest: list[int], cache: list, sampler: Any, processors: GuardedProcessors | None, max_tokens: int):
        self.model = model
        self.cache = cache  # filled in place: what the prompt cache keeps afterwards
        self.pending = rest[:-1]  # prompt tokens still to prefill
        self.last = rest[-1:]  # the prompt's last token: the first decode step feeds it
        self.sampler = sampler
        self.processors = processors  # they see prefix (the prompt before `last`) + what was fed here
        self.max_tokens = max_tokens
        self.produced = 0  # tokens handed out
        self._fed: Any = None  # tokens fed by decode steps, for the processors
        self._next: tuple[Any, Any] | None = None  # sampled, not yet handed out: (token, logprobs)

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)

    @property
    def decoding(self) -> bool:
        """A token is sampled and waiting: the cache holds the prompt and every token handed out."""
        return self._next is not None

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

        Like generate_step, each token is fed to the model before it is handed out
        (the step after it is computing meanwhile): when a sequence ends on EOS, the
        cache holds the EOS too.
        """
        if self.produced >= self.max_tokens:
            return None
        mx = libs.mx
        if self._next is None:
            self._next = self._step(mx.array(self.last))
        token, logprobs = self._next
        self._next = self._step(token)
        self.produced += 1
        if self.produced % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        return token.item(), logprobs

    def take_pending(self) -> tuple[int, Any]:
        """The token already sampled, without feeding it: the stream ends here and a
        batch goes on from its cache (which holds the prompt and every earlier token)."""
        token, logprobs = self._next
        self._next = None
        self.produced = self.max_tokens
        return token.item(), logprobs

    def _step(self, tokens: Any) -> tuple[Any, Any]:
        mx = libs.mx
        with mx.stream(libs.lm_generate.generation_stream):
            logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
            if self.processors is not None:
                self._fed = tokens if self._fed is None else mx.concat([self._fed, tokens])
                logits = self.processors(self._fed, logits)
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            sampled = self.sampler(logprobs)
        mx.async_eval(sampled, logprobs)
        return sampled, logprobs.squeeze(0)

    def close(self) -> None:
        self._next = None
