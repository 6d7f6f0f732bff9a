"""Who may call, and what a request can reach: API key, CORS, rate limit, body size,
the non-loopback warning, and requests that name a path or a repo id. Live daemons."""

from __future__ import annotations

import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import ollama
import openai
import psutil
import pytest
from conftest import make_config

from mlx_server.testing import DaemonProcess, free_port, write_config

pytestmark = pytest.mark.live

KEY = "sk-test-0123456789abcdef"
ORIGIN = "http://ok.example"
PUBLIC = ("/", "/health", "/metrics")
GUARDED_GETS = ("/api/version", "/api/tags", "/api/ps", "/v1/models", "/v1/models/demo", "/openapi.json", "/no/such/route")
GENERATE = {"model": "demo", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}


def model(test_model, **extra) -> dict:
    return {"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1, **extra}


def start(tmp_path_factory, name: str, models: list[dict], *, env: dict | None = None, wait: bool = True, **sections) -> DaemonProcess:
    config = write_config(tmp_path_factory.mktemp(name) / "models.yaml", models, **sections)
    daemon = DaemonProcess(config, env=env).start()
    if wait and models and models[0].get("preload"):
        daemon.wait_ready(models[0]["name"])
    return daemon


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, test_model):
    """api_key from models.yaml, CORS for one origin, a 1 MB body limit."""
    daemon = start(tmp_path_factory, "keyed", [model(test_model)], server={"api_key": KEY, "cors_origins": [ORIGIN], "max_body_mb": 1})
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory, test_model):
    """No api_key, no CORS, the default 16 MB body limit."""
    daemon = start(tmp_path_factory, "open", [model(test_model)])
    yield daemon
    daemon.stop()


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def raw_request(port: int, head: bytes) -> bytes:
    """Send bytes no HTTP client would (non-UTF-8 headers); return the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[0]


# --- api_key ---------------------------------------------------------------------------------------


def test_with_api_key_every_route_but_the_public_ones_needs_it(keyed):
    for path in PUBLIC:
        assert httpx.get(keyed.url + path).status_code == 200, path
    assert httpx.head(keyed.url + "/").status_code == 200
    for path in GUARDED_GETS:
        r = httpx.get(keyed.url + path)
        assert r.status_code == 401, path  # unknown routes too: nothing to enumerate without the key
        assert httpx.get(keyed.url + path, headers=bearer()).status_code == (404 if "no/such" in path else 200), path
    for path, body in (("/api/generate", GENERATE), ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})):
        assert httpx.post(keyed.url + path, json=body).status_code == 401
        assert httpx.post(keyed.url + path, json=body, headers=bearer()).status_code == 200


def test_401_is_in_each_api_familys_shape(keyed):
    ollama_error = httpx.get(keyed.url + "/api/tags").json()
    assert set(ollama_error) == {"error"} and "API key" in ollama_error["error"]
    openai_error = httpx.get(keyed.url + "/v1/models").json()["error"]
    assert openai_error["type"] == "authentication_error" and openai_error["code"] == 401
    anthropic_error = httpx.post(keyed.url + "/v1/messages", json={}).json()
    assert anthropic_error["type"] == "error" and anthropic_error["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer {KEY}"}, 200),
        ({"Authorization": f"Bearer  {KEY} "}, 200),
        ({"x-api-key": KEY}, 200),
        ({"X-Api-Key": KEY}, 200),
        ({}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, 401),
        ({"Authorization": f"Bearer {KEY}x"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": KEY}, 401),
        ({"x-api-key": KEY.upper()}, 401),
        ({"x-api-key": ""}, 401),
        ({"Authorization": "Bearer wrong", "x-api-key": KEY}, 401),  # a bearer token that is wrong is not overruled
    ],
)
def test_key_forms(keyed, headers, status):
    lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    line = raw_request(keyed.port, b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n")
    assert line.startswith(f"HTTP/1.1 {status} ".encode())


def test_header_bytes_that_are_not_utf8_are_a_401_not_a_crash(keyed):
    for header in (b"Authorization: Bearer \xff\xfe\x80", b"x-api-key: \xc3\x28" + KEY.encode()):
        status = raw_request(keyed.port, b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        assert status == b"HTTP/1.1 401 Unauthorized"
    assert httpx.get(keyed.url + "/health").json()["status"] == "healthy"


async def test_the_key_is_compared_in_constant_time(app_client, test_model, monkeypatch):
    """Every check goes through hmac.compare_digest, whatever the supplied key looks like."""
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("mlx_server.api.middlewares.hmac.compare_digest", spy)
    client = await app_client(make_config([model(test_model, preload=False)], server={"api_key": KEY}))
    for supplied in ("", "s", KEY[:5], KEY + "x", "é" * 40, KEY):
        r = await client.get("/api/version", headers={"x-api-key": supplied})
        assert r.status == (200 if supplied == KEY else 401)
    assert [a for a, _ in seen] == [s.encode() for s in ("", "s", KEY[:5], KEY + "x", "é" * 40, KEY)]
    assert all(b == KEY.encode() for _, b in seen)


def test_official_clients_with_and_without_the_key(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list()] == ["demo:latest"]
    assert good.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()

    claude = anthropic.Anthropic(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=60)  # sends x-api-key
    reply = claude.messages.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.output_tokens == 2
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0).messages.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": "hi"}])

    llama = ollama.Client(host=keyed.url, headers=bearer(), timeout=60)
    assert [m.model for m in llama.list().models] == ["demo:latest"]
    assert llama.generate(model="demo", prompt="hi", options={"num_predict": 2}).eval_count == 2
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url, timeout=60).list()
    assert e.value.status_code == 401 and "API key" in e.value.error


def test_without_api_key_clients_need_none(open_daemon):
    assert httpx.get(open_daemon.url + "/api/tags").status_code == 200
    assert httpx.get(open_daemon.url + "/openapi.json").json()["openapi"].startswith("3.1")
    assert openai.OpenAI(base_url=open_daemon.url + "/v1", api_key="anything", max_retries=0).models.list().data[0].id == "demo:latest"
    claude = anthropic.Anthropic(base_url=open_daemon.url, api_key="anything", max_retries=0, timeout=60)
    assert claude.messages.count_tokens(model="demo", messages=[{"role": "user", "content": "hi"}]).input_tokens > 0
    assert ollama.Client(host=open_daemon.url, timeout=60).generate(model="demo", prompt="hi", options={"num_predict": 2}).eval_count == 2


def test_the_key_can_come_from_the_environment(tmp_path_factory, test_model):
    daemon = start(tmp_path_factory, "env", [model(test_model, preload=False)], env={"MLX_SERVER_API_KEY": KEY})
    try:
        assert httpx.get(daemon.url + "/api/version").status_code == 401
        assert httpx.get(daemon.url + "/api/version", headers={"x-api-key": KEY}).status_code == 200
        assert httpx.get(daemon.url + "/health").status_code == 200
    finally:
        daemon.stop()


# --- binding ---------------------------------------------------------------------------------------


def serve_log(tmp_path, test_model, host: str, env: dict) -> tuple[int, str]:
    """Run `serve` on `host` and return its exit code and log. 192.0.2.1 is TEST-NET-1,
    never an address of this machine, so the bind fails and nothing ever listens."""
    config = write_config(tmp_path / f"models-{host}.yaml", [model(test_model, preload=False)])
    run = subprocess.run(
        [sys.executable, "-m", "mlx_server", "serve", "--config", str(config), "--host", host, "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    return run.returncode, run.stdout + run.stderr


def test_a_non_loopback_address_without_a_key_logs_a_loud_warning(tmp_path, test_model):
    env = {k: "" for k in ("MLX_SERVER_API_KEY",)}
    code, log = serve_log(tmp_path, test_model, "192.0.2.1", env)
    assert code == 1 and "cannot listen on 192.0.2.1" in log
    assert "WARNING" in log and "LISTENING ON 192.0.2.1 WITHOUT AN API KEY" in log
    code, log = serve_log(tmp_path, test_model, "192.0.2.1", {"MLX_SERVER_API_KEY": KEY})
    assert code == 1 and "WITHOUT AN API KEY" not in log


def test_the_default_bind_is_loopback_and_quiet(tmp_path, test_model):
    config = write_config(tmp_path / "models.yaml", [model(test_model, preload=False)])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_server", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MLX_SERVER_API_KEY": "", "MLX_SERVER_HOST": ""},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("daemon did not start")
        listening = [c for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    assert "listening on http://127.0.0.1:" in log and "WITHOUT AN API KEY" not in log


# --- CORS -------------------------------------------------------------------------------------------


def test_cors_headers_only_for_listed_origins(keyed, open_daemon):
    listed = {"Origin": ORIGIN, **bearer()}
    r = httpx.get(keyed.url + "/api/tags", headers=listed)
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in r.headers["Vary"]
    r = httpx.get(keyed.url + "/api/tags", headers={"Origin": ORIGIN})  # a 401 a browser may read
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = httpx.get(keyed.url + "/api/tags", headers={"Origin": "http://evil.example", **bearer()})
    assert r.status_code == 200 and not any(h.lower().startswith("access-control-") for h in r.headers)
    r = httpx.get(open_daemon.url + "/api/tags", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and not any(h.lower().startswith("access-control-") for h in r.headers)


def test_cors_preflight_and_streams(keyed):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(keyed.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"] and "Authorization" in r.headers["Access-Control-Allow-Headers"]
    r = httpx.options(keyed.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 405 and "Access-Control-Allow-Origin" not in r.headers
    for path, body in (
        ("/api/generate", {**GENERATE, "stream": True}),
        ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}),
        ("/v1/messages", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}),
    ):
        with httpx.stream("POST", keyed.url + path, json=body, headers={"Origin": ORIGIN, **bearer()}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN, path
            r.read()


# --- body size --------------------------------------------------------------------------------------


def post_bytes(url: str, body: bytes, headers: dict | None = None, *, chunked: bool = False) -> httpx.Response:
    content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    return httpx.post(url, content=content, headers={"Content-Type": "application/json", **(headers or {})}, timeout=60)


def test_a_body_over_max_body_mb_is_413(keyed, open_daemon):
    big = json.dumps({"model": "demo", "prompt": "x" * (1 << 20)}).encode()
    for path in ("/api/generate", "/v1/chat/completions", "/v1/messages"):
        for chunked in (False, True):
            r = post_bytes(keyed.url + path, big, bearer(), chunked=chunked)
            assert r.status_code == 413, (path, chunked, r.text[:200])
            message = json.dumps(r.json())
            assert "too large" in message and "max_body_mb" in message
    under = json.dumps({**GENERATE, "prompt": "hi " * 1000}).encode()
    assert len(under) < 1 << 20 and post_bytes(keyed.url + "/api/generate", under, bearer()).status_code == 200
    huge = json.dumps({"model": "demo", "prompt": "x" * (17 << 20)}).encode()  # the default limit: 16 MB
    assert post_bytes(open_daemon.url + "/api/generate", huge).status_code == 413
    assert httpx.get(open_daemon.url + "/health").json()["models"][0]["active_requests"] == 0


# --- rate limit -------------------------------------------------------------------------------------


def test_rate_limit_per_client_with_retry_after_and_exempt_routes(tmp_path_factory, test_model):
    daemon = start(tmp_path_factory, "rate", [model(test_model, preload=False)], server={"rate_limit": {"requests": 3, "per": "6s"}})
    try:
        with httpx.Client(base_url=daemon.url) as client:
            assert [client.get("/api/version").status_code for _ in range(3)] == [200, 200, 200]
            limited = client.get("/api/version")
            assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 2
            assert "rate limit" in limited.json()["error"]
            error = client.get("/v1/models").json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == 429
            for _ in range(20):  # never limited, however often
                assert [client.get(p).status_code for p in ("/", "/health", "/metrics", "/api/tags")] == [200] * 4
            assert client.head("/").status_code == 200
            other = httpx.Client(base_url=daemon.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
            assert other.get("/api/version").status_code == 200  # its own bucket
            other.close()
            time.sleep(int(limited.headers["Retry-After"]))
            assert client.get("/api/version").status_code == 200
    finally:
        daemon.stop()


def test_wrong_keys_count_against_the_rate_limit(tmp_path_factory, test_model):
    """Keys cannot be guessed at full speed: the limit applies before the key check."""
    daemon = start(tmp_path_factory, "guess", [model(test_model, preload=False)],
                   server={"api_key": "right", "rate_limit": {"requests": 3, "per": "60s"}})
    try:
        with httpx.Client(base_url=daemon.url, headers={"Authorization": "Bearer wrong"}) as client:
            assert [client.get("/api/version").status_code for _ in range(4)] == [401, 401, 401, 429]
    finally:
        daemon.stop()


def test_without_rate_limit_nothing_is_limited(open_daemon):
    with httpx.Client(base_url=open_daemon.url) as client:
        assert {client.get("/api/version").status_code for _ in range(100)} == {200}


# --- requests can only name configured models -------------------------------------------------------


class StubHub(BaseHTTPRequestHandler):
    """A Hugging Face endpoint that records every request and knows no repository."""

    seen: list[str] = []

    def do_GET(self):
        self.seen.append(self.path)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    StubHub.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", StubHub.seen
    server.shutdown()
    server.server_close()


def test_paths_and_repo_ids_in_requests_never_reach_the_loader_or_the_hub(tmp_path_factory, tmp_path, test_model, second_model, hub):
    endpoint, seen = hub
    hf_home = tmp_path / "hf"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home)}
    configured = [model(test_model), {"name": "remote", "source": "someorg/configured-repo"}]
    daemon = start(tmp_path_factory, "names", configured, env=env)
    try:
        names = [
            str(second_model),  # a real model directory that is not configured
            f"{second_model}:latest",
            "../" + second_model.name,
            "~/models/x",
            "mlx-community/Llama-3.2-1B-Instruct-4bit",
            "hf.co/mlx-community/Llama-3.2-1B-Instruct-4bit",
            "https://huggingface.co/mlx-community/Llama-3.2-1B-Instruct-4bit",
            "someorg/configured-repo",  # a configured source is not a name either
        ]
        routes = {
            "/api/generate": lambda n: {"model": n, "prompt": "hi"},
            "/api/chat": lambda n: {"model": n, "messages": []},
            "/api/show": lambda n: {"model": n},
            "/api/pull": lambda n: {"model": n},
            "/api/embed": lambda n: {"model": n, "input": "hi"},
            "/v1/chat/completions": lambda n: {"model": n, "messages": [{"role": "user", "content": "hi"}]},
            "/v1/embeddings": lambda n: {"model": n, "input": "hi"},
            "/v1/messages": lambda n: {"model": n, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        }
        for name in names:
            for path, body in routes.items():
                r = httpx.post(daemon.url + path, json=body(name), timeout=30)
                assert r.status_code == 404 and "not found" in r.text, (path, name, r.text)
            assert httpx.get(daemon.url + "/v1/models/" + name).status_code == 404
        assert seen == []  # not one request reached the hub
        assert {m["name"] for m in httpx.get(daemon.url + "/health").json()["models"]} == {"demo:latest", "remote:latest"}
        assert [m["name"] for m in httpx.get(daemon.url + "/api/ps").json()["models"]] == ["demo:latest"]
        assert not (hf_home / "hub").exists() or not any((hf_home / "hub").iterdir())

        pulled = httpx.post(daemon.url + "/api/pull", json={"model": "remote", "stream": False}, timeout=60)
        assert pulled.status_code == 502 and "someorg/configured-repo" in pulled.text
        assert any("/api/models/someorg/configured-repo/" in path for path in seen)
        assert not any(word in path for path in seen for word in ("mlx-community", "Llama", second_model.name))  # nothing a request named
    finally:
        daemon.stop()
