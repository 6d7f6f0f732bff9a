"""The disk prompt cache on a live daemon: a long prompt's KV cache survives a
restart, is served from disk with the same greedy answer, and a corrupt file is
logged and ignored, never served."""

from __future__ import annotations

import random
from pathlib import Path

import openai
import pytest

from mlx_server.testing import DaemonProcess, write_config

WORDS = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
)


def long_prompt(words: int, seed: int) -> str:
    """About 5.8 test-model tokens per word: 200 words are ~1,150 tokens, past DISK_MIN_TOKENS."""
    r = random.Random(seed)
    return " ".join(f"{r.choice(WORDS)}{r.randint(0, 99)}" for _ in range(words))


PROMPT = long_prompt(200, seed=0) + "\nQuestion: what comes next?"


@pytest.fixture
def config(tmp_path, test_model) -> Path:
    models = [{"name": "demo", "source": str(test_model), "preload": True}]
    return write_config(tmp_path / "models.yaml", models, memory={"disk_cache_gb": 0.5, "disk_cache_dir": str(tmp_path / "prompts")})


def complete(daemon: DaemonProcess):
    """(text, prompt tokens, cached prompt tokens) of one greedy completion."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", timeout=600, max_retries=0)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0)
    return r.choices[0].text, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens


def serve(config: Path) -> DaemonProcess:
    daemon = DaemonProcess(config).start()
    daemon.wait_ready("demo")
    return daemon


def test_a_long_prompt_is_served_from_disk_after_a_restart_and_corrupt_files_are_ignored(config, tmp_path):
    daemon = serve(config)
    try:
        cold, prompt_tokens, cached = complete(daemon)
    finally:
        daemon.stop()
    assert prompt_tokens > 1024 and cached == 0
    files = list((tmp_path / "prompts").rglob("*.safetensors"))
    assert len(files) == 1  # saved while idle, or at the latest on shutdown

    daemon = serve(config)
    try:
        warm, _, cached = complete(daemon)
    finally:
        daemon.stop()
    assert warm == cold
    assert cached == prompt_tokens - 1  # all but the last token, which must run for the logits
    assert "disk prompt cache: loaded" in daemon.log_text()

    for file in (tmp_path / "prompts").rglob("*.safetensors"):
        data = bytearray(file.read_bytes())
        data[-1] ^= 0xFF  # in the tensor data: the header (and so the index) still reads
        file.write_bytes(bytes(data))
    daemon = serve(config)
    try:
        again, _, cached = complete(daemon)
    finally:
        daemon.stop()
    assert again == cold and cached == 0
    assert "checksum does not match" in daemon.log_text()
