"""Structured output: decoding constrained to JSON or a JSON schema, with llguidance.

Why llguidance: a Rust Earley parser with a small wheel and no torch, ~1 ms to
compile a schema and ~0.1 ms per token for mask and bias on the test model (~1.1 ms
over a 100k vocabulary, CPU). outlines-core needs >1 s per schema to build its index on the same vocabulary
and cannot express free-form JSON; lm-format-enforcer is pure Python (~28 ms per
token) and ignores integer bounds; xgrammar pulls in torch and CUDA.

The grammar is compiled when the request is parsed (a bad schema is a 400 before any
model loads). The engine thread only advances the matcher and masks logits; the mask
is a numpy array added to MLX logits, so this module does not import mlx. Near the
end of the token budget the processor steers towards closing the JSON, so a
`max_tokens` cut still leaves output that parses.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from .errors import BadRequest, brief

# Compact JSON: no free whitespace, which a model could otherwise emit forever.
# Lenient, as Ollama is: keywords llguidance cannot enforce (uniqueItems, unknown
# formats) are ignored rather than refused.
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": True}
CLOSE_RESERVE = 32  # at most this many tokens at the end of the budget go to closing the JSON
_CLOSERS = frozenset(b"]}")  # outside a string: what closes arrays and objects
_QUOTE_CLOSERS = frozenset(b'"]},:')  # inside one: a quote, maybe followed by closers
_CHEAP = frozenset(b',:0"')  # short structure and the shortest values (quotes in pairs)
_CHEAP_WORDS = frozenset({b"null", b"true", b"false", b"[]", b"{}"})


def json_grammar(schema: dict[str, Any] | None, *, param: str) -> str:
    """An llguidance grammar for a JSON schema (None: any JSON object); 400 if invalid."""
    try:
        with _panics_as(f"'{param}' could not be compiled as a JSON schema", param):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                closed_objects(schema) if schema is not None else {"type": "object"}, defaults=JSON_OPTIONS
            )
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except ValueError as e:
        raise BadRequest(f"'{param}': {brief(str(e))}", param=param) from None
    if failed:
        raise BadRequest(f"'{param}' is not a usable JSON schema: {'; '.join(messages)}", param=param)
    return grammar


@contextmanager
def _panics_as(message: str, param: str | None = None):
    """llguidance's Rust code can panic on odd input; pyo3 raises that as a BaseException,
    which no handler would catch. For the caller it is a grammar that cannot be used."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise BadRequest(message, param=param) from None


