"""The router against stub upstreams on loopback: the fallback chain, misses, the
circuit breaker, translation both ways, errors after the first chunk, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import openai
import ollama
import pytest
from aiohttp import web

from mlx_server.router import (
    HEADER,
    ROUTER,
    BackendConfig,
    Reply,
    Router,
    RouterConfig,
    Stream,
    Unanswered,
    create_router_app,
    load_router_config,
)
from mlx_server.router.breaker import Admission, Breaker, BreakerState
from mlx_server.router.shapes import openai_to_ollama, victoria_request, victoria_text
from mlx_server.testing import free_port
from victoria_stub import QUESTIONS, REQUESTS, create_victoria_app

SEEN = web.AppKey("seen", list)
PRIORITIES = web.AppKey("priorities", list)  # each request's X-Request-Priority (None: absent)


def make_upstream(label: str, models: dict[str, str]) -> web.Application:
    """An Ollama-API upstream. Each model has a behaviour: ok (answers "<label>: hello"
    in two chunks), busy (503), early-error (an error line first), broken (one chunk,
    then an error line), cut (one chunk, then the connection drops); others are 404."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request.app[SEEN].append(body)
        request.app[PRIORITIES].append(request.headers.get("X-Request-Priority"))
        model = body["model"]
        key = "message" if request.path == "/api/chat" else "response"

        def chunk(text: str, done: bool = False) -> bytes:
            piece = {"role": "assistant", "content": text} if key == "message" else text
            extra = {"done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2} if done else {}
            return json.dumps({"model": model, key: piece, "done": done, **extra}).encode() + b"\n"

        behaviour = models.get(model)
        if behaviour is None:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        if behaviour == "busy":
            return web.json_response({"error": "server busy: queue full"}, status=503, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        if behaviour == "early-error":
            await response.write(b'{"error": "failed to load model"}\n')
            return response
        await response.write(chunk(f"{label}:"))
        if behaviour == "broken":
            await response.write(b'{"error": "engine exploded"}\n')
            return response
        if behaviour == "cut":
            await asyncio.sleep(0.05)
            request.transport.close()
            return response
        await response.write(chunk(" hello"))
        await response.write(chunk("", done=True))
        return response

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": f"{m}:latest", "model": f"{m}:latest", "size": 1, "label": label} for m in models]})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0"})

    app = web.Application()
    app[SEEN] = []
    app[PRIORITIES] = []
    app.router.add_post("/api/chat", answer)
    app.router.add_post("/api/generate", answer)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", tags)
    app.router.add_get("/api/version", version)
    app.router.add_get("/health", version)
    return app


def config(mlx: str | None, ollama_url: str | None, victoria: str | None, *, timeout: float = 5.0, **knobs: Any) -> RouterConfig:
    knobs = {"failure_threshold": 1, "cooldown": 60.0, "health_interval": 0.0, "probe_timeout": 1.0} | knobs
    return RouterConfig(
        (
            BackendConfig("mlx", mlx, timeout=timeout, connect_timeout=1.0),
            BackendConfig("ollama", ollama_url, timeout=timeout, connect_timeout=1.0),
            BackendConfig("victoria", victoria, timeout=timeout, connect_timeout=1.0),
        ),
        **knobs,
    )


def sample(router: Router, name: str, **labels: str) -> float:
    return router.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def upstreams(aiohttp_server):
    """Stub MLX (alpha; busy; early-error; broken; cut), stub Ollama (alpha, beta; busy
    and early-error answer) and the Victoria stand-in; returns their apps and URLs."""
    mlx = make_upstream("mlx", {"alpha": "ok", "busy": "busy", "early": "early-error", "broken": "broken", "cut": "cut"})
    oll = make_upstream("ollama", {"alpha": "ok", "beta": "ok", "busy": "ok", "early": "ok"})
    vic = create_victoria_app()
    servers = [await aiohttp_server(app) for app in (mlx, oll, vic)]
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    return {"mlx": mlx, "ollama": oll, "victoria": vic, "urls": urls}


@pytest.fixture
async def proxy(aiohttp_client, upstreams):
    """The router app in front of the three stubs."""

    async def build(**knobs: Any):
        client = await aiohttp_client(create_router_app(config(*upstreams["urls"], **knobs)), server_kwargs={"handler_cancellation": True})
        return client, client.app[ROUTER]

    return build


