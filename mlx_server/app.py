"""Builds the aiohttp Application: routes, middlewares, and the lifetimes of the
engine thread, the manager and the reaper (one cleanup context)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from aiohttp import web

from .api import anthropic, ollama, openai, openapi, responses, status, ui
from .api.keys import CONFIG, ENGINE, GROUPS, MANAGER, METRICS, REAPER, STARTED
from .api.middlewares import access_log_middleware, errors_middleware, make_auth_middleware, make_cors_middleware, make_rate_limit_middleware
from .config import Config
from .engine import Engine
from .group.backend import DispatchBackend, GroupBackend
from .loader import MlxBackend
from .manager import GiB, Manager
from .metrics import Metrics
from .reaper import HostMemory, PressureSignal, Reaper, make_pressure_signal, read_host_memory

log = logging.getLogger("mlx_server.app")


def create_app(
    config: Config,
    *,
    probe: Callable[[], HostMemory] = read_host_memory,
    pressure: PressureSignal | None = None,
    on_engine_death: Callable[[str], None] | None = None,
) -> web.Application:
    """The whole daemon as one Application; `probe` reads host memory and `pressure`
    says how pressed it is (the host's own signal by default; tests fake both);
    `on_engine_death(reason)` runs if the engine thread dies (the daemon exits non-zero)."""
    server = config.server
    middlewares = [make_cors_middleware(server.cors_origins)] if server.cors_origins else []
    middlewares += [access_log_middleware, errors_middleware]
    if server.rate_limit is not None:  # before auth: wrong keys count against the caller's bucket too
        middlewares.append(make_rate_limit_middleware(server.rate_limit.requests, server.rate_limit.per))
    middlewares.append(make_auth_middleware(server.api_key))
    app = web.Application(client_max_size=int(server.max_body_mb * (1 << 20)), middlewares=middlewares)
    app[CONFIG] = config
    app[STARTED] = time.monotonic()
    for module in (ollama, openai, responses, anthropic, status, ui, openapi):
        module.add_routes(app)
    app[METRICS] = Metrics((m.name for m in config.models), (r.canonical for r in app.router.resources()))
    memory = config.memory
    app[ENGINE] = Engine(
        cache_limit_bytes=None if memory.mlx_cache_limit_gb is None else int(memory.mlx_cache_limit_gb * GiB),
        disk_cache_gb=memory.disk_cache_gb,
        disk_cache_dir=memory.disk_cache_dir,
        disk_cache_min_tokens=memory.disk_cache_min_tokens,
    )
    app[GROUPS] = GroupBackend(app[ENGINE])
    app.cleanup_ctx.append(_residency(probe, pressure or make_pressure_signal(memory, probe), on_engine_death))
    return app


def _residency(
    probe: Callable[[], HostMemory], pressure: PressureSignal, on_engine_death: Callable[[str], None] | None
):
    async def residency(app: web.Application) -> AsyncIterator[None]:
        config, engine, metrics = app[CONFIG], app[ENGINE], app[METRICS]
        engine.start()
        backend = MlxBackend(engine, config.memory)
        groups = app[GROUPS]
        distributed = {m.name for m in config.models if m.distributed is not None}
        manager = Manager(
            config,
            DispatchBackend(backend, groups, distributed),
            total_memory=probe().total,
            device_limit=backend.device_limit,
            observer=metrics,
            cache_bytes=backend.cache_bytes,
            kv_bytes=backend.kv_bytes,
            mlx_memory=backend.mlx_memory,
            shrink_caches=backend.shrink_caches,
        )
        groups.on_failure = manager.fail
        reaper = Reaper(manager, config.memory, pressure)
        app[MANAGER] = manager
        app[REAPER] = reaper
        metrics.bind_live(lambda: status.live_reading(app))
        tasks = [asyncio.create_task(manager.run()), asyncio.create_task(reaper.run())]
        tasks.append(asyncio.create_task(_watch_engine(engine, on_engine_death)))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        await manager.close()
        if engine.alive:  # a dead engine has dropped every model already
            await manager.evict_idle("shutdown", enough=lambda: False)
        await groups.close()  # a group that failed or was still loading: no rank outlives the daemon
        await engine.stop()  # drops whatever a cancelled request still held

    return residency


async def _watch_engine(engine: Engine, on_death: Callable[[str], None] | None) -> None:
    """The engine has failed every request already; say why, then let the process end."""
    reason = await engine.died()
    log.critical("the engine thread died (%s): every running and queued request failed", reason)
    if on_death is not None:
        on_death(reason)
