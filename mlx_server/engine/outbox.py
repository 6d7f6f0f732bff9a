"""Events on their way from the engine thread to the handlers' event loops."""

from __future__ import annotations

import asyncio

from ..jobs import Event, GenerationJob


class Outbox:
    """Collects one step's events, then hands them over: one wake-up per loop per step."""

    def __init__(self) -> None:
        self._pending: list[tuple[GenerationJob, Event]] = []

    def emit(self, job: GenerationJob, event: Event) -> None:
        self._pending.append((job, event))

    def flush(self) -> None:
        if not self._pending:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationJob, Event]]] = {}
        for job, event in self._pending:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._pending = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass


def _deliver(items: list[tuple[GenerationJob, Event]]) -> None:
    for job, event in items:
        job.queue.put_nowait(event)
