"""Engine faults injected into a live daemon (a real `mlx-server serve` subprocess).

The faults come in through a `sitecustomize` module this test writes and puts first
on the daemon's PYTHONPATH: it wraps the grammar processor (a Rust panic, an MLX
error), the engine's token handling, and kills the engine thread on SIGUSR1. The
production modules carry no test hook and no fault-injection switch.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.live

INJECT = '''
import ctypes, signal, threading

from mlx_server import structured
from mlx_server.engine.sequence import Sequence


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException, which llguidance raises on a Rust panic."""


_grammar_call = structured._GrammarProcessor.__call__


def grammar_call(self, tokens, logits):
    if self.generated >= 2 and "panic_here" in self.constraint.grammar:
        raise FakePanic("called `Result::unwrap()` on an `Err` value")
    if self.generated >= 2 and "mlx_error_here" in self.constraint.grammar:
        raise RuntimeError("[metal::malloc] Resource limit exceeded")
    return _grammar_call(self, tokens, logits)


structured._GrammarProcessor.__call__ = grammar_call
_take = Sequence.take


def take(self, token, logprobs, finish, eos_ids):
    if self.job.request.max_tokens == 33 and len(self.tokens) == 3:
        raise UnicodeDecodeError("utf-8", b"\\xff", 0, 1, "injected")
    return _take(self, token, logprobs, finish, eos_ids)


Sequence.take = take


def kill_engine(signum, frame):
    for thread in threading.enumerate():
        if thread.name == "mlx-engine":
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))


signal.signal(signal.SIGUSR1, kill_engine)
'''


@pytest.fixture
def faulty(daemon, test_model, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)}
    d = daemon([{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1, "max_concurrency": 8}], env=env)
    d.wait_ready("demo")
    return d


def stream(url: str, body: dict, started: threading.Event | None = None) -> list[dict]:
    """The NDJSON lines of a streamed /api/generate, read to the end."""
    request = urllib.request.Request(url + "/api/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    lines = []
    with urllib.request.urlopen(request, timeout=120) as r:
        for raw in r:
            lines.append(json.loads(raw))
            if started is not None:
                started.set()
    return lines


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def plain(prompt: str, n: int, **extra) -> dict:
    return {"model": "demo", "prompt": prompt, "options": {"num_predict": n, "temperature": 0, **extra}}


@pytest.mark.parametrize(("marker", "words"), [("panic_here", "FakePanic"), ("mlx_error_here", "Resource limit exceeded")], ids=["panic", "mlx-error"])
def test_a_failing_grammar_processor_fails_its_request_and_three_of_four_finish(faulty, marker, words):
    bad = {**plain("json please", 40), "format": {"type": "object", "properties": {marker: {"type": "string"}}}}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda body: stream(faulty.url, body), [bad, *(plain(f"prompt {i}", 12) for i in range(3))]))
    assert words in results[0][-1].get("error", ""), results[0][-1]
    for lines in results[1:]:
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 12
    report = health(faulty.url)
    assert report["engine"]["alive"] and report["status"] == "healthy"


def test_an_exception_in_token_handling_fails_only_its_request(faulty):
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda body: stream(faulty.url, body), [plain("bad", 33), plain("bad seeded", 33, seed=3), plain("good", 10)]))
    assert all("UnicodeDecodeError" in lines[-1].get("error", "") for lines in results[:2]), [r[-1] for r in results]
    assert results[2][-1]["done"] is True and results[2][-1]["eval_count"] == 10
    assert health(faulty.url)["engine"]["alive"]


def test_a_killed_engine_thread_fails_every_stream_and_the_daemon_exits_non_zero(faulty):
    bodies = [plain("stream one", 100_000), plain("stream two", 100_000, seed=5)]
    started = [threading.Event() for _ in bodies]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream, faulty.url, body, event) for body, event in zip(bodies, started)]
        assert all(event.wait(60) for event in started)
        killed_at = time.monotonic()
        faulty.proc.send_signal(signal.SIGUSR1)
        results = [f.result(timeout=30) for f in futures]
    for lines in results:
        assert "engine" in lines[-1].get("error", "").lower() and "SystemExit" in lines[-1]["error"], lines[-1]
    assert faulty.proc.wait(timeout=15) == 70
    assert time.monotonic() - killed_at < 15
    log = faulty.log_text()
    assert "engine thread died" in log and "supervisor restarts" in log
