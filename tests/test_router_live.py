"""The router live on loopback: an `mlx-server serve` as MLX, a second one playing
Ollama (it speaks the Ollama API), the Victoria stand-in; real `ollama` and `openai`
clients; the MLX process killed and started again."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web

from mlx_server.router import HEADER, ROUTER, BackendConfig, Reply, Router, RouterConfig, Stream, create_router_app
from mlx_server.testing import DaemonProcess, free_port
from victoria_stub import REQUESTS, create_victoria_app

pytestmark = pytest.mark.live

COOLDOWN = 8.0  # long enough that a restarted daemon is up before it ends
SHORT = {"num_predict": 8}


@dataclass
class Chain:
    mlx: DaemonProcess  # serves alpha
    ollama: DaemonProcess  # plays Ollama: serves alpha and beta
    victoria: web.Application
    victoria_url: str

    def config(self, **knobs: Any) -> RouterConfig:
        knobs = {"failure_threshold": 2, "cooldown": COOLDOWN, "health_interval": 0.0, "probe_timeout": 2.0} | knobs
        return RouterConfig(
            (
                BackendConfig("mlx", self.mlx.url, timeout=30.0, connect_timeout=1.0),
                BackendConfig("ollama", self.ollama.url, timeout=30.0, connect_timeout=1.0),
                BackendConfig("victoria", self.victoria_url, timeout=30.0, connect_timeout=1.0),
            ),
            **knobs,
        )


@pytest.fixture
async def chain(daemon, test_model, second_model, aiohttp_server) -> Chain:
    mlx = daemon([{"name": "alpha", "source": str(test_model), "preload": True}])
    oll = daemon([{"name": "alpha", "source": str(test_model), "preload": True},
                  {"name": "beta", "source": str(second_model), "preload": True}])
    mlx.wait_ready("alpha")
    oll.wait_ready("alpha")
    oll.wait_ready("beta")
    victoria = create_victoria_app()
    server = await aiohttp_server(victoria)
    return Chain(mlx, oll, victoria, str(server.make_url("")).rstrip("/"))


@pytest.fixture
async def router_client(aiohttp_client, chain):
    async def build(**knobs: Any):
        return await aiohttp_client(create_router_app(chain.config(**knobs)), server_kwargs={"handler_cancellation": True})

    return build


def sample(router: Router, name: str, **labels: str) -> float:
    return router.registry.get_sample_value(name, labels) or 0.0


def chat(model: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "options": SHORT, **extra}


async def test_mlx_then_ollama_then_victoria(chain, router_client):
    client = await router_client()
    router = client.app[ROUTER]
    r = await client.post("/api/chat", json=chat("alpha", stream=False))
    body = await r.json()
    assert r.status == 200 and r.headers[HEADER] == "mlx"
    assert body["model"] == "alpha" and body["done"] and body["eval_count"] > 0 and isinstance(body["message"]["content"], str)
    r = await client.post("/api/generate", json={"model": "beta", "prompt": "hi", "stream": False, "options": SHORT})
    body = await r.json()
    assert r.status == 200 and r.headers[HEADER] == "ollama" and body["model"] == "beta" and body["eval_count"] > 0
    messages = [{"role": "user", "content": "find flights"}, {"role": "assistant", "content": "where to?"},
                {"role": "user", "content": "Lisbon"}]
    r = await client.post("/api/chat", json={"model": "gamma", "messages": messages, "stream": False})
    assert r.headers[HEADER] == "victoria"
    assert (await r.json())["message"]["content"] == "Victoria: Lisbon [2 earlier turns]"
    assert chain.victoria[REQUESTS][-1] == {"goal": "Lisbon", "chat_history": messages[:2]}
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="not_found") == 2
    assert sample(router, "mlx_router_fallbacks_total", from_backend="ollama", to_backend="victoria", reason="not_found") == 1
    for backend in ("mlx", "ollama", "victoria"):
        assert sample(router, "mlx_router_requests_total", backend=backend, outcome="ok") == 1
    r = await client.get("/api/tags")
    assert r.headers[HEADER] == "mlx, ollama"
    assert {m["name"]: m["backend"] for m in (await r.json())["models"]} == {"alpha:latest": "mlx", "beta:latest": "ollama"}
    loaded = {m["name"]: m["backend"] for m in (await (await client.get("/api/ps")).json())["models"]}
    assert loaded == {"alpha:latest": "mlx", "beta:latest": "ollama"}


async def test_streaming_with_the_ollama_client(chain, router_client):
    client = await router_client()
    async with ollama.AsyncClient(host=str(client.make_url(""))) as oc:
        for model, backend in [("alpha", "mlx"), ("beta", "ollama"), ("gamma", "victoria")]:
            parts = [p async for p in await oc.chat(model=model, messages=[{"role": "user", "content": "plan a picnic"}],
                                                     stream=True, options=SHORT)]
            assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
            assert all(p.model == model for p in parts)
            if backend == "victoria":
                assert "".join(p.message.content for p in parts) == "Victoria: plan a picnic [0 earlier turns]"
            else:
                assert parts[-1].eval_count >= len(parts) - 1  # a chunk per decoded piece
        parts = [p async for p in await oc.generate(model="beta", prompt="hi", stream=True, options=SHORT)]
        assert parts[-1].done and parts[-1].eval_count > 0
        listed = await oc.list()
        assert {m.model for m in listed.models} == {"alpha:latest", "beta:latest"}
    assert client.app[ROUTER].registry.get_sample_value("mlx_router_requests_total", {"backend": "ollama", "outcome": "ok"}) == 2


async def test_streaming_with_the_openai_client(chain, router_client):
    client = await router_client()
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused") as ai:
        for model, backend in [("alpha", "mlx"), ("beta", "ollama"), ("gamma", "victoria")]:
            raw = await ai.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "plan a picnic"}], max_tokens=8, stream=True,
                stream_options={"include_usage": True})
            assert raw.headers[HEADER] == backend and raw.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in raw.parse()]
            choices = [e.choices[0] for e in events if e.choices]
            assert choices[0].delta.role == "assistant" and choices[-1].finish_reason in ("stop", "length")
            assert len(choices) > 3 and all(e.model == model for e in events)
            text = "".join(c.delta.content or "" for c in choices)
            if backend == "victoria":
                assert text == "Victoria: plan a picnic [0 earlier turns]"
            else:
                assert events[-1].usage.completion_tokens >= len(choices) - 2  # role chunk, pieces, finish chunk
        done = await ai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
        assert {m.id: m.owned_by for m in (await ai.models.list()).data} == {"alpha:latest": "mlx", "beta:latest": "ollama"}


async def test_mlx_killed_then_skipped_then_used_again(chain, router_client, caplog):
    caplog.set_level(logging.INFO, "mlx_server.router")
    client = await router_client()
    router = client.app[ROUTER]
    greedy = {"num_predict": 2000, "temperature": 0}  # long: this model never ends "hi" greedily early

    async with ollama.AsyncClient(host=str(client.make_url(""))) as oc:
        # killed mid-answer: the caller gets an error chunk, never a second backend
        seen: list[str] = []
        with pytest.raises(ollama.ResponseError, match="mlx failed after the answer had started"):
            async for part in await oc.chat(model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True, options=greedy):
                seen.append(part.model)
                if len(seen) == 1:
                    chain.mlx.kill()
        assert seen and set(seen) == {"alpha"}
        assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="error") == 1
        assert sample(router, "mlx_router_requests_total", backend="ollama", outcome="ok") == 0

        # the next request: refused at once (the second failure opens the circuit), Ollama answers
        started = time.monotonic()
        r = await client.post("/api/chat", json=chat("alpha", stream=False))
        opened = time.monotonic()
        assert r.headers[HEADER] == "ollama" and (await r.json())["done"]
        assert opened - started < 2.0
        assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="connection") == 1
        assert sample(router, "mlx_router_backend_up", backend="mlx") == 0

        # later requests skip MLX without trying it
        for _ in range(3):
            started = time.monotonic()
            parts = [p async for p in await oc.chat(model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True, options=SHORT)]
            assert parts[-1].done and time.monotonic() - started < 2.0
        assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="circuit_open") == 3

        # MLX comes back on the same port: skipped until the cool-down ends, then used again
        revived = DaemonProcess(chain.mlx.config, port=chain.mlx.port).start()
        try:
            revived.wait_ready("alpha")
            assert time.monotonic() - opened < COOLDOWN - 0.5, "the daemon restarted too slowly for this test"
            r = await client.post("/api/chat", json=chat("alpha", stream=False))
            assert r.headers[HEADER] == "ollama"
            await asyncio.sleep(opened + COOLDOWN + 0.2 - time.monotonic())
            r = await client.post("/api/chat", json=chat("alpha", stream=False))
            assert r.headers[HEADER] == "mlx" and (await r.json())["done"]
            assert sample(router, "mlx_router_backend_up", backend="mlx") == 1
            parts = [p async for p in await oc.chat(model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True, options=SHORT)]
            assert parts[-1].done
            assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="ok") == 2
        finally:
            revived.stop()
    states = [r.getMessage() for r in caplog.records if "is down" in r.getMessage() or "up again" in r.getMessage()]
    assert len(states) == 2, states  # once per state change, not per request
    assert states[0].startswith(f"backend mlx ({chain.mlx.url}) is down: Cannot connect to host")
    assert states[1] == f"backend mlx ({chain.mlx.url}) is up again"


async def test_the_library(chain):
    async with Router(chain.config()) as router:
        stream = await router.chat("alpha", [{"role": "user", "content": "hi"}], stream=True, options=SHORT)
        assert isinstance(stream, Stream) and stream.backend == "mlx"
        async with stream:
            chunks = [c async for c in stream]
        assert chunks[-1]["done"] and chunks[-1]["eval_count"] >= len(chunks) - 1 > 1
        reply = await router.generate("beta", "hi", options=SHORT)
        assert isinstance(reply, Reply) and reply.backend == "ollama" and reply.body["done"] and reply.body["eval_count"] > 0
        reply = await router.chat("gamma", [{"role": "user", "content": "clarify: book a table"}])
        assert (reply.backend, reply.text) == ("victoria", "Which city do you mean?\nFor which day?")


async def test_the_route_command(chain, tmp_path):
    """`mlx-server route` with flags and environment, until SIGTERM."""
    port = free_port()
    env = {**os.environ, "OLLAMA_URL": chain.ollama.url, "VICTORIA_URL": "disabled", "MLX_ROUTER_HEALTH_INTERVAL": "0"}
    env.pop("DOCKER_CONTAINER", None)
    log_path = tmp_path / "route.log"
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlx_server", "route", "--port", str(port), "--mlx-url", chain.mlx.url, "--log-json",
            env=env, stdout=log_file, stderr=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    try:
                        async with session.get(url + "/") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                async with session.post(url + "/api/chat", json=chat("beta", stream=False)) as r:
                    assert r.status == 200 and r.headers[HEADER] == "ollama"
                async with session.post(url + "/api/chat", json=chat("gamma", stream=False)) as r:
                    assert r.status == 404 and "model 'gamma' not found on any backend" in (await r.json())["error"]
                async with session.get(url + "/health") as r:
                    assert [b["state"] for b in (await r.json())["backends"]] == ["closed", "closed", "disabled"]
                async with session.get(url + "/metrics") as r:
                    assert 'mlx_router_requests_total{backend="ollama",outcome="ok"} 1.0' in await r.text()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = log_path.read_text()
    assert f'"msg": "mlx-server router listening on http://127.0.0.1:{port} (mlx {chain.mlx.url} -> ollama {chain.ollama.url} -> victoria disabled)"' in text
