"""Builds the aiohttp Application: routes, middlewares, and the lifetimes of the
engine thread, the manager and the reaper (one cleanup context)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from aiohttp import web

from .api import anthropic, ollama, openai, openapi, responses, status
from .api.common import (
    CONFIG,
    ENGINE,
    MANAGER,
    METRICS,
    REAPER,
    STARTED,
    access_log_middleware,
    errors_middleware,
    make_auth_middleware,
    make_cors_middleware,
    make_rate_limit_middleware,
)
from .config import Config
from .engine import Engine
from .loader import MlxBackend
from .manager import Manager
from .metrics import Metrics
from .reaper import HostMemory, Reaper, read_host_memory


def create_app(config: Config, *, probe: Callable[[], HostMemory] = read_host_memory) -> web.Application:
    """The whole daemon as one Application; `probe` reads host memory (tests fake it)."""
    server = config.server
    middlewares = [make_cors_middleware(server.cors_origins)] if server.cors_origins else []
    middlewares += [access_log_middleware, errors_middleware]
    if server.rate_limit is not None:  # before auth: wrong keys count against the caller's bucket too
        middlewares.append(make_rate_limit_middleware(server.rate_limit.requests, server.rate_limit.per))
    middlewares.append(make_auth_middleware(server.api_key))
    app = web.Application(client_max_size=int(server.max_body_mb * (1 << 20)), middlewares=middlewares)
    app[CONFIG] = config
    app[STARTED] = time.monotonic()
    for module in (ollama, openai, responses, anthropic, status, openapi):
        module.add_routes(app)
    app[METRICS] = Metrics((m.name for m in config.models), (r.canonical for r in app.router.resources()))
    app[ENGINE] = Engine()
    app.cleanup_ctx.append(_residency(probe))
    return app


def _residency(probe: Callable[[], HostMemory]):
    async def residency(app: web.Application) -> AsyncIterator[None]:
        config, engine, metrics = app[CONFIG], app[ENGINE], app[METRICS]
        engine.start()
        backend = MlxBackend(engine, config.memory)
        manager = Manager(
            config,
            backend,
            total_memory=probe().total,
            device_limit=lambda: engine.device_info.get("max_recommended_working_set_size"),
            observer=metrics,
            cache_bytes=backend.cache_bytes,
        )
        reaper = Reaper(manager, config.memory, probe)
        app[MANAGER] = manager
        app[REAPER] = reaper
        metrics.bind_live(lambda: status.live_reading(app))
        tasks = [asyncio.create_task(manager.run()), asyncio.create_task(reaper.run())]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        await manager.close()
        await manager.evict_idle("shutdown", enough=lambda: False)
        await engine.stop()  # drops whatever a cancelled request still held

    return residency
