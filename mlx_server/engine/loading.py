"""Loading a model without stalling the others: build it lazily, then read its weights
a chunk per engine turn.

A chunk is started with `async_eval` on a stream of its own, so MLX's I/O threads read
it while the other models take their decode step; it is waited for at the start of
the next turn. The engine thread never blocks on one large tensor's read, and the wait
is short as long as a chunk reads in less time than a decode step.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from . import libs
from .commands import Load

CHUNK_BYTES = 4 << 20  # read per turn while other models generate (~2-3 ms from the page cache)
IDLE_CHUNK_BYTES = 256 << 20  # read per turn when nothing else runs: a new request waits at most this long


@dataclass(slots=True, eq=False)
class Loading:
    command: Load
    model: Any = None
    pending: list = field(default_factory=list)  # weight arrays not yet started, last first
    reading: list = field(default_factory=list)  # started last turn, maybe not yet in memory

    @property
    def name(self) -> str:
        return self.command.name

    def drop(self) -> None:
        """Give up the load; what is being read is waited for, so its memory can be freed."""
        with suppress(Exception):  # a read that failed (why the load is dropped) has nothing left to wait for
            libs.mx.eval(self.reading)
        self.reading.clear()
        self.pending.clear()
        self.model = None


def start_load(command: Load, stream: Any) -> Loading:
    """The model's structure with lazy weights (reads only the config and the index);
    the weights will be read on `stream`, beside the generation stream."""
    mx = libs.mx
    with mx.stream(stream):
        model, _ = libs.lm_utils.load_model(command.path, lazy=True)
    pending = [a for _, a in libs.mlx_utils.tree_flatten(model.parameters())]
    pending.reverse()
    return Loading(command, model, pending)


def advance_load(loading: Loading, others_generating: bool) -> bool:
    """Finish the chunk started last turn and start the next; True once every weight is in memory."""
    mx = libs.mx
    mx.eval(loading.reading)
    budget = CHUNK_BYTES if others_generating else IDLE_CHUNK_BYTES
    chunk, size = [], 0
    while loading.pending and (not chunk or size + loading.pending[-1].nbytes <= budget):
        array = loading.pending.pop()
        chunk.append(array)
        size += array.nbytes
    loading.reading = chunk
    if chunk:
        mx.async_eval(chunk)
    return not chunk
