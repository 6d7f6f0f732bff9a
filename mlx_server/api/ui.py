"""GET /ui: the status page, for people who would rather look than read /metrics.

One HTML file (ui.html: inline CSS, a little JavaScript, nothing fetched from elsewhere).
The server fills it with the same JSON that /health, /api/ps and /queue/stats answer,
rendered as tables, so it works with JavaScript off; the script then polls those routes
and redraws the same sections (its renderer mirrors this one).

/ui is behind `api_key` like every route but /, /health and /metrics: it names models and
their errors. The key is never written into the page or a URL (URLs end up in logs and
history). The polls send what the browser sends for the page itself: a reverse proxy or
a header extension that adds `Authorization` to /ui adds it to them too. Where nothing
does, /api/ps and /queue/stats answer 401, and the page says so and keeps redrawing from
/health, which needs no key.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from datetime import datetime
from importlib.resources import files
from typing import Any

from aiohttp import web

from ..admission import Priority
from . import ollama, status

PAGE = files(__package__).joinpath("ui.html").read_text(encoding="utf-8")
SLOT = "<!--status-->"
# The page's own script runs and no other (a name that slipped past escaping could not add
# one); its polls go back to this server and nowhere else.
SCRIPT_HASH = base64.b64encode(hashlib.sha256(PAGE.split("<script>")[1].split("</script>")[0].encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",  # live numbers, and behind a key
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'; connect-src 'self'; frame-ancestors 'none'"
    ),
}
PRIORITIES = tuple(p.label for p in Priority)


async def page(request: web.Request) -> web.Response:
    health = await _answer(status.health, request)
    ps = await _answer(ollama.ps, request)
    queue = await _answer(status.queue_stats, request)
    return web.Response(text=PAGE.replace(SLOT, render(health, ps, queue, time.time())), content_type="text/html", headers=HEADERS)


async def _answer(handler, request: web.Request) -> dict[str, Any]:
    """What a JSON route answers this request: the page and its polls show the same data."""
    response = await handler(request)
    return json.loads(response.body)


# --- the renderer (ui.html's script has its twin) ------------------------------------------


def render(health: dict, ps: dict, queue: dict, now: float) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return "".join((
        summary(health, f"as rendered by the server at {stamp}"),
        memory(health),
        models(health, ps, now),
        queues(queue),
        errors(health),
    ))


def tag(name: str, body: str = "", **attrs: Any) -> str:
    """`body` is HTML already; attribute names: class_ -> class, data_kv -> data-kv."""
    attributes = "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items())
    return f"<{name}{attributes}>{body}</{name}>"


def text(value: Any) -> str:
    return html.escape(str(value))


def size(n: int) -> str:
    """Bytes in binary units (the script writes them the same way)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def state(model: dict) -> str:
    """A ready model with leases is `busy`: the one thing an operator most wants to see."""
    return "busy" if model["state"] == "ready" and model["active_requests"] else model["state"]


def parts(memory: dict) -> dict[str, int]:
    """A model's ledger line as the bar splits it. KV in use is what its caches measure;
    `reserved` is KV promised beyond that, and the weights a load is still reading."""
    kv = min(memory["kv_measured_bytes"], memory["kv_bytes"])
    return {
        "weights": memory["weights_bytes"],
        "prompt": memory["prompt_cache_bytes"],
        "kv": kv,
        "reserved": memory["kv_bytes"] - kv + memory["loading_bytes"],
    }


KINDS = {"weights": "weights", "prompt": "prompt cache", "kv": "KV in use", "reserved": "reserved, not yet used"}


