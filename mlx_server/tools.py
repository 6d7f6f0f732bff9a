"""Tool definitions in, tool calls and thinking out: shared by all three APIs.

The engine streams plain text. `OutputParser` splits it, as it arrives, into
content, thinking (between the model's think markers) and tool calls (between its
tool-call markers, parsed by mlx_lm's parser for that model family). Each API then
writes the pieces in its own shape. A tool call that does not parse is kept as
content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .text import partial_marker
from .jobs import DoneEvent, TextEvent
from .errors import BadRequest, brief
from .structured import ToolCallConstraint

CONTENT = "content"
THINKING = "thinking"
TOOL_CALL = "tool_call"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str  # hex; each API adds its own prefix ("call_", "toolu_")
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Piece:
    kind: str  # CONTENT | THINKING | TOOL_CALL
    text: str = ""
    call: ToolCall | None = None


def function_tools(raw: Any, *, param: str = "tools") -> list[dict[str, Any]]:
    """OpenAI/Ollama tool definitions, checked: `[{"type": "function", "function": {...}}]`."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be an array of tools", param=param)
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"'{param}[{i}]' must be an object with type 'function'", param=param)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"'{param}[{i}].function.name' must be a non-empty string", param=param)
        if not isinstance(function.get("parameters", {}), dict):
            raise BadRequest(f"'{param}[{i}].function.parameters' must be a JSON schema object", param=param)
        tools.append({**tool, "type": "function"})
    return tools


def tool_choice(choice: Any, tools: list[dict[str, Any]], *, param: str = "tool_choice") -> tuple[list[dict[str, Any]], ToolCallConstraint | None]:
    """OpenAI's `tool_choice` (chat and Responses shapes) -> the tools the prompt shows
    and, for "required" or a named function, the constraint that forces one call."""
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if choice == "required":
        return tools, ToolCallConstraint(tools, None, param=param)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function") if isinstance(choice.get("function"), dict) else choice  # chat | Responses
        if isinstance(function.get("name"), str):
            return tools, ToolCallConstraint(tools, function["name"], param=param)
    raise BadRequest(
        f"'{param}' must be 'auto', 'none', 'required' or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {brief(choice)}",
        param=param,
    )


def new_call_id() -> str:
    return uuid.uuid4().hex[:24]


def template_tool_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """An assistant tool call in the shape chat templates read (arguments as an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:  # not JSON, or a number too long to convert: templates print the string as it is
            pass
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return call


def starts_in_thinking(tokenizer: Any, prompt: Sequence[int]) -> bool:
    """True when the prompt opened a think block the model is expected to continue."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    return tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)


class OutputParser:
    """Splits streamed text into content, thinking and tool-call pieces.

    Text that might be the start of a marker is held back until it is decided, so a
    marker split over several tokens is still found and never leaks into content.
    """

    def __init__(self, tokenizer: Any, *, tools: list[dict[str, Any]] | None = None, thinking: bool = False):
        self._tools = tools or None
        self._parse = getattr(tokenizer, "tool_parser", None) if tools else None
        self._starts: dict[str, str] = {}
        self._ends: dict[str, str] = {}
        if getattr(tokenizer, "has_thinking", False):
            self._starts[tokenizer.think_start] = THINKING
            self._ends[THINKING] = tokenizer.think_end
        if self._parse is not None and getattr(tokenizer, "has_tool_calling", False):
            self._starts[tokenizer.tool_call_start] = TOOL_CALL
            self._ends[TOOL_CALL] = tokenizer.tool_call_end or ""
            self._tool_start = tokenizer.tool_call_start
        self._state = THINKING if thinking and THINKING in self._ends else CONTENT
        self._buffer = ""
        self._trim = self._state == THINKING  # drop whitespace right after a marker

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        """The end of the output: flush what was held back."""
        out: list[Piece] = []
        rest, self._buffer = self._buffer, ""
        if self._state == TOOL_CALL:
            out.extend(self._calls(rest, closed=False))
        else:
            self._emit(out, self._state, rest)
        self._state = CONTENT
        return out

    def _step(self, out: list[Piece]) -> bool:
        """Consume the buffer up to the next marker; False when it must wait for more."""
        buffer = self._buffer
        if self._state == CONTENT:
            hits = [(buffer.find(m), m) for m in self._starts if buffer.find(m) >= 0]
            if hits:
                at, marker = min(hits)
                self._emit(out, CONTENT, buffer[:at])
                self._buffer = buffer[at + len(marker) :]
                self._state = self._starts[marker]
                self._trim = self._state == THINKING
                return True
            keep = partial_marker(buffer, self._starts)
            self._emit(out, CONTENT, buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]
            return False
        end = self._ends[self._state]
        at = buffer.find(end) if end else -1
        if at < 0:
            if self._state == THINKING:
                keep = partial_marker(buffer, (end,))
                self._emit(out, THINKING, buffer[: len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep :]
            return False
        if self._state == TOOL_CALL:
            out.extend(self._calls(buffer[:at], closed=True))
        else:
            self._emit(out, THINKING, buffer[:at])
            self._trim = True
        self._buffer = buffer[at + len(end) :]
        self._state = CONTENT
        return True

    def _emit(self, out: list[Piece], kind: str, text: str) -> None:
        if self._trim:
            text = text.lstrip()
            if not text:
                return
            self._trim = False
        if not text:
            return
        if out and out[-1].kind == kind and kind != TOOL_CALL:
            out[-1] = Piece(kind, out[-1].text + text)
        else:
            out.append(Piece(kind, text))

    def _calls(self, body: str, *, closed: bool) -> list[Piece]:
        try:
            parsed = self._parse(body, self._tools)
            calls = [_tool_call(item) for item in (parsed if isinstance(parsed, list) else [parsed])]
        except Exception:  # the parsers raise many kinds; the text is then kept as content
            raw = self._tool_start + body + (self._ends[TOOL_CALL] if closed else "")
            return [Piece(CONTENT, raw)]
        return [Piece(TOOL_CALL, call=c) for c in calls]


def _tool_call(item: Any) -> ToolCall:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ValueError("a tool call needs a name")
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be an object")
    return ToolCall(str(item.get("id") or new_call_id()), item["name"], arguments)


@dataclass(slots=True)
class Reply:
    """A whole answer, for the non-streaming responses."""

    content: str = ""
    thinking: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    done: DoneEvent | None = None

    def add(self, piece: Piece) -> None:
        if piece.kind == TOOL_CALL:
            self.calls.append(piece.call)
        elif piece.kind == THINKING:
            self.thinking += piece.text
        else:
            self.content += piece.text


async def pieces(events: AsyncIterator[TextEvent | DoneEvent], parser: OutputParser) -> AsyncIterator[Piece | DoneEvent]:
    """The completion's events as parsed pieces, then its DoneEvent."""
    async for event in events:
        if isinstance(event, TextEvent):
            for piece in parser.feed(event.text):
                yield piece
        else:
            for piece in parser.finish():
                yield piece
            yield event


async def collect(events: AsyncIterator[TextEvent | DoneEvent], parser: OutputParser) -> Reply:
    reply = Reply()
    async for item in pieces(events, parser):
        if isinstance(item, DoneEvent):
            reply.done = item
        else:
            reply.add(item)
    return reply
