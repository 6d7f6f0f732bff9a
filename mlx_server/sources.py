"""Where a configured model's files are: a local directory or a Hugging Face snapshot.

Blocking file and network work; callers run it with `asyncio.to_thread`. Only
sources from models.yaml ever reach here: a request names a configured model,
never a path or a repo id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import MlxServerError

# The files mlx_lm.load reads weights from (mlx_lm.utils.load_model); other
# *.safetensors in a repo (adapters, a vision tower for another runtime) are not loaded.
WEIGHTS_PATTERN = "model*.safetensors"
# What mlx_lm.load needs of a repo; the same patterns mlx_lm downloads.
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


class SourceError(MlxServerError):
    """The model's files cannot be had; the message is the reason users see."""

    status = 503
    kind = "overloaded_error"


@dataclass(frozen=True, slots=True)
class LocalModel:
    path: Path
    weights_bytes: int  # the weight files mlx_lm loads, on disk: what loading will take, before it happens
    config: dict[str, Any]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def locate(model: ModelConfig) -> LocalModel:
    """The model's local directory, downloading a hub repo first if needed.

    Progress bars follow huggingface_hub's global switch: the daemon turns them
    off, `mlx-server pull` leaves them on.
    """
    path = Path(model.source) if model.local else _download(model.source)
    if not (path / "config.json").is_file():
        raise SourceError(f"no config.json in {path}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"config.json in {path} is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise SourceError(f"config.json in {path} is not a JSON object")
    weights = sorted(path.glob(WEIGHTS_PATTERN))
    if not weights:
        raise SourceError(f"no {WEIGHTS_PATTERN} weights in {path}")
    return LocalModel(path, sum(f.stat().st_size for f in weights), config)


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if offline():
            return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
        return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise SourceError(
            f"'{repo}' is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE); "
            f"run 'mlx-server pull' with network access"
        ) from None
    except Exception as e:  # network errors, 401/404 from the hub, disk full
        raise SourceError(f"cannot download '{repo}' from the Hugging Face hub: {type(e).__name__}: {e}") from None


def context_length(model: ModelConfig, config: dict[str, Any]) -> int:
    """models.yaml wins; otherwise what the model's config.json declares."""
    if model.context_length:
        return model.context_length
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "n_ctx"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def describe(config: dict[str, Any], parameters: int) -> dict[str, Any]:
    """Ollama's `details` for a model directory."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    dtype = str(config.get("torch_dtype") or "").replace("bfloat16", "BF16").replace("float16", "F16").replace("float32", "F32")
    family = str(config.get("model_type") or "unknown")
    return {
        "parent_model": "",
        "format": "mlx",
        "family": family,
        "families": [family],
        "parameter_size": _human_count(parameters) if parameters else "",
        "quantization_level": f"Q{bits}" if bits else (dtype or "unknown"),
    }


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def peek(model: ModelConfig) -> LocalModel | None:
    """The model's files if they are already on disk; never downloads."""
    try:
        if model.local:
            return locate(model)
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model.source, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
        return locate(ModelConfig(name=model.name, source=str(path), local=True))
    except Exception:
        return None
