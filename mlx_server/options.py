"""Generation options: Ollama's `options` names, validated once, merged in layers.

`defaults.options` < a model's `options` in models.yaml < the request's options.
The OpenAI and Anthropic handlers translate their parameters into these names, so
one validator and one dataclass serve every API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import BadRequest, brief

# Every option the Ollama API documents. Those not in GenerationOptions are
# accepted and ignored (they tune llama.cpp, which MLX does not have).
OLLAMA_OPTION_NAMES = frozenset(
    {
        "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
        "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
        "num_thread", "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p",
        "tfs_z", "typical_p", "repeat_last_n", "temperature", "repeat_penalty",
        "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau",
        "mirostat_eta", "penalize_newline", "stop",
    }
)

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1000
MAX_CONTEXT = 1 << 24


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    num_predict: int = -1  # -1: until the context is full; -2: fill the context
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_ctx: int | None = None


_FIELDS = {f.name for f in fields(GenerationOptions)}


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"option '{name}' must be a number, got {brief(value)}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(f"option '{name}' must be between {lo:g} and {hi:g}, got {brief(value)}", param=name)
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"option '{name}' must be an integer, got {brief(value)}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(f"option '{name}' must be between {lo} and {hi}, got {brief(value)}", param=name)
    return value


def _seed(value: Any) -> int | None:
    """Ollama's seed: -1 asks for a random one (None: the sampler's own randomness)."""
    seed = _integer("seed", value, -(1 << 63), (1 << 64) - 1)
    return None if seed == -1 else seed


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise BadRequest("option 'stop' must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"option 'stop' allows at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    if any(len(s) > MAX_STOP_LENGTH for s in value):
        raise BadRequest(f"option 'stop': each sequence is at most {MAX_STOP_LENGTH} characters", param="stop")
    return tuple(s for s in value if s)


_VALIDATORS = {
    "temperature": lambda v: _number("temperature", v, 0.0, 100.0),
    "top_p": lambda v: _number("top_p", v, 0.0, 1.0),
    "top_k": lambda v: _integer("top_k", v, 0, 1 << 31),
    "min_p": lambda v: _number("min_p", v, 0.0, 1.0),
    "seed": lambda v: _seed(v),
    "num_predict": lambda v: _integer("num_predict", v, -2, MAX_CONTEXT),
    "stop": _stop,
    "repeat_penalty": lambda v: _number("repeat_penalty", v, 0.0, 100.0),
    "repeat_last_n": lambda v: _integer("repeat_last_n", v, -1, MAX_CONTEXT),
    "presence_penalty": lambda v: _number("presence_penalty", v, -100.0, 100.0),
    "frequency_penalty": lambda v: _number("frequency_penalty", v, -100.0, 100.0),
    "num_ctx": lambda v: _integer("num_ctx", v, 1, MAX_CONTEXT),
}


def parse_options(raw: Any, *, strict: bool = False) -> dict[str, Any]:
    """Validate an `options` mapping and keep the options this server acts on.

    `strict` (models.yaml) refuses names Ollama does not know, to catch typos;
    requests, like Ollama's, ignore unknown names. A null value is skipped, as
    Ollama skips it (LangChain sends every unset option as null).
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise BadRequest("'options' must be an object", param="options")
    parsed: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name in _VALIDATORS:
            parsed[name] = _VALIDATORS[name](value)
        elif strict and name not in OLLAMA_OPTION_NAMES:
            raise BadRequest(f"unknown option '{name}'", param=name)
    return parsed


def merge_options(*layers: Mapping[str, Any]) -> GenerationOptions:
    """Later layers win; every layer was validated by `parse_options`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update((k, v) for k, v in layer.items() if k in _FIELDS)
    return GenerationOptions(**merged)
