"""The status page at /ui: its renderer, its place behind the API key, and a headless
Chromium showing a model busy with a long stream, its KV bytes, as the page's own
script redraws it from /health, /api/ps and /queue/stats."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import make_config

from mlx_server.api import ui
from mlx_server.testing import DaemonProcess, write_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "ui-test-key"
MiB = 1 << 20
# Debian's chromium as root, on a machine without a network or a display (see scripts/install_chromium.sh).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)
MAC_CHROMES = ("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome", "/Applications/Chromium.app/Contents/MacOS/Chromium")


def ledger(weights: int = 10 * MiB, kv: int = 0, measured: int = 0, prompt: int = 0, loading: int = 0) -> dict:
    total = weights + prompt + kv + loading
    return {"total_bytes": total, "weights_bytes": weights, "prompt_cache_bytes": prompt, "kv_bytes": kv,
            "kv_reserved_bytes": kv, "kv_measured_bytes": measured, "loading_bytes": loading}


def health_of(*models: dict, engine_error: str | None = None) -> dict:
    """The parts of /health the page reads."""
    return {
        "status": "degraded" if engine_error or any(m["state"] == "failed" for m in models) else "healthy",
        "version": "0.1.0", "uptime_seconds": 3725.0,
        "engine": {"alive": engine_error is None, **({"error": engine_error} if engine_error else {})},
        "models": list(models),
        "memory": {"pressure_level": "normal", "ceiling_bytes": 100 * MiB, "used_bytes": 60 * MiB, "reserved_bytes": 12 * MiB,
                   "mlx_cache_bytes": MiB, "available_bytes": 8 << 30},
    }


def model(name: str, state: str, active: int = 0, error: str | None = None, **memory: int) -> dict:
    return {"name": name, "state": state, "active_requests": active, "queued": 0, "memory": ledger(**memory), **({"error": error} if error else {})}


QUEUE = {
    "queue_length": 1, "max_queue": 256,
    "waiting_for_slot": {"high": 1, "medium": 0, "low": 0}, "waiting_for_load": {"high": 0, "medium": 0, "low": 0},
    "waits": {p: {"served": 3, "mean_seconds": 0.25} for p in ("high", "medium", "low")},
}


def test_the_renderer_marks_a_busy_model_splits_its_kv_and_escapes_errors():
    health = health_of(
        model("busy:latest", "ready", active=2, kv=16 * MiB, measured=4 * MiB),
        model("broken:latest", "failed", weights=0, error="<script>alert(1)</script> not in the cache"),
    )
    now = time.time()
    ps = {"models": [{"name": "busy:latest", "context_length": 4096, "expires_at": "2286-11-20T17:46:40Z"}]}
    page = ui.render(health, ps, QUEUE, now)

    row = re.search(r'<tr data-model="busy:latest" data-state="busy" data-kv-bytes="16777216">(.*?)</tr>', page)
    assert row, page
    cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row.group(1))]
    assert cells == ["busy:latest", "busy", "2", "0", "10.0 MiB", "0 B", "4.0 MiB", "12.0 MiB", "26.0 MiB", "4096", "never"]
    assert 'data-state="failed"' in page and "&lt;script&gt;alert(1)&lt;/script&gt; not in the cache" in page
    assert "<script>" not in page
    # the bar is scaled to the ceiling (100 MiB): weights 10%, KV in use 4%, reserved 12%
    assert re.findall(r'class="seg k-(\w+)(?: first)?" style="width:([\d.]+)%"', page) == [("weights", "10.000"), ("kv", "4.000"), ("reserved", "12.000")]
    assert "1 waiting of at most 256" in page and "up 1h 2m" in page


def test_sizes_durations_and_expiry_read_as_people_write_them():
    assert [ui.size(n) for n in (0, 1023, 1536, 16 * MiB, 3 << 30)] == ["0 B", "1023 B", "1.5 KiB", "16.0 MiB", "3.0 GiB"]
    assert [ui.duration(s) for s in (59, 61, 3725, 90061)] == ["0m 59s", "1m 1s", "1h 2m", "1d 1h"]
    now = 1_800_000_000.0
    assert ui.expires("2286-11-20T17:46:40Z", now) == "never"
    assert ui.expires(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1800)), now) == "in 30m 0s"
    assert ui.expires(None, now) == "–"


async def test_the_page_is_behind_the_api_key_and_never_carries_it(app_client):
    client = await app_client(make_config([{"name": "tiny", "source": "org/tiny"}], server={"api_key": KEY}))
    refused = await client.get("/ui")
    assert refused.status == 401 and "API key" in (await refused.json())["error"]
    assert (await client.get("/health")).status == 200  # what the page's script falls back on
    response = await client.get("/ui", headers={"Authorization": f"Bearer {KEY}"})
    page = await response.text()
    assert response.status == 200 and response.content_type == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp  # its own script only (Chromium runs it, below)
    assert '<tr data-model="tiny:latest" data-state="unloaded" data-kv-bytes="0">' in page  # the table without JavaScript
    assert 'data-priority="high"' in page and "Last errors" in page
    assert KEY not in page
    assert not re.search(r"https?://|\bsrc=|<link|@import", page)  # nothing from elsewhere: no CDN, no framework


# --- a real browser ---------------------------------------------------------------------


def require_chromium() -> str:
    """Chromium or Chrome; Debian's package installed by scripts/install_chromium.sh if missing."""
    def find() -> str | None:
        return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None) or next(
            (p for p in MAC_CHROMES if Path(p).exists()), None
        )

    if find() is None:
        subprocess.run([str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, timeout=900)
    found = find()
    if found is None:
        pytest.skip("no Chromium: scripts/install_chromium.sh could not install Debian's chromium here (it needs apt-get and root)")
    return found


def browse(chromium: str, profile: Path, url: str, *args: str) -> str:
    """Load `url` in a fresh headless Chromium, let its script run for 5 s of virtual time."""
    run = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@contextmanager
def key_proxy(upstream: str, adds_key: Callable[[str], bool]) -> Iterator[str]:
    """What an operator puts in front of the daemon: GETs forwarded with `Authorization`
    added to the paths `adds_key` accepts. Yields its URL."""

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers = {"Authorization": f"Bearer {KEY}"} if adds_key(self.path) else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(upstream + self.path, headers=headers), timeout=10) as r:
                    status, kind, body = r.status, r.headers["Content-Type"], r.read()
            except urllib.error.HTTPError as e:
                status, kind, body = e.code, e.headers["Content-Type"], e.read()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def long_streams(url: str, count: int) -> Iterator[None]:
    """`count` streaming generations kept running (each restarts when it reaches the context)."""
    stop = threading.Event()
    body = json.dumps({"model": "demo", "prompt": "Count:", "options": {"temperature": 0, "num_predict": 100000}}).encode()

    def generate() -> None:
        while not stop.is_set():
            request = urllib.request.Request(url + "/api/generate", data=body, headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(request, timeout=60) as response:
                for _ in response:  # a line per token; leaving closes the stream
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=generate, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def model_row(dom: str, name: str) -> tuple[dict[str, str], list[str]]:
    """The data attributes and cell texts of a model's row in the page."""
    match = re.search(rf'<tr data-model="{re.escape(name)}"([^>]*)>(.*?)</tr>', dom)
    assert match, dom
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', match.group(1)))
    return attributes, [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", match.group(2))]


def as_bytes(size: str) -> float:
    value, unit = size.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def busy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        demo = json.load(r)["models"][0]
    return demo["active_requests"] == 2 and demo["memory"]["kv_bytes"] > 0


@pytest.mark.live
def test_chromium_shows_the_streaming_model_busy_with_its_kv(tmp_path, test_model):
    chromium = require_chromium()
    models = [{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1, "max_concurrency": 2}]
    # a small budget, so the bar shows the model at a readable scale
    config = write_config(tmp_path / "models.yaml", models, server={"api_key": KEY, "shutdown_grace": "1s"}, memory={"budget_gb": 0.08})
    with DaemonProcess(config) as daemon:
        daemon.wait_ready("demo")
        with long_streams(daemon.url, 2), key_proxy(daemon.url, lambda path: True) as proxy, key_proxy(daemon.url, lambda path: path == "/ui") as page_only:
            deadline = time.monotonic() + 30
            while not busy(daemon.url):
                assert time.monotonic() < deadline, "the two streams never ran together"
                time.sleep(0.1)

            dom = browse(chromium, tmp_path / "p1", proxy + "/ui", "--dump-dom")
            assert "live: updated every 5 s" in dom  # the script polled and redrew the page
            attributes, cells = model_row(dom, "demo:latest")
            kv = int(attributes["kv-bytes"])
            assert attributes["state"] == "busy" and cells[1] == "busy" and cells[2] == "2"
            assert kv > 0 and abs(as_bytes(cells[6]) + as_bytes(cells[7]) - kv) <= 0.05 * kv  # KV in use + reserved
            assert cells[9] == "4096"  # from /api/ps: the polls carried the key the proxy adds
            assert 'data-priority="high"' in dom and '<p class="note">' not in dom  # /queue/stats too
            assert re.search(r'class="seg k-(kv|reserved)[^"]*" style="width:[\d.]+%" title="demo:latest: ', dom)
            with urllib.request.urlopen(proxy + "/ui", timeout=10) as r:  # the server's rendering, the script's twin
                served = r.read().decode()
            for shape in (r'<section id="(\w+)"', r"<th>(.*?)</th>", r"<li><i [^>]*></i>(.*?)</li>", r'<tr data-model="([^"]+)" data-state="(\w+)"'):
                assert re.findall(shape, served) == re.findall(shape, dom), shape

            png = tmp_path / "ui.png"
            browse(chromium, tmp_path / "p2", proxy + "/ui", f"--screenshot={png}", "--window-size=1100,720")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
            if os.environ.get("UPDATE_UI_SCREENSHOT"):  # the README's picture: UPDATE_UI_SCREENSHOT=1 scripts/test.sh tests/test_ui.py
                shutil.copyfile(png, ROOT / "docs" / "ui.png")

            # Only the page itself carries the key: the polls of /api/ps and /queue/stats get 401,
            # and the page goes on from /health, saying what it cannot show.
            dom = browse(chromium, tmp_path / "p3", page_only + "/ui", "--dump-dom")
            assert "live: updated every 5 s" in dom and dom.count('<p class="note">') == 2
            attributes, cells = model_row(dom, "demo:latest")
            assert attributes["state"] == "busy" and int(attributes["kv-bytes"]) > 0 and cells[9] == "–"