def summary(health: dict, when: str) -> str:
    engine = "alive" if health["engine"]["alive"] else f"dead: {health['engine'].get('error', '')}"
    pressure = health["memory"]["pressure_level"]
    facts = (
        tag("span", text(health["status"]), class_=f"badge {health['status']}"),
        f"version {text(health['version'])}",
        f"up {text(duration(health['uptime_seconds']))}",
        f"engine {text(engine)}",
        f"memory pressure {text(pressure)}",
        tag("span", text(when), id="updated"),
    )
    return tag("section", tag("p", " · ".join(facts)), id="summary")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h" if seconds >= 86400 else f"{seconds // 3600}h {seconds % 3600 // 60}m"


def memory(health: dict) -> str:
    mem = health["memory"]
    scale = max(mem["ceiling_bytes"], mem["used_bytes"], 1)
    segments = []
    for model in health["models"]:
        shown = [(kind, nbytes) for kind, nbytes in parts(model["memory"]).items() if nbytes > 0]
        for i, (kind, nbytes) in enumerate(shown):
            segments.append(tag(
                "span", "", class_=f"seg k-{kind}" + ("" if i else " first"), style=f"width:{100 * nbytes / scale:.3f}%",
                title=f"{model['name']}: {KINDS[kind]} {size(nbytes)}",
            ))
    legend = "".join(tag("li", tag("i", "", class_=f"k-{kind}") + text(label)) for kind, label in KINDS.items())
    line = (
        f"{size(mem['used_bytes'])} of {size(mem['ceiling_bytes'])} in use "
        f"({size(mem['reserved_bytes'])} promised to running requests and loads); MLX buffer cache "
        f"{size(mem['mlx_cache_bytes'])} outside the ledger; host {size(mem['available_bytes'])} available"
    )
    bar = tag("div", "".join(segments), class_="bar", role="img", aria_label=f"memory: {line}")
    return tag("section", tag("h2", "Memory") + tag("p", text(line)) + bar + tag("ul", legend, class_="legend"), id="memory")


def models(health: dict, ps: dict, now: float) -> str:
    running = {m["name"]: m for m in ps["models"]}
    head = "".join(tag("th", h) for h in ("Model", "State", "Leases", "Queued", "Weights", "Prompt cache", "KV in use", "Reserved", "Total", "Context", "Expires"))
    rows = []
    for model in health["models"]:
        split, entry = parts(model["memory"]), running.get(model["name"], {})
        cells = (
            text(model["name"]), tag("span", text(state(model)), class_=f"state {state(model)}"),
            text(model["active_requests"]), text(model["queued"]),
            *(text(size(split[k])) for k in KINDS), text(size(model["memory"]["total_bytes"])),
            text(entry.get("context_length") or "–"), text(expires(entry.get("expires_at"), now)),
        )
        rows.append(tag(
            "tr", "".join(tag("td", c) for c in cells),
            data_model=model["name"], data_state=state(model), data_kv_bytes=model["memory"]["kv_bytes"],
        ))
    table = tag("table", tag("thead", tag("tr", head)) + tag("tbody", "".join(rows)))
    return tag("section", tag("h2", "Models") + table, id="models")


def expires(stamp: str | None, now: float) -> str:
    if stamp is None:
        return "–"
    when = datetime.fromisoformat(stamp).timestamp()
    if when >= ollama.FOREVER_TIMESTAMP:  # how /api/ps writes "never expires"
        return "never"
    left = when - now
    return "now" if left <= 0 else f"in {duration(left)}"


def queues(queue: dict) -> str:
    head = "".join(tag("th", h) for h in ("Priority", "Waiting for a slot", "Waiting for a load", "Served", "Mean wait"))
    rows = "".join(
        tag("tr", "".join(tag("td", text(c)) for c in (
            p, queue["waiting_for_slot"][p], queue["waiting_for_load"][p],
            queue["waits"][p]["served"], f"{queue['waits'][p]['mean_seconds']:.3f} s",
        )), data_priority=p)
        for p in PRIORITIES
    )
    caption = tag("caption", text(f"{queue['queue_length']} waiting of at most {queue['max_queue']} (server.max_queue)"))
    return tag("section", tag("h2", "Queues") + tag("table", caption + tag("thead", tag("tr", head)) + tag("tbody", rows)), id="queues")


def errors(health: dict) -> str:
    found = [f"engine: {health['engine']['error']}"] if health["engine"].get("error") else []
    found += [f"{m['name']}: {m['error']}" for m in health["models"] if m.get("error")]
    items = "".join(tag("li", text(e)) for e in found) or tag("li", "none", class_="none")
    return tag("section", tag("h2", "Last errors") + tag("ul", items, id="error-list"), id="errors")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", page)
