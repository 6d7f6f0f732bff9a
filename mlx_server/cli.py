"""mlx-server serve | route | ps | load | unload | pull | make-test-model"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
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


# --- serve -------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_holder(port: int) -> str:
    """Who holds a TCP port, as well as this user may know."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"{proc.name()} (pid {conn.pid}: {' '.join(proc.cmdline()[:4])})"
    except (psutil.Error, OSError):
        pass
    return "another program"


async def _serve(config) -> int:
    from aiohttp import web

    from .app import create_app

    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=config.server.shutdown_grace)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            log.error("port %d on %s is already in use by %s", config.server.port, config.server.host, _port_holder(config.server.port))
        else:
            log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, e.strerror or e)
        return 1
    log.info("mlx-server %s listening on http://%s:%d (config %s)", __version__, config.server.host, config.server.port, config.path)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: stopping; running streams get %.0fs to finish", signal.Signals(signum).name, config.server.shutdown_grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await runner.cleanup()
    log.info("stopped")
    return 0


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
    from datetime import datetime

    if not expires_at:
        return "-"
    moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    left = moment - time.time()
    if left > 10 * 365 * 86400:
        return "Forever"
    if left <= 0:
        return "now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "now"


def cmd_ps(args: argparse.Namespace) -> int:
    models = _call(args.url, "/api/ps")["models"]
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "UNTIL", "ACTIVE")]
    for m in models:
        processor = "100% GPU" if m.get("size_vram") else "100% CPU"
        rows.append((m["name"], m["digest"][:12], _human_bytes(m["size"]), processor, _until(m.get("expires_at")), str(m.get("active_requests", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    started = time.monotonic()
    body: dict[str, Any] = {"model": args.name, "stream": False}
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    _call(args.url, "/api/generate", body)
    print(f"loaded {args.name} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    _call(args.url, "/api/generate", {"model": args.name, "keep_alive": 0, "stream": False})
    print(f"unloaded {args.name} (or it will be, once its running requests end)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .sources import SourceError, locate

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = config.find(args.name)
    if model is None:
        print(f"error: model '{args.name}' is not in {config.path}", file=sys.stderr)
        return 1
    print(f"pulling {model.name} from {model.source}")
    try:
        local = locate(model)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"success: {local.path} ({_human_bytes(local.weights_bytes)} of weights)")
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from .testing import make_test_model

    path = make_test_model(args.dir, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab, dtype=args.dtype)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote a random-weight test model to {path} ({_human_bytes(size)})")
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
        p.add_argument("--log-level", default=os.environ.get("MLX_SERVER_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-json", action="store_true", help="one JSON object per log line")

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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
