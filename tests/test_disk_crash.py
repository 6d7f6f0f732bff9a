"""The disk prompt cache across restarts and crashes, on the real model (SmolLM2-135M-
Instruct: about 6 prompt tokens/s on this CPU, 46 KB of float32 KV a token).

One cold run fills the tier (its default settings, in a folder of its own): a chat with a
300-token system prompt. Then a new process answers another chat sharing that prompt from
disk (its TTFT against the cold one; with the old fixed threshold of 1,024 tokens nothing
was saved and it was 1.03x). Then daemons are killed with SIGKILL at random moments of
their saves, many times: no torn entry is ever on disk or served, the folder is back
within its limit after each restart, and the last restart answers the cold chat again
with the cold answer."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_server.testing import DaemonProcess, write_config

pytestmark = [pytest.mark.real, pytest.mark.live]

PREFIX = 300  # the system prompt's tokens
LIMIT_GB = 0.045  # three entries of ~15 MB: the saves evict
KILLS = 8
ENTRY = re.compile(r"[0-9a-f]{64}\.safetensors")
FILLER = "The engine thread owns every MLX call; the manager decides what stays resident. "


@dataclass(frozen=True, slots=True)
class Turn:
    ttft: float
    text: str
    cached: int


@dataclass(frozen=True, slots=True)
class Cold:
    config: Path
    folder: Path  # the disk tier's
    system: str
    turn: Turn
    save_seconds: float  # how long the cold run's save took: the window the kills aim at


def chat(url: str, system: str, question: str, max_tokens: int) -> Turn:
    """One greedy chat, streamed: its TTFT (to the first text), text and cached prompt tokens."""
    body = {"model": "demo", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent, first, pieces, cached = time.perf_counter(), None, [], None
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line[6:])
            for choice in payload["choices"]:
                if piece := choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(piece)
            if payload.get("usage"):
                cached = payload["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first is not None and cached is not None
    return Turn(first - sent, "".join(pieces), cached)


def serve(config: Path) -> DaemonProcess:
    daemon = DaemonProcess(config).start()
    daemon.wait_ready("demo", timeout=300)
    return daemon


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cold(tmp_path_factory, real_model) -> Cold:
    tokenizer = load_tokenizer(real_model)
    text = "Session crash. "
    while len(tokenizer.encode(text)) < PREFIX:
        text += FILLER
    system = tokenizer.decode(tokenizer.encode(text)[:PREFIX])
    root = tmp_path_factory.mktemp("disk-crash")
    models = [{"name": "demo", "source": str(real_model), "preload": True, "keep_alive": -1, "context_length": 8192}]
    config = write_config(root / "models.yaml", models, memory={"disk_cache_gb": LIMIT_GB})  # the rest: defaults
    daemon = serve(config)
    try:
        turn = chat(daemon.url, system, "What does the engine thread do?", max_tokens=6)
    finally:
        daemon.stop()
    assert turn.cached == 0
    saved = re.findall(r"disk prompt cache: saved \d+ tokens of 'demo:latest' \(\S+ MB\) in (\S+)s", daemon.log_text())
    assert len(saved) == 1, daemon.log_text()
    return Cold(config, root / "models-prompt-cache", system, turn, float(saved[0]))


def test_a_300_token_shared_prefix_after_a_restart_comes_from_disk(cold):
    daemon = serve(cold.config)
    try:
        warm = chat(daemon.url, cold.system, "Who decides what stays resident?", max_tokens=1)
    finally:
        daemon.stop()
    assert warm.cached >= PREFIX and "disk prompt cache: loaded" in daemon.log_text()
    ratio = warm.ttft / cold.turn.ttft
    print(f"TTFT after a restart {warm.ttft:.2f}s, cold {cold.turn.ttft:.2f}s: {ratio:.3f}x")
    assert ratio <= 0.3


def kill_during_a_save(daemon: DaemonProcess, folder: Path, delay: float, done: threading.Event) -> None:
    """SIGKILL `delay` seconds after a save's temporary file appears (or once `done` is
    set: then no save was seen in time)."""
    while not done.is_set():
        if any(name.startswith(".tmp-") for name in _names(folder)):
            time.sleep(delay)
            break
        time.sleep(0.001)  # the box has two cores: a busy loop would slow the daemon it watches
    daemon.proc.send_signal(signal.SIGKILL)


def _names(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except FileNotFoundError:
        return []


def test_kill_9_during_saves_leaves_no_torn_entry_and_the_tier_within_its_limit(cold):
    models = cold.folder / "demo%3Alatest"
    limit = LIMIT_GB * (1 << 30)
    rng = random.Random(9)
    logs, mid_write = [], 0
    for i in range(KILLS):
        daemon = serve(cold.config)
        done = threading.Event()
        delay = rng.uniform(0, cold.save_seconds / 2)  # the temporary file is seen late on a busy box
        killer = threading.Thread(target=kill_during_a_save, args=(daemon, models, delay, done))
        killer.start()
        try:
            assert folder_bytes(cold.folder) <= limit  # the start deleted what a kill left and evicted
            messages = [{"role": "system", "content": cold.system}, {"role": "user", "content": f"Question {i}: what happens after a crash?"}]
            with suppress(httpx.TransportError):  # the kill may come before the answer is all sent: the save follows the done event
                httpx.post(daemon.url + "/api/chat", json={"model": "demo", "messages": messages, "stream": False,
                                                           "options": {"temperature": 0, "num_predict": 1}}, timeout=600)
            killer.join(timeout=20)  # the save follows the answer within a moment
        finally:
            done.set()
            killer.join()
            daemon.stop()
        logs.append(daemon.log_text())
        names = _names(models)
        mid_write += any(name.startswith(".tmp-") for name in names)
        for name in filter(ENTRY.fullmatch, names):  # every entry on disk is whole: its name is its checksum
            assert hashlib.sha256((models / name).read_bytes()).hexdigest() + ".safetensors" == name
    daemon = serve(cold.config)
    try:
        again = chat(daemon.url, cold.system, "What does the engine thread do?", max_tokens=6)
    finally:
        daemon.stop()
    logs.append(daemon.log_text())
    print(f"{KILLS} kills, {mid_write} with a save's temporary file on disk; folder {folder_bytes(cold.folder) / 1e6:.1f} MB")
    assert mid_write >= KILLS // 2, "the kills should mostly land inside a save"
    assert folder_bytes(cold.folder) <= limit
    assert again.cached >= PREFIX and again.text == cold.turn.text
    assert not [log for log in logs if "ignoring and deleting" in log]  # no torn entry was ever found, let alone served
