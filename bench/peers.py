"""The peers the daemon is measured against: the engine in-process and `mlx_lm.server`.

The raw peer is the ceiling: `mlx_lm.stream_generate` on the same token ids the
daemon's chat template produces, greedy, no HTTP. `mlx_lm.server` is the anchor:
a subprocess on a free loopback port, reached with the same client as the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm import load, stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_server.testing import free_port

POLL_SECONDS = 0.05  # the same readiness poll as mlx_server.testing.DaemonProcess


@dataclass(frozen=True, slots=True)
class RawRun:
    prefill: float  # call -> first token
    seconds: float  # call -> last token
    tokens: int
    text: str

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True, slots=True)
class RawModel:
    model: Any
    tokenizer: Any
    real: bool  # a trained model; the random test model's answers have text-less byte runs

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids the daemon's chat_prompt builds for these messages."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def load_raw(path: Path, *, real: bool) -> RawModel:
    model, tokenizer = load(str(path))
    return RawModel(model, tokenizer, real)


def raw_generate(raw: RawModel, ids: list[int], max_tokens: int) -> RawRun:
    """One greedy stream_generate on ready-made token ids, timed like an HTTP stream."""
    sampler = make_sampler(0.0)
    first = None
    last = None
    pieces = []
    started = time.perf_counter()
    for last in stream_generate(raw.model, raw.tokenizer, ids, max_tokens=max_tokens, sampler=sampler):
        if first is None:
            first = time.perf_counter()
        pieces.append(last.text)
    end = time.perf_counter()
    assert first is not None and last is not None
    return RawRun(first - started, end - started, last.generation_tokens, "".join(pieces))


def longest_silence(raw: RawModel, ids: list[int], max_tokens: int) -> int:
    """The longest run of greedy tokens that add no text (bytes of a character not yet whole)."""
    longest = run = 0
    for response in stream_generate(raw.model, raw.tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(0.0)):
        run = run + 1 if not response.text else 0
        longest = max(longest, run)
    return longest


def batch_generate(raw: RawModel, prompts: list[list[int]], max_tokens: int) -> list[RawRun]:
    """The same streams through a bare BatchGenerator (the daemon's engine, without the
    daemon): the ceiling for concurrent streams, and what always-batching costs one."""
    batch = BatchGenerator(raw.model, stop_tokens=[[t] for t in raw.tokenizer.eos_token_ids], prefill_batch_size=8)
    detokenizers = [raw.tokenizer.detokenizer for _ in prompts]
    first: list[float | None] = [None] * len(prompts)
    last = [0.0] * len(prompts)
    tokens = [0] * len(prompts)
    started = time.perf_counter()
    try:
        uids = batch.insert(prompts, max_tokens=[max_tokens] * len(prompts), samplers=[make_sampler(0.0)] * len(prompts))
        index = {uid: i for i, uid in enumerate(uids)}
        running = len(prompts)
        while running:
            for response in batch.next()[1]:
                i = index[response.uid]
                now = time.perf_counter()
                first[i] = first[i] or now
                last[i] = now
                detokenizers[i].add_token(response.token)
                tokens[i] += 1
                running -= response.finish_reason is not None
    finally:
        batch.close()
    for d in detokenizers:
        d.finalize()
    return [RawRun(f - started, e - started, n, d.text) for f, e, n, d in zip(first, last, tokens, detokenizers)]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(POLL_SECONDS)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def mlx_lm_server(model: Path, log: Path, *, timeout: float = 120.0) -> Iterator[tuple[str, float]]:
    """`mlx_lm.server --model DIR` on a free loopback port: yields (url, seconds to /health)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_http(url + "/health", proc, timeout)
            yield url, time.perf_counter() - started
        finally:
            stop_process(proc)
