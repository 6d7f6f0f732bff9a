"""A sequence on its own decode loop: a lone request (no batching overhead), a request
with a seed (its draws must not depend on its neighbours) or a model whose caches
cannot merge.

The prompt goes through the model first, in slices the runner sizes like the batched
path's, so no other stream stalls for long. Then mlx_lm's own `generate_step` decodes
from the prompt's last token with the filled cache (it does not prefill a one-token
prompt), so its fixes and options apply here unchanged. generate_step samples one
token ahead of the one it yields; the sampler handed to it keeps that token in view,
so a lone stream that gets company moves into the batch with its cache and that
token (`take_pending`), and no step is computed twice.
"""

from __future__ import annotations

from typing import Any

from . import libs
from .sampling import GuardedProcessors


class SingleStream:
    def __init__(self, model: Any, rest: list[int], cache: list, sampler: Any, processors: GuardedProcessors | None, max_tokens: int):
        self.model = model
        self.cache = cache  # filled in place: what the prompt cache keeps afterwards
        self.pending = rest[:-1]  # prompt tokens still to prefill
        self.last = rest[-1:]  # the prompt's last token: generate_step's one-token prompt
        self._sampler = sampler
        self._ahead: tuple[Any, Any] | None = None  # generate_step's latest draw: (token, logprobs), not yet yielded
        # processors see prefix (the prompt before `last`) + what generate_step fed
        self._steps = libs.lm_generate.generate_step(
            libs.mx.array(self.last),
            model,
            max_tokens=max_tokens,
            sampler=self._sample,
            logits_processors=[processors] if processors is not None else None,
            prompt_cache=cache,
        )

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)

    @property
    def decoding(self) -> bool:
        """A token is sampled and waiting: the cache holds the prompt and every token handed out."""
        return self._ahead is not None

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

        Each token is fed to the model before it is handed out (the step after it is
        computing meanwhile): when a sequence ends on EOS, the cache holds the EOS too.
        """
        with self._generation_stream():
            return next(self._steps, None)

    def take_pending(self) -> tuple[int, Any]:
        """The token already sampled, without feeding it: the stream ends here and a
        batch goes on from its cache (which holds the prompt and every earlier token)."""
        token, logprobs = self._ahead
        self.close()
        return token.item(), logprobs.squeeze(0)

    def close(self) -> None:
        with self._generation_stream():
            self._steps.close()
        self._ahead = None

    def _sample(self, logprobs: Any) -> Any:
        token = self._sampler(logprobs)
        self._ahead = (token, logprobs)
        return token

    def _generation_stream(self) -> Any:
        """generate_step holds `mx.stream(generation_stream)` open across its yields and
        restores, on exit, the stream it found: resuming or closing it only under that
        same stream keeps the thread's default stream from being swapped."""
        return libs.mx.stream(libs.lm_generate.generation_stream)
