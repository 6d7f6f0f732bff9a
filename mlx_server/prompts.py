"""Turning messages or text into token ids with the model's own tokenizer.

Runs in a worker thread (jinja templates and tokenizers are CPU work, not MLX).
Every API converts its messages to one internal shape first:
`{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?, "thinking"?}`.

A system message after the first one (Anthropic's mid-conversation system
messages, OpenAI's developer turns) is rendered at its place when the chat template
accepts it there; a template that refuses it gets it folded into the leading
system prompt instead.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from .errors import BadRequest
from .errors import brief

ROLES = frozenset({"system", "user", "assistant", "tool"})
THINK_LEVELS = ("low", "medium", "high")  # Ollama's `think` strings; templates read `reasoning_effort`
FIM_MARKERS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, DeepSeek
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, Codestral-style
)


MAX_MESSAGES = 100_000  # Anthropic's own limit; far past any context window


def message_list(raw: Any, *, field: str = "messages", empty: bool = True) -> list[Any]:
    """A request's messages array: a list, not too long, non-empty unless `empty`."""
    if not isinstance(raw, list) or not (empty or raw):
        raise BadRequest(f"'{field}' must be {'an' if empty else 'a non-empty'} array of messages", param=field)
    if len(raw) > MAX_MESSAGES:
        raise BadRequest(f"'{field}' has {len(raw)} messages; at most {MAX_MESSAGES} are allowed", param=field)
    return raw


def validate_messages(messages: Any, *, field: str = "messages") -> list[dict[str, Any]]:
    """Check the internal message shape; a 400 naming the message and key otherwise."""
    for i, m in enumerate(message_list(messages, field=field)):
        if not isinstance(m, dict):
            raise BadRequest(f"'{field}[{i}]' must be an object", param=field)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"'{field}[{i}].role' must be one of {', '.join(sorted(ROLES))}, got {brief(role)}", param=field)
        if not isinstance(m.get("content", ""), (str, type(None))):  # null reads as "", as Ollama reads it
            raise BadRequest(f"'{field}[{i}].content' must be a string", param=field)
        for key in ("name", "tool_call_id", "thinking"):
            if not isinstance(m.get(key, ""), str):
                raise BadRequest(f"'{field}[{i}].{key}' must be a string", param=field)
        if not isinstance(m.get("tool_calls", []), list):
            raise BadRequest(f"'{field}[{i}].tool_calls' must be an array", param=field)
    return messages


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], *, tools: list[Any] | None = None, think: bool | str | None = None) -> list[int]:
    """The model's chat template with a generation prompt, as token ids.

    `think` is on/off, or a level from THINK_LEVELS: thinking on, and the level
    passed as `reasoning_effort` to templates that read it (gpt-oss).
    """
    if tools and not supports_tools(tokenizer):
        raise BadRequest("this model's chat template does not support tools", param="tools")
    if not getattr(tokenizer, "has_chat_template", False):
        text = "".join(f"{m['role'].upper()}: {m.get('content', '')}\n" for m in messages) + "ASSISTANT:"
        return text_prompt(tokenizer, text)
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = tools
    if think is not None:
        kwargs["enable_thinking"] = bool(think)
    if isinstance(think, str):
        kwargs["reasoning_effort"] = think
    history = [_history_message(m) for m in messages]
    try:
        try:
            ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, **kwargs)
        except TemplateError:
            folded = fold_system_messages(history)
            if folded == history:
                raise
            ids = tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=True, **kwargs)
    except TemplateError as e:
        raise BadRequest(f"the model's chat template rejected these messages: {e}", param="messages") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # the template tripped on their shape
        raise BadRequest(f"the model's chat template failed on these messages: {type(e).__name__}: {e}", param="messages") from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _history_message(message: dict[str, Any]) -> dict[str, Any]:
    """Earlier reasoning under both names templates read it by (gpt-oss: `thinking`,
    Qwen3 and DeepSeek: `reasoning_content`)."""
    if message.get("thinking"):
        return {"reasoning_content": message["thinking"], **message}
    return message


def fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Later system messages joined into one leading system message, for templates
    that accept a system message only at the start."""
    system = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def supports_tools(tokenizer: Any) -> bool:
    """mlx_lm found a tool-call format for the model, or its template renders `tools`."""
    if getattr(tokenizer, "has_tool_calling", False):
        return True
    template = getattr(tokenizer, "chat_template", None)
    sources = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and "tools" in t for t in sources)


def text_prompt(tokenizer: Any, text: str) -> list[int]:
    """Raw text, with the BOS token the model expects unless the text has it already."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def fim_prompt(tokenizer: Any, prefix: str, suffix: str, model: str) -> list[int]:
    """Fill-in-the-middle, where the tokenizer has FIM tokens; a 400 where it has not."""
    vocab = tokenizer.get_vocab()
    for pre, suf, mid in FIM_MARKERS:
        if pre in vocab and suf in vocab and mid in vocab:
            return text_prompt(tokenizer, f"{pre}{prefix}{suf}{suffix}{mid}")
    raise BadRequest(f"model '{model}' does not support insert ('suffix' needs fill-in-the-middle tokens)", param="suffix")


def supports_thinking(tokenizer: Any) -> bool:
    """The model has think markers (mlx_lm found them) or its template switches thinking."""
    template = getattr(tokenizer, "chat_template", None)
    sources = template.values() if isinstance(template, dict) else [template]
    return bool(getattr(tokenizer, "has_thinking", False)) or any(isinstance(t, str) and "enable_thinking" in t for t in sources)


def supports_insert(tokenizer: Any) -> bool:
    """The vocabulary has one of the fill-in-the-middle marker sets `fim_prompt` uses."""
    vocab = tokenizer.get_vocab()
    return any(all(m in vocab for m in markers) for markers in FIM_MARKERS)


def capabilities(tokenizer: Any) -> list[str]:
    """What /api/show lists: every model completes and embeds (mean-pooled hidden
    states); tools, thinking and insert depend on the template and vocabulary."""
    found = ["completion"]
    found += ["tools"] if supports_tools(tokenizer) else []
    found += ["thinking"] if supports_thinking(tokenizer) else []
    found += ["insert"] if supports_insert(tokenizer) else []
    return found + ["embedding"]
