"""Helpers for text that arrives in pieces (streamed tokens)."""

from __future__ import annotations

from collections.abc import Iterable


def partial_marker(text: str, markers: Iterable[str]) -> int:
    """How many characters at the end of `text` may be the start of one of `markers`:
    streamed text holds those back until the next piece decides."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest
