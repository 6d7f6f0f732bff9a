"""Liveness and metrics: never rate limited, never behind the API key."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .. import __version__
from ..ledger import ModelMemory
from ..manager import ModelState
from ..metrics import CONTENT_TYPE, LiveModel, LiveReading
from .common import CONFIG, ENGINE, GROUPS, MANAGER, METRICS, REAPER, STARTED, rfc3339


async def health(request: web.Request) -> web.Response:
    """`ok` unless the engine died or a model failed; host memory pressure is only reported."""
    app = request.app
    engine, manager, reaper = app[ENGINE], app[MANAGER], app[REAPER]
    models: list[dict[str, Any]] = []
    for s in manager.snapshot():
        entry: dict[str, Any] = {
            "name": s.name,
            "state": str(s.state),
            "active_requests": s.active_requests,
            "queued": s.queued,
            "size": s.size,
            "pinned": s.pinned,
            "expires_at": rfc3339(s.expires_at) if s.expires_at is not None else None,
            "last_used": rfc3339(s.last_used) if s.last_used else None,
            "memory": memory_json(s.memory),
        }
        if s.error:
            entry["error"] = s.error
        group = app[GROUPS].status(s.name)
        if group is not None:
            entry["group"] = group.to_json()
        models.append(entry)
    pressure = reaper.read()
    host = pressure.host
    ledger = manager.ledger()
    degraded = not engine.alive or any(m["state"] == ModelState.FAILED for m in models)
    body = {
        "status": "degraded" if degraded else "ok",
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - app[STARTED], 3),
        "engine": {"alive": engine.alive, **({"error": engine.dead_reason} if engine.dead_reason else {})},
        "models": models,
        "memory": {
            "total_bytes": host.total,
            "available_bytes": host.available,
            "used_fraction": round(host.used_fraction, 4),
            "pressure": reaper.pressure,
            "pressure_level": str(pressure.level),
            "pressure_source": reaper.source,
            "footprint_bytes": pressure.footprint,
            "budget_bytes": manager.budget,
            "ceiling_bytes": ledger.ceiling,  # the budget, or the device's working set if smaller
            "resident_bytes": ledger.used,  # the older name of used_bytes
            "used_bytes": ledger.used,  # weights, prompt caches, KV and loads under way
            "reserved_bytes": ledger.reserved,
            "kv_bytes": ledger.kv,
            "mlx_active_bytes": ledger.mlx.active,
            "mlx_cache_bytes": ledger.mlx.cache,
        },
        "queue_depth": manager.queue_depth(),
    }
    return web.json_response(body)


def memory_json(m: ModelMemory) -> dict[str, int]:
    """A model's line in the memory ledger, for /health and /api/ps."""
    return {
        "total_bytes": m.total,
        "weights_bytes": m.weights,
        "prompt_cache_bytes": m.prompt_cache,
        "kv_bytes": m.kv,
        "kv_reserved_bytes": m.kv_reserved,
        "kv_measured_bytes": m.kv_measured,
        "loading_bytes": m.loading,
    }


def live_reading(app: web.Application) -> LiveReading:
    """What the gauges show at scrape time."""
    manager = app[MANAGER]
    ledger = manager.ledger()
    return LiveReading(
        models=[
            LiveModel(
                s.name, s.state is ModelState.READY, s.size if s.state is ModelState.READY else 0, s.active_requests, s.memory.kv
            )
            for s in manager.snapshot()
        ],
        queue_depth=manager.queue_depth(),
        system_available_bytes=app[REAPER].read().host.available,
        mlx_active_bytes=ledger.mlx.active,
        mlx_cache_bytes=ledger.mlx.cache,
        reserved_bytes=ledger.reserved,
        group_ranks_up=group_ranks_up(app),
    )


def group_ranks_up(app: web.Application) -> dict[str, int]:
    """Ranks up per distributed model (0 while its group is not running)."""
    groups = app[GROUPS]
    return {
        m.name: (status.ranks_up if (status := groups.status(m.name)) is not None else 0)
        for m in app[CONFIG].models
        if m.distributed is not None
    }


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
