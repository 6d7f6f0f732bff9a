"""Liveness, the admission queue and metrics.

/health and /metrics are never rate limited and never behind the API key. /health
speaks both today's shape and the old MLX API Server's (`healthy`, `active_requests`,
`max_concurrent`, `memory.used_percent`, `cached_models`, ...), whose callers treat
only `healthy` and `degraded` as usable.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .. import __version__
from ..admission import Priority
from ..ledger import ModelMemory
from ..manager import ModelSnapshot, ModelState
from ..metrics import CONTENT_TYPE, LiveModel, LiveReading
from ..reaper import PressureLevel
from .keys import CONFIG, ENGINE, GROUPS, MANAGER, METRICS, REAPER, STARTED
from .wire import rfc3339

GiB = 1 << 30  # the old server's `*_gb` memory figures: bytes / 1024**3


async def health(request: web.Request) -> web.Response:
    """`healthy` unless the engine died or a model failed (`degraded`).

    Host memory pressure is reported (`memory.pressure`), never a status: the old
    server's `warning`/`critical` made its own callers give up while it could serve.
    """
    app = request.app
    engine, manager, reaper = app[ENGINE], app[MANAGER], app[REAPER]
    snapshots = manager.snapshot()
    models: list[dict[str, Any]] = []
    for s in snapshots:
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
        "status": "degraded" if degraded else "healthy",
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - app[STARTED], 3),
        "engine": {"alive": engine.alive, **({"error": engine.dead_reason} if engine.dead_reason else {})},
        "models": models,
        "memory": {
            "used_percent": round(100 * host.used_fraction, 1),
            "available_gb": round(host.available / GiB, 2),
            "total_gb": round(host.total / GiB, 2),
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
    return web.json_response(body | old_server_fields(request, snapshots))


def old_server_fields(request: web.Request, snapshots: list[ModelSnapshot]) -> dict[str, Any]:
    """What the old MLX API Server's /health had besides `status` and `memory`."""
    resident = [s for s in snapshots if s.state in (ModelState.LOADING, ModelState.READY, ModelState.UNLOADING)]
    return {
        "active_requests": sum(s.active_requests for s in snapshots),
        "max_concurrent": sum(m.max_concurrency for m in request.app[CONFIG].models),
        "cached_models": [
            {"name": s.name, "active_requests": s.active_requests, "is_loading": s.state is ModelState.LOADING} for s in resident
        ],
        "loading_models": [s.name for s in resident if s.state is ModelState.LOADING],
        "active_model_requests": {s.name: s.active_requests for s in snapshots if s.active_requests},
    }


async def queue_stats(request: web.Request) -> web.Response:
    """Waiting requests by priority, overall and per model, and how long the oldest has waited."""
    manager = request.app[MANAGER]
    queues = manager.queue_snapshot()
    by_priority = {p.label: sum(q.total(p) for q in queues) for p in Priority}
    body = {
        "queue_length": sum(by_priority.values()),
        "by_priority": by_priority,
        "waiting_for_slot": {p.label: sum(q.waiting[p] for q in queues) for p in Priority},
        "waiting_for_load": {p.label: sum(q.waiting_for_load[p] for q in queues) for p in Priority},
        "waits": {p.label: asdict(request.app[METRICS].wait_summary(p)) for p in Priority},
        "max_queue": request.app[CONFIG].server.max_queue,
        "priority_aging_seconds": request.app[CONFIG].server.priority_aging,
        "models": [
            {
                "name": q.name,
                "running": q.running,
                "max_concurrency": q.max_concurrency,
                "waiting_for_slot": {p.label: q.waiting[p] for p in Priority},
                "waiting_for_load": {p.label: q.waiting_for_load[p] for p in Priority},
                "oldest_wait_seconds": round(q.oldest_wait, 3),
            }
            for q in queues
        ],
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
        "activations_bytes": m.activations,
    }


PRESSURE_LEVELS = {PressureLevel.NORMAL: 0, PressureLevel.WARNING: 1, PressureLevel.CRITICAL: 2}


def live_reading(app: web.Application) -> LiveReading:
    """What the gauges show at scrape time."""
    manager = app[MANAGER]
    ledger = manager.ledger()
    queues = manager.queue_snapshot()
    pressure = app[REAPER].read()
    return LiveReading(
        models=[
            LiveModel(
                s.name, s.state is ModelState.READY, s.size if s.state is ModelState.READY else 0, s.active_requests, s.memory.kv
            )
            for s in manager.snapshot()
        ],
        queue_depth={p: sum(q.total(p) for q in queues) for p in Priority},
        system_available_bytes=pressure.host.available,
        pressure_level=PRESSURE_LEVELS[pressure.level],
        mlx_active_bytes=ledger.mlx.active,
        mlx_cache_bytes=ledger.mlx.cache,
        reserved_bytes=ledger.reserved,
        group_ranks_up=group_ranks_up(app),
        cache_spills=app[ENGINE].stats.cache_spills,
        cache_drops=app[ENGINE].stats.cache_drops,
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
    app.router.add_get("/queue/stats", queue_stats)
