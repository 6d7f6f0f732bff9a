"""Embeddings: mean-pooled, L2-normalised final hidden states, computed in slices
sized like prefill chunks so decode steps go on meanwhile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ledger import embedding_slice
from . import libs
from .commands import Embed


@dataclass(slots=True, eq=False)
class Embedding:
    command: Embed
    body: Any  # the model without its output head: tokens -> final hidden states
    vectors: list[list[float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.command.name

    @property
    def complete(self) -> bool:
        return len(self.vectors) == len(self.command.inputs)

    def advance(self, budget: int) -> int:
        """Embed the next slice (sized as the ledger reserved it); returns the padded tokens it ran."""
        start = len(self.vectors)
        end, width = embedding_slice([len(t) for t in self.command.inputs], start, budget)
        self.vectors.extend(embed_slice(self.body, self.command.inputs[start:end], width))
        return width * (end - start)


def embedding_body(model: Any) -> Any | None:
    """The part of an mlx_lm model that gives final hidden states, if it has one."""
    body = getattr(model, "model", None)
    return body if callable(body) else None


def embed_slice(body: Any, chunk: list[list[int]], width: int) -> list[list[float]]:
    """Right padding is masked out of the mean (causal attention keeps it from touching the real tokens)."""
    mx = libs.mx
    tokens = mx.array([t + [0] * (width - len(t)) for t in chunk])
    lengths = mx.array([len(t) for t in chunk])[:, None]
    hidden = body(tokens).astype(mx.float32)
    mask = (mx.arange(width)[None, :] < lengths)[..., None]
    pooled = (hidden * mask).sum(axis=1) / lengths
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled.tolist()
