"""What the event loop asks of the engine thread: one record per kind of command.

Commands that answer carry a `concurrent.futures.Future` the thread resolves;
a generation answers through its job's events instead.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jobs import GenerationJob


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    path: Path
    tokenizer: Any  # mlx_lm's TokenizerWrapper, built off the thread
    batch_size: int
    prompt_cache_bytes: int
    done: Future  # -> LoadedWeights


@dataclass(frozen=True, slots=True)
class Unload:
    name: str
    done: Future  # -> bytes freed


@dataclass(frozen=True, slots=True)
class Embed:
    name: str
    inputs: list[list[int]]
    done: Future  # -> one vector per input


@dataclass(frozen=True, slots=True)
class ShrinkCaches:
    nbytes: int  # what the manager is short of
    done: Future  # -> bytes given back


@dataclass(frozen=True, slots=True)
class Generate:
    job: GenerationJob


@dataclass(frozen=True, slots=True)
class Stop:
    done: Future  # -> None, once every model is unloaded


Command = Load | Unload | Embed | ShrinkCaches | Generate | Stop


def resolve(done: Future, result: Any) -> None:
    """Answer `done`, unless its caller went away: a client's disconnect cancels the future
    from the event loop at any moment, so `done()` then `set_result` would race it."""
    try:
        done.set_result(result)
    except InvalidStateError:  # cancelled (or already answered): nobody waits for this result
        pass


def fail(done: Future, error: BaseException) -> None:
    """`resolve`'s twin for an error."""
    try:
        done.set_exception(error)
    except InvalidStateError:
        pass
