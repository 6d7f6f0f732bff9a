"""In-process mlx_lm on the real model: the reference every daemon answer is checked against.

Greedy answers are computed once per (prompt, max_tokens) and kept for the session: on this
CPU the model decodes a few tokens a second, so each reference is worth reusing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Greedy:
    """mlx_lm's greedy continuation of one prompt."""

    tokens: tuple[int, ...]  # generated tokens, the EOS excluded
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    mlx_lm_count: int  # stream_generate's generation_tokens: the EOS step counts there


class ReferenceModel:
    def __init__(self, path: Path):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))
        self._greedy: dict[tuple[tuple[int, ...], int], Greedy] = {}
        self._batches: dict[tuple[tuple[tuple[int, ...], ...], int], list[tuple[int, ...]]] = {}

    def chat_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def greedy(self, prompt: list[int], max_tokens: int) -> Greedy:
        """`stream_generate` at temperature 0; a shorter request reuses a longer one's tokens."""
        key = (tuple(prompt), max_tokens)
        if key not in self._greedy:
            longer = [g for (p, n), g in self._greedy.items() if p == key[0] and n > max_tokens and len(g.tokens) >= max_tokens]
            if longer:
                tokens = longer[0].tokens[:max_tokens]
                self._greedy[key] = Greedy(tokens, self.tokenizer.decode(list(tokens)), "length", max_tokens)
            else:
                self._greedy[key] = self._stream(prompt, max_tokens)
        return self._greedy[key]

    def _stream(self, prompt: list[int], max_tokens: int) -> Greedy:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        responses = list(stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)))
        last = responses[-1]
        tokens = [r.token for r in responses]
        if last.finish_reason == "stop":
            tokens.pop()  # the EOS: it ends the answer and carries no text
        return Greedy(tuple(tokens), "".join(r.text for r in responses), last.finish_reason, last.generation_tokens)

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, ...]]:
        """mlx_lm's own `batch_generate` (greedy): the reference for batched numerics."""
        from mlx_lm import batch_generate

        key = (tuple(tuple(p) for p in prompts), max_tokens)
        if key not in self._batches:
            result = batch_generate(self.model, self.tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
            self._batches[key] = [tuple(t) for t in result.token_ids]
        return self._batches[key]
