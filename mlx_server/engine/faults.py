"""How failures on the engine thread are told apart and reported.

A failure belongs to the narrowest thing it came from: one sequence (its logits
processor, its tokens), one model's batch step, or, only when it escapes all of
those, the thread itself. Rust panics from extensions (pyo3's PanicException, e.g.
llguidance) derive from BaseException, so guards catch BaseException and let only
FATAL through.
"""

from __future__ import annotations

from ..errors import GenerationFailed, MlxServerError

FATAL = (KeyboardInterrupt, SystemExit)  # the thread is being stopped: never swallowed


def generation_error(error: BaseException) -> MlxServerError:
    """The error a request sees for `error` (its type and words, not a traceback)."""
    if isinstance(error, MlxServerError):
        return error
    if isinstance(error, MemoryError):
        return GenerationFailed("out of memory while generating")
    return GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
