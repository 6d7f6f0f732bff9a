"""Translation between the shapes: Ollama <-> OpenAI chat, and Ollama -> Victoria
(`goal` + `chat_history`) and back. Pure functions; the router moves the bytes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from datetime import datetime, timezone
from typing import Any

from ..errors import BadRequest


class UpstreamFailure(Exception):
    """A backend said it failed (an error line or event, or a broken answer)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _text(content: Any) -> str:
    """Message content as plain text: strings as they are, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return json.dumps(content, ensure_ascii=False)


def validate_body(kind: str, body: dict[str, Any]) -> None:
    """What the router itself needs of a request; backends check the rest."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    if not isinstance(body.get("stream", True), bool):
        raise BadRequest(f"'stream' must be a boolean, got {type(body['stream']).__name__}", param="stream")
    if kind == "generate":
        for name in ("prompt", "system"):
            if not isinstance(body.get(name) or "", str):
                raise BadRequest(f"'{name}' must be a string, got {type(body[name]).__name__}", param=name)
        return
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest(f"'messages' must be an array, got {type(messages).__name__}", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'", param="messages")


def victoria_request(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """goal = the last user message (or the prompt), chat_history = the other turns;
    None when there is no goal to give."""
    if kind == "generate":
        goal = body.get("prompt") or ""
        history = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    else:
        messages = body.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        goal = _text(messages[last].get("content")) if last is not None else ""
        history = [{"role": m["role"], "content": _text(m.get("content"))} for i, m in enumerate(messages) if i != last]
    return {"goal": goal, "chat_history": history} if goal.strip() else None


def victoria_text(result: Any) -> str:
    """Victoria's final answer as text: `output`, or its clarification questions."""
    if not isinstance(result, dict):
        raise UpstreamFailure(f"Victoria answered {type(result).__name__}, not a JSON object")
    status = result.get("status", "success")
    if status == "success":
        output = result.get("output")
        if output is None or isinstance(output, str):
            return output or ""
        return json.dumps(output, ensure_ascii=False)
    if status == "needs_clarification":
        return "\n".join(str(q) for q in result.get("clarification_questions") or [])
    reason = result.get("error") or result.get("message") or "no reason given"
    raise UpstreamFailure(f"Victoria answered status '{status}': {reason}")


def ollama_chunk(kind: str, model: str, text: str, *, done: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": _now()}
    if kind == "chat":
        chunk["message"] = {"role": "assistant", "content": text}
    else:
        chunk["response"] = text
    chunk["done"] = done
    if done:
        chunk["done_reason"] = "stop"
    return chunk


def _openai_message(m: Any, i: int, tool_names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRequest(f"'messages[{i}]' must be an object with a string 'role'", param="messages")
    role = "system" if m["role"] == "developer" else m["role"]
    content = m.get("content")
    out: dict[str, Any] = {"role": role, "content": _text(content)}
    if isinstance(content, list):
        images = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:") or "," not in url:
                    raise BadRequest(f"'messages[{i}]': images must be base64 data: URLs", param="messages")
                images.append(url.split(",", 1)[1])
        if images:
            out["images"] = images
    calls = []
    for j, call in enumerate(m.get("tool_calls") or []):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise BadRequest(f"'messages[{i}].tool_calls[{j}]' must be an object with a 'function' object", param="messages")
        function = call["function"]
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                raise BadRequest(f"'{where}' is not valid JSON: {e.msg}", param="messages") from None
        calls.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
        if call.get("id"):
            tool_names[call["id"]] = function.get("name", "")
    if calls:
        out["tool_calls"] = calls
    if role == "tool" and m.get("tool_call_id") in tool_names:
        out["tool_name"] = tool_names[m["tool_call_id"]]
    return out


def openai_to_ollama(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """An OpenAI chat request -> (Ollama /api/chat body, stream, include_usage)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array", param="messages")
    if body.get("n", 1) != 1:
        raise BadRequest("'n' must be 1: the router returns one choice", param="n")
    tool_names: dict[str, str] = {}
    options: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            options[name] = body[name]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {type(stream).__name__}", param="stream")
    converted = [_openai_message(m, i, tool_names) for i, m in enumerate(messages)]
    out: dict[str, Any] = {"model": model, "messages": converted, "stream": stream}
    if options:
        out["options"] = options
    if body.get("tools"):
        out["tools"] = body["tools"]
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_object":
        out["format"] = "json"
    elif response_format.get("type") == "json_schema":
        out["format"] = (response_format.get("json_schema") or {}).get("schema") or "json"
    return out, stream, bool((body.get("stream_options") or {}).get("include_usage"))


def _openai_tool_calls(calls: list[Any], first_index: int, *, streaming: bool) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": function.get("name", ""), "arguments": arguments}}
        out.append({"index": first_index + i, **entry} if streaming else entry)
    return out


def _finish_reason(final: dict[str, Any], tools: bool) -> str:
    if tools:
        return "tool_calls"
    return "length" if final.get("done_reason") == "length" else "stop"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(final.get("prompt_eval_count") or 0), int(final.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_completion(body: dict[str, Any], ident: str, model: str, created: int) -> dict[str, Any]:
    message = body.get("message") or {}
    calls = message.get("tool_calls") or []
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content") or (None if calls else "")}
    if calls:
        out_message["tool_calls"] = _openai_tool_calls(calls, 0, streaming=False)
    if message.get("thinking"):
        out_message["reasoning_content"] = message["thinking"]
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": out_message, "finish_reason": _finish_reason(body, bool(calls))}],
        "usage": _usage(body),
    }


async def openai_events(
    stream: AsyncIterable[dict[str, Any]], ident: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """Ollama chunks -> OpenAI chat.completion.chunk objects (an error as `{"error"}`)."""

    def event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield event({"role": "assistant", "content": ""})
    calls = 0
    async for chunk in stream:
        if "error" in chunk:
            yield {"error": {"message": str(chunk["error"]), "type": "api_error", "param": None, "code": 502}}
            return
        message = chunk.get("message") or {}
        delta: dict[str, Any] = {}
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        if message.get("tool_calls"):
            delta["tool_calls"] = _openai_tool_calls(message["tool_calls"], calls, streaming=True)
            calls += len(message["tool_calls"])
        if delta:
            yield event(delta)
        if chunk.get("done"):
            yield event({}, _finish_reason(chunk, calls > 0))
            if include_usage:
                yield event({}) | {"choices": [], "usage": _usage(chunk)}
