"""Samplers and logits processors for one request.

mlx_lm's `make_sampler` does the unseeded draw (shared between requests of equal
settings, so a batch of them samples in one call). A seeded request gets the same
filters with a draw from its own key, so its answer repeats whatever runs beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ..jobs import GenerationRequest, LogitsProcessor
from ..options import GenerationOptions
from . import libs
from .faults import FATAL


def sampler_for(options: GenerationOptions) -> Callable[[Any], Any]:
    if options.seed is None:
        return _shared_sampler(options.temperature, options.top_p, options.top_k, options.min_p)
    return _seeded_sampler(options.temperature, options.top_p, options.top_k, options.min_p, options.seed)


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, top_k: int, min_p: float):
    return libs.lm_sample.make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)


def _seeded_sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int):
    lm_sample, mx = libs.lm_sample, libs.mx
    if temperature == 0:
        return lm_sample.greedy_sampler
    filters = []  # make_sampler's, in its order
    if 0 < top_p < 1.0:
        filters.append(lambda x: lm_sample.apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: lm_sample.apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: lm_sample.apply_top_k(x, top_k))
    key = mx.random.key(seed % (1 << 64))

    def sample(logprobs: Any) -> Any:
        nonlocal key
        for keep in filters:
            logprobs = keep(logprobs)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample


def logits_processors(request: GenerationRequest) -> list[LogitsProcessor]:
    """Penalties (mlx_lm's), then the request's own processor (e.g. a grammar)."""
    p = request.options
    window = p.repeat_last_n if p.repeat_last_n >= 0 else len(request.prompt)
    processors = []
    if window > 0:
        processors = libs.lm_sample.make_logits_processors(
            None,
            p.repeat_penalty if p.repeat_penalty != 1.0 else None,
            window,
            p.presence_penalty or None,
            window,
            p.frequency_penalty or None,
            window,
        )
    if request.logits_processor is not None:
        processors.append(request.logits_processor())
    return processors


class GuardedProcessors:
    """One sequence's logits processors as one processor that cannot fail a batch.

    In a batch step mlx_lm calls every sequence's processors in turn; one that raised
    would abort the step for all of them. Here the first failure is kept in `fault`
    (the runner fails that sequence after the step) and the logits pass unchanged.
    `prefix`: prompt tokens the processors should see that the caller did not feed
    through this generator (a prompt prefilled beforehand).
    """

    __slots__ = ("fault", "prefix", "processors")

    def __init__(self, processors: list[LogitsProcessor], prefix: Any = None):
        self.processors = processors
        self.prefix = prefix
        self.fault: BaseException | None = None

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.fault is not None:
            return logits
        try:
            if self.prefix is not None:
                tokens = libs.mx.concatenate([self.prefix, tokens])
            for processor in self.processors:
                logits = processor(tokens, logits)
        except FATAL:
            raise
        except BaseException as e:  # a Rust panic is a BaseException
            self.fault = e
        return logits
