"""Loading a model without stalling the others: build it lazily, then evaluate its
weights in time-boxed slices between decode steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import libs
from .commands import Load


@dataclass(slots=True, eq=False)
class Loading:
    command: Load
    model: Any = None
    pending: list = field(default_factory=list)  # weight arrays not yet evaluated, last first

    @property
    def name(self) -> str:
        return self.command.name


def start_load(command: Load) -> Loading:
    """The model's structure with lazy weights (reads only the config and the index)."""
    model, _ = libs.lm_utils.load_model(command.path, lazy=True)
    pending = [a for _, a in libs.mlx_utils.tree_flatten(model.parameters())]
    pending.reverse()
    return Loading(command, model, pending)


def advance_load(loading: Loading, seconds: float) -> bool:
    """Evaluate weights for about `seconds`; True once all are in memory."""
    deadline = time.perf_counter() + seconds
    while loading.pending and time.perf_counter() < deadline:
        libs.mx.eval(loading.pending.pop())
    return not loading.pending