@pytest.fixture
async def hung_url():
    """A server that accepts connections and never answers."""
    held = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def chat_body(model: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def read_ndjson(response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (await response.text()).splitlines()]


# --- the circuit breaker, pure ------------------------------------------------------------


def test_breaker_opens_after_threshold_then_one_probe_after_cooldown():
    b = Breaker(threshold=3, cooldown=10.0)
    assert b.admit(0.0) is Admission.TRY
    assert not b.failed("refused", 1.0) and not b.failed("refused", 2.0)
    assert b.state is BreakerState.CLOSED
    assert b.failed("refused", 3.0)  # the third opens it: a new outage
    assert b.state is BreakerState.OPEN
    assert b.admit(12.9) is Admission.SKIP and b.remaining(12.9) == pytest.approx(0.1)
    assert b.admit(13.0) is Admission.PROBE  # cool-down over: exactly one caller probes
    assert b.admit(13.0) is Admission.SKIP
    assert not b.failed("refused", 14.0)  # probe failed: open again, not a new outage
    assert b.state is BreakerState.OPEN and b.admit(23.9) is Admission.SKIP
    assert b.admit(24.0) is Admission.PROBE
    assert b.succeeded() and b.state is BreakerState.CLOSED and b.failures == 0
    assert not b.succeeded()


def test_breaker_success_resets_the_count_and_trip_opens_at_once():
    b = Breaker(threshold=2, cooldown=1.0)
    b.failed("x", 0.0)
    b.succeeded()
    assert not b.failed("x", 0.0)  # consecutive failures only
    b.succeeded()
    assert b.failed("probe failed", 0.0, trip=True)
    b.admit(5.0)
    b.settle()  # a probe abandoned by its caller leaves it open, probed again next time
    assert b.state is BreakerState.OPEN and b.admit(5.0) is Admission.PROBE


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_env_flags_and_docker():
    c = load_router_config(env={}, docker=False)
    assert [(b.name, b.url) for b in c.backends] == [
        ("mlx", "http://127.0.0.1:11435"), ("ollama", "http://127.0.0.1:11434"), ("victoria", "http://127.0.0.1:8010")]
    c = load_router_config(env={"DOCKER_CONTAINER": "true"})
    assert [b.url for b in c.backends] == [
        "http://host.docker.internal:11435", "http://host.docker.internal:11434", "http://host.docker.internal:8010"]
    env = {"MLX_API_URL": "http://10.0.0.5:9000/", "OLLAMA_URL": "disabled", "VICTORIA_URL": "victoria:8010",
           "MLX_API_TIMEOUT": "7.5", "MLX_ROUTER_COOLDOWN": "3", "MLX_ROUTER_FAILURE_THRESHOLD": "5", "MLX_SERVER_API_KEY": "k"}
    c = load_router_config(mlx_url="http://127.0.0.1:1", env=env, docker=False)
    mlx, oll, vic = c.backends
    assert (mlx.url, mlx.timeout, mlx.api_key) == ("http://127.0.0.1:1", 7.5, "k")  # the flag beats MLX_API_URL
    assert oll.url is None and vic.url == "http://victoria:8010" and vic.api_key is None
    assert (c.cooldown, c.failure_threshold) == (3.0, 5)
    assert load_router_config(env={"MLX_API_URL": "http://10.0.0.5:9000/"}, docker=False).backends[0].url == "http://10.0.0.5:9000"


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"mlx_url": "ftp://x"}, {}, "--mlx-url: 'ftp://x' is not an http(s) URL"),
        ({}, {"OLLAMA_URL": "http://"}, "OLLAMA_URL: 'http://' is not an http(s) URL"),
        ({}, {"VICTORIA_TIMEOUT": "soon"}, "VICTORIA_TIMEOUT: 'soon' is not a number"),
        ({}, {"MLX_ROUTER_FAILURE_THRESHOLD": "2.5"}, "MLX_ROUTER_FAILURE_THRESHOLD: '2.5' is not an integer"),
        ({}, {"MLX_ROUTER_FAILURE_THRESHOLD": "0"}, "failure_threshold must be at least 1"),
        ({"mlx_url": "disabled", "ollama_url": "DISABLED", "victoria_url": "disabled"}, {}, "every router backend is disabled"),
    ],
)
def test_config_errors_name_the_culprit(kwargs, env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_router_config(env=env, docker=False, **kwargs)


# --- translation --------------------------------------------------------------------------------


def test_openai_request_becomes_an_ollama_chat():
    body = {
        "model": "alpha",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is "}, {"type": "text", "text": "this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "max_tokens": 12, "temperature": 0.1, "stop": "END", "seed": 4,
        "response_format": {"type": "json_object"}, "stream": True, "stream_options": {"include_usage": True},
    }
    out, stream, usage = openai_to_ollama(body)
    assert (stream, usage) == (True, True)
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is this?", "images": ["AAAA"]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "look", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "a cat", "tool_name": "look"},
    ]
    assert out["options"] == {"temperature": 0.1, "seed": 4, "num_predict": 12, "stop": ["END"]}
    assert out["format"] == "json" and out["stream"] is True


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "'model' is required"),
        ({"model": "a", "messages": []}, "'messages' is required and must be a non-empty array"),
        ({"model": "a", "messages": [{"role": "user", "content": "x"}], "n": 2}, "'n' must be 1"),
        ({"model": "a", "messages": ["hi"]}, "'messages[0]' must be an object"),
        ({"model": "a", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
         "'messages[0].tool_calls[0].function.arguments' is not valid JSON"),
        ({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "images must be base64 data: URLs"),
    ],
)
def test_openai_request_errors(body, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        openai_to_ollama(body)


def test_victoria_gets_goal_and_history():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    assert victoria_request("chat", {"messages": messages}) == {
        "goal": "second",
        "chat_history": [{"role": "system", "content": "sys"}, {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}],
    }
    assert victoria_request("generate", {"prompt": "p", "system": "s"}) == {"goal": "p", "chat_history": [{"role": "system", "content": "s"}]}
    assert victoria_request("chat", {"messages": [{"role": "system", "content": "no user turn"}]}) is None
    assert victoria_text({"status": "needs_clarification", "clarification_questions": ["a?", "b?"]}) == "a?\nb?"
    with pytest.raises(Exception, match="Victoria answered status 'failed': tool crashed"):
        victoria_text({"status": "failed", "error": "tool crashed"})


# --- the chain through the proxy ---------------------------------------------------------------


async def test_each_backend_answers_in_turn(proxy, upstreams):
    client, router = await proxy()
    for model, backend, text in [("alpha", "mlx", "mlx: hello"), ("beta", "ollama", "ollama: hello")]:
        r = await client.post("/api/chat", json=chat_body(model, stream=False))
        assert r.status == 200 and r.headers[HEADER] == backend
        body = await r.json()
        assert body["message"] == {"role": "assistant", "content": text} and body["done"] and body["eval_count"] == 2
    # neither has gamma: Victoria answers, from the last user turn and the earlier ones
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "plan a trip"}]
    r = await client.post("/api/chat", json={"model": "gamma", "messages": messages, "stream": False})
    assert r.headers[HEADER] == "victoria"
    assert (await r.json())["message"]["content"] == "Victoria: plan a trip [1 earlier turns]"
    assert upstreams["victoria"][REQUESTS] == [{"goal": "plan a trip", "chat_history": [{"role": "system", "content": "s"}]}]
    r = await client.post("/api/generate", json={"model": "gamma", "prompt": "sum it up", "stream": True})
    lines = await read_ndjson(r)
    assert r.headers[HEADER] == "victoria" and r.headers["Content-Type"].startswith("application/x-ndjson")
    assert "".join(x["response"] for x in lines) == "Victoria: sum it up [0 earlier turns]"  # not repeated by the done event
    assert lines[-1]["done"] and len(lines) > 3
    # the upstreams were always asked to stream, whatever the caller said
    assert all(b["stream"] is True for b in upstreams["mlx"][SEEN] + upstreams["ollama"][SEEN])
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="not_found") == 3
    assert sample(router, "mlx_router_fallbacks_total", from_backend="ollama", to_backend="victoria", reason="not_found") == 2
    assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="ok") == 1
    assert sample(router, "mlx_router_requests_total", backend="victoria", outcome="ok") == 2
    assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="miss") == 3
    text = await (await client.get("/metrics")).text()
    assert 'mlx_router_backend_up{backend="mlx"} 1.0' in text and "mlx_router_fallbacks_total{" in text


async def test_busy_and_early_errors_are_misses_and_the_backend_stays_up(proxy):
    client, router = await proxy()
    for model, reason in [("busy", "unavailable"), ("early", "error")]:
        r = await client.post("/api/chat", json=chat_body(model))
        assert r.headers[HEADER] == "ollama"
        assert "".join(x["message"]["content"] for x in await read_ndjson(r)) == "ollama: hello"
        assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason=reason) == 1
    assert sample(router, "mlx_router_backend_up", backend="mlx") == 1  # it answered: busy is not down
    assert router.health()["backends"][0]["state"] == "closed"


async def test_failure_after_the_first_chunk_is_an_error_chunk_never_a_switch(proxy, upstreams):
    client, router = await proxy()
    r = await client.post("/api/chat", json=chat_body("broken"))
    assert r.status == 200 and r.headers[HEADER] == "mlx"
    lines = await read_ndjson(r)
    assert lines[0]["message"]["content"] == "mlx:"
    assert lines[-1] == {"error": "mlx failed after the answer had started: engine exploded"}
    r = await client.post("/api/chat", json=chat_body("broken", stream=False))
    assert r.status == 502 and r.headers[HEADER] == "mlx" and "engine exploded" in (await r.json())["error"]
    r = await client.post("/v1/chat/completions", json=chat_body("broken", stream=False))
    assert r.status == 502 and r.headers[HEADER] == "mlx" and "engine exploded" in (await r.json())["error"]["message"]
    # a dropped connection mid-answer: an error chunk too, and it counts against MLX
    r = await client.post("/api/generate", json={"model": "cut", "prompt": "x"})
    lines = await read_ndjson(r)
    assert lines[0]["response"] == "mlx:" and "mlx failed after the answer had started" in lines[-1]["error"]
    assert upstreams["ollama"][SEEN] == [] and upstreams["victoria"][REQUESTS] == []
    assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="error") == 4
    assert sample(router, "mlx_router_backend_up", backend="mlx") == 0  # threshold 1 here

    # the same through the real clients: the error arrives in their own format
    client2, _ = await proxy()  # a fresh router: the cut opened this one's MLX circuit
    seen = []
    async with ollama.AsyncClient(host=str(client2.make_url(""))) as oc:
        with pytest.raises(ollama.ResponseError, match="engine exploded"):
            async for part in await oc.chat(model="broken", messages=[{"role": "user", "content": "hi"}], stream=True):
                seen.append(part.message.content)
    assert seen == ["mlx:"]
    seen = []
    async with openai.AsyncOpenAI(base_url=str(client2.make_url("/v1")), api_key="unused") as ai:
        with pytest.raises(openai.APIError, match="engine exploded"):
            async for event in await ai.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}], stream=True):
                seen.append(event.choices[0].delta.content)
    assert seen == ["", "mlx:"]


async def test_a_hung_backend_costs_one_timeout_then_is_skipped(aiohttp_client, upstreams, hung_url, caplog):
    caplog.set_level(logging.INFO, "mlx_server.router")
    _, oll, vic = upstreams["urls"]
    client = await aiohttp_client(create_router_app(config(hung_url, oll, vic, timeout=1.0)))
    router = client.app[ROUTER]
    started = time.monotonic()
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
    first = time.monotonic() - started
    assert r.headers[HEADER] == "ollama" and 1.0 <= first < 2.0
    for _ in range(3):
        started = time.monotonic()
        r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
        assert r.headers[HEADER] == "ollama" and time.monotonic() - started < 0.5
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="timeout") == 1
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="circuit_open") == 3
    assert sample(router, "mlx_router_backend_up", backend="mlx") == 0
    down = [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
    assert down == [f"backend mlx ({hung_url}) is down: no answer within 1s; skipping it for 60s before the next probe"]
    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded" and health["backends"][0]["state"] == "open" and health["backends"][0]["reason"] == "no answer within 1s"


async def test_a_dead_backend_is_probed_after_the_cooldown_and_used_again(aiohttp_client, aiohttp_server, upstreams, caplog):
    caplog.set_level(logging.INFO, "mlx_server.router")
    port = free_port()
    _, oll, vic = upstreams["urls"]
    client = await aiohttp_client(create_router_app(config(f"http://127.0.0.1:{port}", oll, vic, cooldown=0.5, failure_threshold=2)))
    router = client.app[ROUTER]
    for _ in range(3):  # refused, refused (opens), skipped
        r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
        assert r.headers[HEADER] == "ollama"
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="connection") == 2
    assert sample(router, "mlx_router_fallbacks_total", from_backend="mlx", to_backend="ollama", reason="circuit_open") == 1
    await aiohttp_server(make_upstream("mlx", {"alpha": "ok"}), port=port)  # MLX comes back
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
    assert r.headers[HEADER] == "ollama"  # still cooling down: not even tried
    await asyncio.sleep(0.6)
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
    assert r.headers[HEADER] == "mlx" and (await r.json())["message"]["content"] == "mlx: hello"
    assert sample(router, "mlx_router_backend_up", backend="mlx") == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "mlx_server.router" and ("is down" in r.getMessage() or "up again" in r.getMessage())]
    assert len(messages) == 2 and "is down" in messages[0] and messages[1] == f"backend mlx (http://127.0.0.1:{port}) is up again"


async def test_the_health_loop_finds_a_dead_backend_without_requests(aiohttp_client, upstreams, caplog):
    caplog.set_level(logging.INFO, "mlx_server.router")
    _, oll, vic = upstreams["urls"]
    client = await aiohttp_client(create_router_app(config(f"http://127.0.0.1:{free_port()}", oll, vic, health_interval=0.1, cooldown=0.2)))
    router = client.app[ROUTER]
    await asyncio.sleep(0.8)  # several rounds: probed again after each cool-down, still down
    assert sample(router, "mlx_router_backend_up", backend="mlx") == 0
    assert sample(router, "mlx_router_backend_up", backend="ollama") == 1
    assert len([r for r in caplog.records if "is down" in r.getMessage()]) == 1  # once per state change
    assert (await (await client.get("/health")).json())["backends"][0]["state"] in ("open", "half_open")


async def test_nobody_answers(proxy, aiohttp_client, upstreams):
    mlx, oll, _ = upstreams["urls"]
    client = await aiohttp_client(create_router_app(config(mlx, oll, None)))
    r = await client.post("/api/chat", json=chat_body("gamma"))
    assert r.status == 404 and HEADER not in r.headers
    assert (await r.json())["error"] == (
        "model 'gamma' not found on any backend (mlx: HTTP 404: model 'gamma' not found; ollama: HTTP 404: model 'gamma' not found)")
    r = await client.post("/v1/chat/completions", json={"model": "gamma", "messages": [{"role": "user", "content": "x"}]})
    error = (await r.json())["error"]
    assert r.status == 404 and error["type"] == "not_found_error" and error["param"] == "model"
    client, router = await proxy()
    # Victoria takes any model, but needs a user message
    r = await client.post("/api/chat", json={"model": "gamma", "messages": [{"role": "system", "content": "x"}]})
    assert r.status == 404 and "victoria: Victoria needs a user message as its goal" in (await r.json())["error"]
    dead = f"http://127.0.0.1:{free_port()}"
    client = await aiohttp_client(create_router_app(config(dead, oll, None, cooldown=3.0)))
    r = await client.post("/api/chat", json=chat_body("gamma"))
    assert r.status == 503 and r.headers["Retry-After"] == "3"
    assert "no backend could answer for model 'gamma' (mlx: Cannot connect to host" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("path", "data", "message"),
    [
        ("/api/chat", b"{nope", "invalid JSON"),
        ("/api/chat", b"[1]", "request body must be a JSON object, got list"),
        ("/api/chat", json.dumps({"messages": []}).encode(), "'model' is required and must be a non-empty string"),
        ("/api/chat", json.dumps({"model": "a", "stream": "yes"}).encode(), "'stream' must be a boolean, got str"),
        ("/api/chat", json.dumps({"model": "a", "messages": {"role": "user"}}).encode(), "'messages' must be an array, got dict"),
        ("/api/generate", json.dumps({"model": "a", "prompt": 3}).encode(), "'prompt' must be a string, got int"),
        ("/v1/chat/completions", b"", "request body is empty"),
    ],
)
async def test_bad_requests_are_400_in_the_callers_shape(proxy, path, data, message):
    client, _ = await proxy()
    r = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    body = await r.json()
    assert r.status == 400
    assert message in (body["error"]["message"] if path.startswith("/v1/") else body["error"])


