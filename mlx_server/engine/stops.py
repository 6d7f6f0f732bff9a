"""Stop strings in streamed text, on mlx_lm's TextStateMachine.

Each stop string is a transition to the end state (None); the machine holds back
text that may be the start of one until the next piece decides. (mlx_lm's
`make_text_state_machine` also strips the tokenizer's thinking and tool-call
markers, which our tool parser needs to see in the text, so it is not used.)
"""

from __future__ import annotations

from . import libs


class StopMatcher:
    __slots__ = ("_machine", "_state")

    def __init__(self, stops: tuple[str, ...]):
        if stops:
            self._machine = libs.lm_generate.TextStateMachine({"normal": [(s, None) for s in stops]})
            self._state = self._machine.make_state()
        else:
            self._machine = self._state = None

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit, and whether a stop string ended the stream."""
        if self._machine is None:
            return text, False
        self._state, out, state_name = self._machine.step(self._state, text)
        return out, state_name is None

    def flush(self) -> str:
        """What was held back, once the stream has ended another way."""
        if self._machine is None:
            return ""
        self._state, held, _ = self._machine.flush(self._state)
        return held
