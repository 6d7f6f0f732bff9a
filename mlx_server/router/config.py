"""Where the router's backends are and how patient it is with them: flags, then the
environment, then defaults (which point at the host when running inside Docker)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DISABLED = "disabled"
CHAIN = ("mlx", "ollama", "victoria")
DEFAULT_PORTS = {"mlx": 11435, "ollama": 11434, "victoria": 8010}
DEFAULT_TIMEOUTS = {"mlx": 120.0, "ollama": 120.0, "victoria": 300.0}
URL_VARS = {"mlx": "MLX_API_URL", "ollama": "OLLAMA_URL", "victoria": "VICTORIA_URL"}
TIMEOUT_VARS = {"mlx": "MLX_API_TIMEOUT", "ollama": "OLLAMA_TIMEOUT", "victoria": "VICTORIA_TIMEOUT"}


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream; `url` None means disabled (skipped)."""

    name: str  # mlx | ollama | victoria
    url: str | None
    timeout: float = 120.0  # seconds to the first chunk, and between chunks
    connect_timeout: float = 2.0
    api_key: str | None = None  # sent as a bearer token (the MLX daemon's server.api_key)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The chain in order (MLX, Ollama, Victoria) and the health-cache knobs."""

    backends: tuple[BackendConfig, ...]
    failure_threshold: int = 3  # consecutive transport failures that open a backend's circuit
    cooldown: float = 15.0  # seconds an open circuit skips its backend before one probe
    probe_timeout: float = 2.0  # health probes and the /api/tags, /api/ps fan-out
    health_interval: float = 30.0  # the proxy probes backends this often; 0 = only requests do

    def __post_init__(self) -> None:
        names = [b.name for b in self.backends]
        if unknown := [n for n in names if n not in CHAIN]:
            raise ValueError(f"unknown router backend '{unknown[0]}' (known: {', '.join(CHAIN)})")
        if len(set(names)) != len(names):
            raise ValueError(f"a router backend is listed twice: {names}")
        if not any(b.url for b in self.backends):
            raise ValueError("every router backend is disabled; enable at least one")
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {self.failure_threshold}")
        for knob in ("cooldown", "probe_timeout", "health_interval"):
            if getattr(self, knob) < 0:
                raise ValueError(f"{knob} must not be negative, got {getattr(self, knob)}")
        for b in self.backends:
            if b.timeout <= 0 or b.connect_timeout <= 0:
                raise ValueError(f"backend {b.name}: timeouts must be positive, got {b.timeout} and {b.connect_timeout}")


def in_docker(env: Mapping[str, str] = os.environ) -> bool:
    return os.path.exists("/.dockerenv") or env.get("DOCKER_CONTAINER", "").lower() == "true"


def backend_url(value: str, where: str) -> str | None:
    """'disabled' -> None; 'host:port' gets http://; anything else must be an http(s) URL."""
    value = value.strip()
    if value.lower() == DISABLED:
        return None
    if "://" not in value:
        value = "http://" + value
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise ValueError(f"{where}: '{value}' is not an http(s) URL (or '{DISABLED}')")
    return value.rstrip("/")


def _env_number(env: Mapping[str, str], var: str, default: float, kind: type = float) -> Any:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{var}: '{raw}' is not {'an integer' if kind is int else 'a number'}") from None


def load_router_config(
    *,
    mlx_url: str | None = None,
    ollama_url: str | None = None,
    victoria_url: str | None = None,
    env: Mapping[str, str] = os.environ,
    docker: bool | None = None,
) -> RouterConfig:
    """Flags beat the environment, which beats the defaults; inside Docker the defaults
    point at the host (host.docker.internal)."""
    host = "host.docker.internal" if (in_docker(env) if docker is None else docker) else "127.0.0.1"
    flags = {"mlx": mlx_url, "ollama": ollama_url, "victoria": victoria_url}
    backends = []
    for name in CHAIN:
        if flags[name]:
            url, where = flags[name], f"--{name}-url"
        elif env.get(URL_VARS[name], "").strip():
            url, where = env[URL_VARS[name]], URL_VARS[name]
        else:
            url, where = f"http://{host}:{DEFAULT_PORTS[name]}", "default"
        backends.append(
            BackendConfig(
                name,
                backend_url(url, where),
                timeout=_env_number(env, TIMEOUT_VARS[name], DEFAULT_TIMEOUTS[name]),
                connect_timeout=_env_number(env, "MLX_ROUTER_CONNECT_TIMEOUT", 2.0),
                api_key=(env.get("MLX_SERVER_API_KEY") or None) if name == "mlx" else None,
            )
        )
    return RouterConfig(
        tuple(backends),
        failure_threshold=_env_number(env, "MLX_ROUTER_FAILURE_THRESHOLD", 3, int),
        cooldown=_env_number(env, "MLX_ROUTER_COOLDOWN", 15.0),
        probe_timeout=_env_number(env, "MLX_ROUTER_PROBE_TIMEOUT", 2.0),
        health_interval=_env_number(env, "MLX_ROUTER_HEALTH_INTERVAL", 30.0),
    )