async def test_unknown_routes_and_methods_are_json_errors(proxy):
    client, _ = await proxy()
    r = await client.get("/api/nothing")
    assert r.status == 404 and (await r.json())["error"] == "no route for GET /api/nothing"
    r = await client.get("/v1/chat/completions")
    assert r.status == 405 and (await r.json())["error"]["message"] == "method GET is not allowed on /v1/chat/completions"


async def test_model_lists_are_merged(proxy):
    client, _ = await proxy()
    r = await client.get("/api/tags")
    models = (await r.json())["models"]
    assert r.headers[HEADER] == "mlx, ollama"
    by_name = {m["name"]: m["backend"] for m in models}
    assert by_name["alpha:latest"] == "mlx" and by_name["beta:latest"] == "ollama"  # MLX wins alpha
    assert len(models) == len(by_name)
    r = await client.get("/v1/models")
    data = (await r.json())["data"]
    assert {"id": "beta:latest", "object": "model", "created": 0, "owned_by": "ollama"} in data
    assert [m["name"] for m in (await (await client.get("/api/ps")).json())["models"]] == [m["name"] for m in models]
    assert await (await client.get("/")).text() == "Ollama is running"


async def test_openai_chat_both_ways(proxy):
    client, _ = await proxy()
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused") as ai:
        raw = await ai.chat.completions.with_raw_response.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert raw.headers[HEADER] == "ollama"
        done = raw.parse()
        events = [e async for e in await ai.chat.completions.create(
            model="gamma", messages=[{"role": "user", "content": "clarify: book a table"}], stream=True,
            stream_options={"include_usage": True})]
    assert done.choices[0].message.content == "ollama: hello" and done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 2)
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == "\n".join(QUESTIONS)
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "stop" and events[-1].usage is not None


async def test_library_chat_and_generate(upstreams):
    async with Router(config(*upstreams["urls"])) as router:
        reply = await router.chat("alpha", [{"role": "user", "content": "hi"}], options={"num_predict": 4})
        assert isinstance(reply, Reply) and (reply.backend, reply.text) == ("mlx", "mlx: hello")
        assert upstreams["mlx"][SEEN][-1]["options"] == {"num_predict": 4}
        stream = await router.generate("beta", "hi", stream=True)
        assert isinstance(stream, Stream) and stream.backend == "ollama"
        async with stream:
            chunks = [c async for c in stream]
        assert [c["response"] for c in chunks] == ["ollama:", " hello", ""] and chunks[-1]["done"]
        reply = await router.chat("gamma", [{"role": "user", "content": "go"}])
        assert (reply.backend, reply.text) == ("victoria", "Victoria: go [0 earlier turns]")
        assert upstreams["victoria"][REQUESTS][-1] == {"goal": "go", "chat_history": []}  # stream=False: /run
        with pytest.raises(Unanswered, match="model 'x' not found on any backend"):
            await router.chat("x", [{"role": "system", "content": "no user turn"}])
        # a caller that stops early closes the upstream answer and is counted as cancelled
        async with await router.chat("alpha", [{"role": "user", "content": "hi"}], stream=True) as stream:
            async for _ in stream:
                break
        assert sample(router, "mlx_router_requests_total", backend="mlx", outcome="cancelled") == 1