_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames")
_SUBSCHEMA_LISTS = ("items", "prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def closed_objects(schema: Any) -> Any:
    """Objects that list `properties` take no others unless the schema says so.

    Ollama (llama.cpp's schema converter) reads a missing `additionalProperties` the
    same way; it keeps a model from inventing keys, and lets a budget-cut answer close.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    return out


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """What the matcher needs to know about a tokenizer, built once per tokenizer."""

    lltokenizer: Any
    eos: np.ndarray  # bool per token: ends generation
    closers: np.ndarray  # bool per token: only ']' and '}'
    quote_closers: np.ndarray  # bool per token: a '"' then only closers and separators
    cheap: np.ndarray  # bool per token: short structure or a short literal
    texts: list[bytes]  # each token's bytes


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def _vocabulary(tokenizer: Any) -> _Vocabulary:
    with _vocabularies_lock:
        found = _vocabularies.get(tokenizer)
        if found is None:
            found = _vocabularies[tokenizer] = _build_vocabulary(tokenizer)
        return found


def _build_vocabulary(tokenizer: Any) -> _Vocabulary:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadRequest("structured output needs a model with a fast (tokenizer.json) tokenizer")
    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    lltokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=eos)
    size = lltokenizer.vocab_size
    texts = [lltokenizer.decode_bytes([token]) for token in range(size)]
    closers, quote_closers, cheap, eos_mask = (np.zeros(size, dtype=bool) for _ in range(4))
    for token, text in enumerate(texts):
        text = text.strip()
        if text:
            closers[token] = set(text) <= _CLOSERS
            quote_closers[token] = text[:1] == b'"' and set(text) <= _QUOTE_CLOSERS
            cheap[token] = set(text) <= _CHEAP and text.count(b'"') % 2 == 0 or text in _CHEAP_WORDS
    eos_mask[[t for t in eos if t < size]] = True
    return _Vocabulary(lltokenizer, eos_mask, closers, quote_closers, cheap, texts)


class Constraint:
    """One request's grammar: `CompletionSpec.constrain` for the shared pipeline.

    `closed_early` turns true when the budget ran out and the processor closed the
    JSON itself: the handler then reports the finish reason as "length".
    """

    def __init__(self, grammar: str):
        self.grammar = grammar
        self.closed_early = False

    def grammar_for(self, tokenizer: Any) -> str:
        return self.grammar

    def __call__(self, tokenizer: Any, budget: int) -> Callable[[], Callable[[Any, Any], Any]]:
        """Build the matcher for `budget` tokens (tokenizer tables are cached); the engine calls the result.

        Runs in a worker thread: the first call per tokenizer builds llguidance's tables.
        """
        grammar = self.grammar_for(tokenizer)
        vocabulary = _vocabulary(tokenizer)
        with _panics_as("the grammar could not be built for this model's tokenizer"):
            matcher = llguidance.LLMatcher(vocabulary.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise BadRequest(f"the grammar does not fit this model's tokenizer: {matcher.get_error()}")
        return lambda: _GrammarProcessor(self, matcher, vocabulary, budget)


def one_constraint(output: Constraint | None, forced: Constraint | None) -> Constraint | None:
    """A forced tool call leaves no text for an output format to shape, so it wins
    (the Agents SDK sends both: the format applies once tool_choice is reset)."""
    return forced or output


JSON_TOOL_PARSER = "mlx_lm.tool_parsers.json_tools"  # `<tool_call>{"name", "arguments"}</tool_call>` (Qwen, Hermes)


class ToolCallConstraint(Constraint):
    """`tool_choice` "required" or a named function: the output is exactly one call.

    The call's JSON ({"name": one of the tools, "arguments": that tool's schema}) is
    checked when the request is parsed; the markers around it are the model's own,
    known once the tokenizer is, so the full grammar is built then. Models whose tool
    calls are JSON between markers are served; other formats get a 400.
    """

    def __init__(self, tools: list[dict[str, Any]], name: str | None, *, param: str = "tool_choice"):
        functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if not functions:
            if name is None:
                raise BadRequest(f"'{param}' asks for a tool call but no tools were given", param=param)
            raise BadRequest(f"'{param}' names the tool {brief(name)}, which is not among the request's tools", param=param)
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
            }
            for f in functions
        ]
        self.schema = closed_objects(calls[0] if len(calls) == 1 else {"anyOf": calls})
        json_grammar(self.schema, param=param)  # a bad tool schema is a 400 now, before any model loads
        self.param = param
        super().__init__("")

    def grammar_for(self, tokenizer: Any) -> str:
        parser = getattr(tokenizer, "tool_parser", None)
        if not getattr(tokenizer, "has_tool_calling", False) or getattr(parser, "__module__", None) != JSON_TOOL_PARSER:
            raise BadRequest(
                f"'{self.param}' can force a tool call only for models whose tool calls are JSON between markers "
                f"(<tool_call>...</tool_call>); this model's format is {getattr(parser, '__module__', 'unknown')}",
                param=self.param,
            )
        body = json.dumps(self.schema | {"x-guidance": JSON_OPTIONS})
        start, end = _lark_marker(tokenizer, tokenizer.tool_call_start), _lark_marker(tokenizer, tokenizer.tool_call_end)
        with _panics_as("the tool-call grammar could not be built", self.param):
            return llguidance.LLMatcher.grammar_from_lark(f'start: {start} "\\n" call "\\n" {end}\ncall: %json {body}')


def _lark_marker(tokenizer: Any, marker: str) -> str:
    """A marker in llguidance's Lark: by token id when it is one token (a special token
    never matches its text spelled out), else as its text."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(marker)


class _GrammarProcessor:
    """An mlx_lm logits processor: advance the matcher by the last token, mask the rest."""

    def __init__(self, constraint: Constraint, matcher: Any, vocabulary: _Vocabulary, budget: int):
        self.constraint = constraint
        self.matcher = matcher
        self.vocabulary = vocabulary
        self.bitmask = llnp.allocate_token_bitmask(1, vocabulary.lltokenizer.vocab_size)
        self.generated = -1  # the first call sees only the prompt
        self.in_string = False  # inside a JSON string, as the bytes so far say
        self.escaped = False
        self.closing_from = budget - min(CLOSE_RESERVE, budget // 2)

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.generated >= 0 and not self.matcher.is_stopped():
            token = int(tokens[-1].item())
            self.matcher.consume_token(token)
            self._scan(self.vocabulary.texts[token] if token < len(self.vocabulary.texts) else b"")
        self.generated += 1
        allowed = self._allowed()
        width = logits.shape[-1]
        if allowed.shape[0] < width:
            allowed = np.concatenate([allowed, np.zeros(width - allowed.shape[0], dtype=bool)])
        bias = np.where(allowed[:width], np.float32(0.0), np.float32(-np.inf))
        return logits + bias

    def _allowed(self) -> np.ndarray:
        size = self.vocabulary.lltokenizer.vocab_size
        if self.matcher.is_error() or self.matcher.is_stopped():
            return self.vocabulary.eos
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask)
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[:size].astype(bool)
        if self.generated < self.closing_from:
            return allowed
        # Out of budget soon: end if the JSON is complete, else prefer what closes it
        # (an answer steered that way was cut short: the caller reports "length").
        if self.matcher.is_accepting():
            return self.vocabulary.eos
        v = self.vocabulary
        for preferred in (v.quote_closers,) if self.in_string else (v.closers, v.cheap):
            narrowed = allowed & preferred
            if narrowed.any():
                self.constraint.closed_early |= bool((narrowed != allowed).any())
                return narrowed
        return allowed

    def _scan(self, text: bytes) -> None:
        """Track whether the output is inside a string (quotes and backslash escapes)."""
        for byte in text:
            if self.escaped:
                self.escaped = False
            elif self.in_string and byte == 0x5C:  # backslash
                self.escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string
