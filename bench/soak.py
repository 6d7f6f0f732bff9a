"""Soak: mixed traffic against one daemon for a set time, then what it left behind.

    .venv/bin/python bench/soak.py --minutes 10 [--clients 6] [--seed 0] [--max-concurrency 4]
        [--queue-timeout 10] [--daemon-env NAME=VALUE ...]

Starts `mlx-server serve` on a free loopback port with two tiny random-weight
models under a memory budget that holds only one, so the models keep swapping.
A bounded number of clients send a weighted mix: whole streams (Ollama, OpenAI,
Anthropic), non-streamed answers, embeddings, streams dropped mid-answer and
requests dropped mid-prompt, malformed requests, loads and unloads. It prints
requests served, errors by kind and status, 500s (as clients saw them and as the
daemon counted them), leases left in /health, and the daemon's RSS after warm-up
and at a checkpoint about every minute, each read in the same state (traffic
paused, only the first model loaded). At the end, /queue/stats must show no slot
taken and nobody waiting, and every model must unload when asked (/api/ps empty):
a slot leaked by a cancelled waiter shows there. Exits 1 if a target is missed:
zero 500s, zero leaked leases or slots, every model evictable, RSS growth under 5%.
A low --max-concurrency and a short --queue-timeout make the clients' disconnects and
the queue's timeouts race the ends of other requests. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from mlx_server.testing import DaemonProcess, make_test_model, write_config

MODELS = ("alpha", "beta")
BUDGET_GB = 0.015  # one ~10 MB test model and its prompt cache fit, two do not
RSS_TARGET = 0.05
SETTLE = 30.0  # seconds for running requests to end before leases are read


@dataclass
class Tally:
    """What the clients saw; `outcomes` counts kinds like 'ok', '400', '503 busy'."""

    outcomes: Counter = field(default_factory=Counter)
    by_action: Counter = field(default_factory=Counter)
    slowest: dict[str, float] = field(default_factory=dict)
    served: int = 0
    server_errors: list[str] = field(default_factory=list)

    def record(self, action: str, outcome: str, seconds: float, detail: str = "") -> None:
        self.by_action[action] += 1
        self.slowest[action] = max(self.slowest.get(action, 0.0), seconds)
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.served += 1
        if outcome.startswith("5") and not outcome.startswith("503"):
            self.server_errors.append(f"{action}: {outcome} {detail[:300]}")


# --- the traffic -------------------------------------------------------------------------------


def kind_of(status: int, body: str) -> str:
    """A status plus a word on why, for 4xx/5xx answers that are expected under this load."""
    if status != 503:
        return str(status)
    for words, kind in (("not enough memory", "503 memory"), ("busy", "503 busy"), ("failed to load", "503 load failed"), ("shutting down", "503 shutdown")):
        if words in body:
            return kind
    return "503 other"


async def post(session: aiohttp.ClientSession, url: str, body: dict | bytes) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.text()


async def whole_stream(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """A stream read to its end, in one of the three API families' formats."""
    model = rng.choice(MODELS)
    family = rng.choice(("ollama", "openai", "anthropic"))
    tokens = rng.randint(4, 48)
    path, body = {
        "ollama": ("/api/chat", {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "options": {"num_predict": tokens}}),
        "openai": ("/v1/chat/completions", {"model": model, "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "Write a haiku."}]}),
        "anthropic": ("/v1/messages", {"model": model, "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "Hello!"}]}),
    }[family]
    async with session.post(url + path, json=body) as r:
        text = await r.text()
        if r.status != 200:
            return kind_of(r.status, text), text
    finished = {
        "ollama": lambda t: '"done":true' in t.splitlines()[-1],
        "openai": lambda t: t.rstrip().endswith("data: [DONE]"),
        "anthropic": lambda t: "event: message_stop" in t,
    }[family]
    if '"error"' in text or not finished(text):
        return "stream error", text[-300:]
    return "ok", ""


async def answer(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """A non-streamed completion or embedding."""
    model = rng.choice(MODELS)
    path, body = rng.choice(
        (
            ("/api/generate", {"model": model, "prompt": "The quick brown fox", "stream": False, "options": {"num_predict": rng.randint(1, 24)}}),
            ("/v1/completions", {"model": model, "prompt": "def fibonacci(n):", "max_tokens": rng.randint(1, 24)}),
            ("/api/embed", {"model": model, "input": ["memory pressure", "streaming tokens"]}),
            ("/v1/embeddings", {"model": model, "input": "a model server"}),
            ("/v1/messages/count_tokens", {"model": model, "messages": [{"role": "user", "content": "How many?"}]}),
        )
    )
    status, text = await post(session, url + path, body)
    return ("ok" if status == 200 else kind_of(status, text)), text


async def drop_mid_stream(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """Read a few lines of a long stream, then go away. No num_predict, as Ollama's clients
    send it: the request reserves what the context has left and streams until dropped."""
    body = {"model": rng.choice(MODELS), "prompt": "Tell me a long story."}
    async with session.post(url + "/api/generate", json=body) as r:
        if r.status != 200:
            return kind_of(r.status, await r.text()), ""
        for _ in range(rng.randint(1, 6)):
            await r.content.readline()
        r.close()
    return "dropped", ""


async def drop_mid_prompt(url: str, rng: random.Random) -> tuple[str, str]:
    """Send a request with a long prompt and close the socket before any answer."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": rng.choice(MODELS), "prompt": "memory " * rng.randint(200, 1500), "options": {"num_predict": 50}})
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.05))
    writer.close()
    await writer.wait_closed()
    return "dropped", ""


BAD = (  # (path, body): each one wrong in its own way
    ("/api/generate", b"{not json"),
    ("/api/chat", b""),
    ("/v1/chat/completions", b"[1, 2, 3]"),
    ("/api/generate", b'{"model": "alpha", "prompt": "x", "options": {"num_predict": 1e999}}'),
    ("/api/generate", b'{"model": "alpha", "prompt": "x", "options": {"num_ctx": -4}}'),
    ("/api/generate", b'{"model": "beta", "prompt": 5}'),
    ("/api/chat", b'{"model": "/etc/passwd", "messages": []}'),
    ("/v1/chat/completions", b'{"model": "mlx-community/not-configured", "messages": [{"role": "user", "content": "x"}]}'),
    ("/api/chat", b'{"model": "alpha", "messages": [{"role": {}, "content": "x"}]}'),
    ("/api/embed", b'{"model": "beta", "input": "x", "keep_alive": [1]}'),
    ("/v1/messages", b'\xff\xfe{"model": "alpha"}'),
    ("/v1/messages", b'{"model": "beta", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}'),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "max_tokens": 99999999999}'),
    ("/api/generate", b'{"model": "alpha", "prompt": "x", "options": {"temperature": ' + b"9" * 5000 + b"}}"),
)


async def bad_request(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    path, body = rng.choice(BAD)
    status, text = await post(session, url + path, body)
    return ("rejected" if 400 <= status < 500 else kind_of(status, text)), text


async def load_or_unload(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    """Ollama's empty prompt: loads the model, or with keep_alive 0 unloads it."""
    body = {"model": rng.choice(MODELS), "prompt": ""} | ({"keep_alive": 0} if rng.random() < 0.5 else {})
    status, text = await post(session, url + "/api/generate", body)
    return ("ok" if status == 200 else kind_of(status, text)), text


async def look(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    async with session.get(url + rng.choice(("/health", "/metrics", "/api/tags", "/api/ps", "/v1/models"))) as r:
        text = await r.text()
        return ("ok" if r.status == 200 else kind_of(r.status, text)), text


ACTIONS = {  # name: (weight, action)
    "stream": (30, whole_stream),
    "answer": (20, answer),
    "drop mid-stream": (12, drop_mid_stream),
    "drop mid-prompt": (8, lambda session, url, rng: drop_mid_prompt(url, rng)),
    "bad request": (15, bad_request),
    "load/unload": (5, load_or_unload),
    "look": (10, look),
}


async def client(url: str, until: float, rng: random.Random, tally: Tally) -> None:
    names = list(ACTIONS)
    weights = [ACTIONS[n][0] for n in names]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        while time.monotonic() < until:
            name = rng.choices(names, weights)[0]
            started = time.monotonic()
            try:
                outcome, detail = await ACTIONS[name][1](session, url, rng)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                outcome, detail = f"transport {type(e).__name__}", str(e)
            tally.record(name, outcome, time.monotonic() - started, detail)


# --- the daemon and what it is left with ---------------------------------------------------------


async def health(url: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(url + "/health") as r:
            return await r.json()


async def settled(url: str) -> dict:
    """/health once nothing runs or waits, or after SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while True:
        report = await health(url)
        busy = report["queue_depth"] + sum(m["active_requests"] for m in report["models"])
        if not busy or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.2)


async def daemon_500s(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
    return sum(int(float(n)) for n in re.findall(r'^mlx_server_requests_total\{[^}]*status="5(?!03)\d\d"[^}]*\} (\S+)$', text, re.M))


async def left_behind(url: str) -> tuple[int, list[str]]:
    """(slots taken or waited for per /queue/stats, models that would not unload per /api/ps),
    read once nothing runs: both must be empty."""
    await settled(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(url + "/queue/stats") as r:
            queues = await r.json()
        taken = queues["queue_length"] + sum(m["running"] for m in queues["models"])
        for name in MODELS:
            await post(session, url + "/api/generate", {"model": name, "keep_alive": 0})
        deadline = time.monotonic() + SETTLE
        while True:
            async with session.get(url + "/api/ps") as r:
                resident = [m["name"] for m in (await r.json())["models"]]
            if not resident or time.monotonic() > deadline:
                return taken, resident
            await asyncio.sleep(0.2)


async def run_traffic(url: str, seconds: float, clients: int, seed: int, tally: Tally) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(url, until, random.Random(seed * 1000 + i), tally) for i in range(clients)))


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def same_state(url: str) -> dict:
    """Settle, unload both models, load the first and answer once: RSS is read in the
    same residency state at the start and at the end, not mid-swap."""
    await settled(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for name in MODELS:
            await post(session, url + "/api/generate", {"model": name, "keep_alive": 0})
        deadline = time.monotonic() + SETTLE
        while any(m["state"] != "unloaded" for m in (await health(url))["models"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        status, text = await post(session, url + "/api/generate", {"model": MODELS[0], "prompt": "hi", "stream": False, "options": {"num_predict": 4}})
        assert status == 200, text
    await asyncio.sleep(1.0)
    return await settled(url)


async def soak(minutes: float, clients: int, seed: int, env: dict[str, str], max_concurrency: int, queue_timeout: float) -> int:
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mlx-soak-") as tmp:
        root = Path(tmp)
        models = [
            {"name": name, "source": str(make_test_model(root / name, seed=i)), "keep_alive": "5m", "max_concurrency": max_concurrency}
            for i, name in enumerate(MODELS)
        ]
        config = write_config(
            root / "models.yaml",
            models,
            server={"max_queue": 16, "queue_timeout": f"{queue_timeout:g}s"},
            memory={"budget_gb": BUDGET_GB, "prompt_cache_mb": 2},
        )
        with DaemonProcess(config, env=env) as daemon:
            pid = daemon.proc.pid
            total = minutes * 60
            warmup = min(60.0, total * 0.2)
            rounds = max(1, round((total - warmup) / 60))  # a checkpoint about every minute
            extra = f", daemon env {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""
            print(f"soak: {minutes:g} min, {clients} clients, max_concurrency {max_concurrency}, queue_timeout {queue_timeout:g}s, "
                  f"daemon pid {pid} on {daemon.url}{extra}, load average {load_start[0]:.2f}", flush=True)
            await run_traffic(daemon.url, warmup, clients, seed, Tally())  # allocator pools and both models reach their working size
            start_report = await same_state(daemon.url)
            samples = [rss(pid)]
            print(f"  warm-up done: RSS {samples[0] / 1e6:.1f} MB", flush=True)
            tally = Tally()
            leaked = 0
            started = time.monotonic()
            for n in range(rounds):
                await run_traffic(daemon.url, (total - warmup) / rounds, clients, seed + 1 + n, tally)
                report = await settled(daemon.url)  # leases as the traffic left them
                leaked = max(leaked, report["queue_depth"] + sum(m["active_requests"] for m in report["models"]))
                end_report = await same_state(daemon.url)
                samples.append(rss(pid))
                print(f"  checkpoint {n + 1}/{rounds}: {sum(tally.by_action.values())} requests, leases left {leaked}, RSS {samples[-1] / 1e6:.1f} MB, "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
            elapsed = time.monotonic() - started
            counted_500s = await daemon_500s(daemon.url)
            slots_taken, unevictable = await left_behind(daemon.url)
            log = daemon.log_text()
        load_end = os.getloadavg()

    growth = (samples[-1] - samples[0]) / samples[0]
    requests = sum(tally.by_action.values())
    print(f"\nrequests after warm-up: {requests} in {elapsed:.0f}s ({requests / elapsed:.1f}/s), served (200 and complete): {tally.served}")
    print("by action:  " + ", ".join(f"{k} {v}" for k, v in tally.by_action.most_common()))
    print("outcomes:   " + ", ".join(f"{k} {v}" for k, v in tally.outcomes.most_common()))
    print(f"500s:       {len(tally.server_errors)} seen by clients, {counted_500s} counted by the daemon; log: {log.count('Traceback')} tracebacks")
    for line in tally.server_errors[:10]:
        print("   ", line)
    if "Traceback" in log:
        first = log[log.rindex("\n", 0, log.index("Traceback")) + 1 :].splitlines()
        print("first traceback in the daemon log:\n    " + "\n    ".join(first[:60]))
    print(f"leases:     {leaked} left at the worst checkpoint; at the end: models " + ", ".join(f"{m['name']}={m['state']}" for m in report["models"]))
    print(f"at the end: {slots_taken} slots taken or waited for (/queue/stats); still resident after unload: {', '.join(unevictable) or 'none'} (/api/ps)")
    print("slowest:    " + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(tally.slowest.items(), key=lambda kv: -kv[1])))
    print(f"RSS:        {samples[0] / 1e6:.1f} MB after warm-up, {samples[-1] / 1e6:.1f} MB at the end ({growth:+.1%}); "
          f"at each checkpoint, with only {MODELS[0]} loaded: " + " ".join(f"{x / 1e6:.0f}" for x in samples) + " MB")
    print(f"MLX:        active {start_report['memory']['mlx_active_bytes'] / 1e6:.1f} -> {end_report['memory']['mlx_active_bytes'] / 1e6:.1f} MB, "
          f"cache {start_report['memory']['mlx_cache_bytes'] / 1e6:.1f} -> {end_report['memory']['mlx_cache_bytes'] / 1e6:.1f} MB")
    print(f"load avg:   {load_start[0]:.2f} at start, {load_end[0]:.2f} at the end (1 min); {os.cpu_count()} CPUs")
    missed = [
        name
        for name, bad in (
            ("500s", tally.server_errors or counted_500s),
            ("leaked leases", leaked),
            ("leaked slots", slots_taken),
            ("unevictable models", unevictable),
            ("RSS growth", growth >= RSS_TARGET),
        )
        if bad
    ]
    print("targets:    " + (f"MISSED: {', '.join(missed)}" if missed else "met (zero 500s, zero leaked leases or slots, every model evictable, RSS growth under 5%)"))
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-concurrency", type=int, default=4, help="each model's running slots (default 4)")
    parser.add_argument("--queue-timeout", type=float, default=10.0, help="seconds a request waits for a slot or memory (default 10)")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the daemon's environment, e.g. MALLOC_ARENA_MAX=2 to compare allocator settings")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.max_concurrency < 1 or args.queue_timeout <= 0 or not all("=" in e for e in args.daemon_env):
        parser.error("--minutes and --queue-timeout must be positive, --clients and --max-concurrency at least 1, --daemon-env NAME=VALUE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = dict(e.split("=", 1) for e in args.daemon_env)
    return asyncio.run(soak(args.minutes, args.clients, args.seed, env, args.max_concurrency, args.queue_timeout))


if __name__ == "__main__":
    sys.exit(main())