async def test_victoria_sse_shapes(aiohttp_server):
    """Pieces in content/delta/token/text, a final output when nothing streamed, an error event."""
    script = {
        "pieces": [("token", {"delta": "a"}), ("", {"type": "chunk", "text": "b"}), ("", "plain c"), ("done", {"status": "success", "output": "abc"})],
        "final-only": [("progress", {"step": 1}), ("", {"status": "success", "output": "all at once"})],
        "error": [("error", {"message": "agent crashed"})],
        "late-error": [("token", {"content": "x"}), ("", {"status": "failed", "error": "tool timeout"})],
    }

    async def stream(request: web.Request) -> web.StreamResponse:
        goal = (await request.json())["goal"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event, data in script[goal]:
            payload = data if isinstance(data, str) else json.dumps(data)
            await response.write(((f"event: {event}\n" if event else "") + f"data: {payload}\n\n").encode())
        return response

    app = web.Application()
    app.router.add_post("/stream", stream)
    server = await aiohttp_server(app)
    async with Router(config(None, None, str(server.make_url("")).rstrip("/"))) as router:
        async def text(goal: str) -> list[str]:
            async with await router.chat("m", [{"role": "user", "content": goal}], stream=True) as s:
                return [c.get("error") or c["message"]["content"] async for c in s]

        assert await text("pieces") == ["a", "b", "plain c", ""]
        assert await text("final-only") == ["all at once", ""]
        with pytest.raises(Unanswered, match="victoria: Victoria: agent crashed"):
            await text("error")
        assert (await text("late-error"))[-1] == "victoria failed after the answer had started: Victoria: tool timeout"


async def test_chunks_pass_through_as_they_arrive(aiohttp_client, aiohttp_server):
    """The upstream holds its second chunk until the caller has the first: a router that
    buffered anything would stall here."""
    released = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(json.dumps({"model": model, "message": {"role": "assistant", "content": "first"}, "done": False}).encode() + b"\n")
        await asyncio.wait_for(released.wait(), 5)
        await response.write(json.dumps({"model": model, "message": {"role": "assistant", "content": "second"}, "done": True}).encode() + b"\n")
        return response

    app = web.Application()
    app.router.add_post("/api/chat", answer)
    upstream = await aiohttp_server(app)
    client = await aiohttp_client(create_router_app(config(str(upstream.make_url("")).rstrip("/"), None, None)))
    for path, body in [("/api/chat", chat_body("alpha")), ("/v1/chat/completions", chat_body("alpha"))]:
        released.clear()
        r = await client.post(path, json=body)
        assert r.headers[HEADER] == "mlx"
        line = b""
        while b"first" not in line:
            line = await asyncio.wait_for(r.content.readline(), 2)
        released.set()
        rest = await r.text()
        assert "second" in rest and ("[DONE]" in rest) == path.startswith("/v1/")


async def test_the_priority_header_goes_through_to_mlx_and_ollama(proxy, upstreams):
    client, router = await proxy()
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False), headers={"X-Request-Priority": "High"})
    assert r.status == 200 and r.headers[HEADER] == "mlx"
    r = await client.post("/api/generate", json={"model": "beta", "prompt": "hi", "stream": False}, headers={"X-Request-Priority": "low"})
    assert r.status == 200 and r.headers[HEADER] == "ollama"  # MLX has no beta: the header goes on with the request
    r = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
                          headers={"X-Request-Priority": "medium"})
    assert r.status == 200
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False))
    assert r.status == 200
    assert upstreams["mlx"][PRIORITIES] == ["high", "low", "medium", None]
    assert upstreams["ollama"][PRIORITIES] == ["low"]


async def test_a_bad_priority_header_is_the_callers_400_not_a_fallback(proxy, upstreams):
    client, router = await proxy()
    r = await client.post("/api/chat", json=chat_body("alpha", stream=False), headers={"X-Request-Priority": "urgent"})
    assert r.status == 400 and "'X-Request-Priority' must be one of high, medium, low, got 'urgent'" in (await r.json())["error"]
    assert upstreams["mlx"][SEEN] == [] and upstreams["ollama"][SEEN] == []


async def test_router_health_is_healthy_degraded_or_down(aiohttp_client, upstreams):
    mlx, oll, vic = upstreams["urls"]
    client = await aiohttp_client(create_router_app(config(mlx, oll, None)))
    assert (await (await client.get("/health")).json())["status"] == "healthy"  # a disabled backend is not a fault
    client = await aiohttp_client(create_router_app(config(f"http://127.0.0.1:{free_port()}", oll, None, health_interval=0.05)))
    for _ in range(100):
        if (health := await (await client.get("/health")).json())["status"] != "healthy":
            break
        await asyncio.sleep(0.05)
    assert health["status"] == "degraded" and health["backends"][0]["up"] is False
