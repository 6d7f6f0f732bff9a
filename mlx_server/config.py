"""models.yaml + environment -> frozen dataclasses.

Every error names the file, the model and the key, because the person reading it
is fixing a YAML file by hand, often from a launchd log.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from .admission import DEFAULT_AGING, PRIORITY_NAMES, Priority, parse_priority
from .errors import BadRequest, brief
from .options import parse_options

DEFAULT_PORT = 11435
FOREVER = math.inf
FOREVER_AFTER = 100 * 365 * 86400.0
DEFAULT_DISK_CACHE_DIR = "~/.cache/mlx-server/prompt-cache"
_DEFAULT_DISK_CACHE_PATH = Path(DEFAULT_DISK_CACHE_DIR).expanduser()

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NUMBER_RE = re.compile(r"\d+(\.\d+)?")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(ValueError):
    """models.yaml is wrong; the message says where."""


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "30s", "5m", "1h30m", "-1".

    Raises ValueError with a message meant for the person who wrote the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) > 1e300 or not math.isfinite(value):
            raise ValueError(f"bad duration {brief(value)}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"bad duration {value!r}")
    text = value.strip().lower()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if _NUMBER_RE.fullmatch(body):  # not float(): it takes "inf", "nan" and "1e999"
        return sign * float(body)
    parts = _DURATION_RE.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"bad duration {value!r} (use seconds, or e.g. '30s', '5m', '1h', '-1')")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def parse_keep_alive(value: Any) -> float:
    """Ollama semantics: negative means forever, 0 means unload after use.

    Longer than a century is forever too, so that expiry times stay datable.
    """
    seconds = parse_duration(value)
    return FOREVER if seconds < 0 or seconds > FOREVER_AFTER else seconds


def normalize_name(name: str) -> str:
    """Ollama names: `name:tag`, with `:latest` implied."""
    return name if ":" in name else f"{name}:latest"


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    per: float


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_queue: int = 256
    max_body_mb: float = 16.0
    shutdown_grace: float = 30.0
    rate_limit: RateLimit | None = None
    cors_origins: tuple[str, ...] = ()
    queue_timeout: float = 120.0  # longest a request waits for a slot or for memory
    priority_aging: float = DEFAULT_AGING  # waiting this long raises a request one priority level


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    budget_gb: float | None = None
    reserve_gb: float = 4.0
    high_water: float = 0.90
    low_water: float = 0.80
    check_interval: float = 2.0
    max_loaded_models: int = 0
    prompt_cache_mb: float = 512.0  # per model, counted in its memory
    disk_cache_gb: float = 8.0  # prompt caches kept on disk across unloads and restarts; 0 = off
    disk_cache_dir: Path = _DEFAULT_DISK_CACHE_PATH  # parsing takes $XDG_CACHE_HOME into account
    disk_cache_min_tokens: int = 256  # the floor under the measured cost: shorter caches get no file
    mlx_cache_limit_gb: float | None = 1.0  # MLX's buffer cache of freed memory; None: MLX's default


DISTRIBUTED_BACKENDS = ("ring", "jaccl")
DISTRIBUTED_MODES = ("tensor", "pipeline")
MAX_LOCAL_RANKS = 64


@dataclass(frozen=True, slots=True)
class DistributedConfig:
    """One model sharded over ranks that `mlx.launch` starts (see mlx_server/group)."""

    ranks: int  # how many ranks: len(hosts), the hostfile's hosts, or `ranks:` (all local)
    hosts: tuple[str, ...] = ()  # empty: `ranks` local processes on 127.0.0.1
    hostfile: str | None = None  # mlx.distributed_config's JSON (what jaccl needs)
    backend: str = "ring"
    mode: str = "tensor"
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    python: str | None = None  # the interpreter on every host; None: this one


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    source: str
    local: bool = False
    aliases: tuple[str, ...] = ()
    preload: bool = False
    pinned: bool = False
    keep_alive: float | None = None  # None: defaults.keep_alive
    max_concurrency: int = 8
    context_length: int | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    distributed: DistributedConfig | None = None
    priority: Priority | None = None  # admission priority of requests that name none


@dataclass(frozen=True, slots=True)
class Defaults:
    keep_alive: float = 1800.0
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({"temperature": 0.7}))


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    server: ServerConfig = ServerConfig()
    memory: MemoryConfig = MemoryConfig()
    defaults: Defaults = Defaults()
    models: tuple[ModelConfig, ...] = ()
    default_model: str | None = None  # a configured model's name: requests that name none get it
    categories: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # category -> model name

    def find(self, name: str) -> ModelConfig | None:
        """The model a request's name refers to: its name or an alias, `:latest` implied."""
        wanted = normalize_name(name.strip()).lower()
        for model in self.models:
            if wanted == model.name.lower() or wanted in (a.lower() for a in model.aliases):
                return model
        return None

    def keep_alive_of(self, model: ModelConfig) -> float:
        return self.defaults.keep_alive if model.keep_alive is None else model.keep_alive


class _Section:
    """Reads one mapping of models.yaml and turns every mistake into a ConfigError."""

    def __init__(self, file: str, where: str, raw: Any, allowed: set[str]):
        self.file, self.where = file, where
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(None, f"must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(map(str, raw)) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")
        self.raw = raw

    def error(self, key: str | None, message: str) -> ConfigError:
        place = f"{self.where}: key '{key}'" if key else self.where
        return ConfigError(f"{self.file}: {place}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, *, optional: bool = False) -> Any:
        value = self.raw.get(key, default)
        if value is None and optional:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float, *, optional: bool = False) -> float | None:
        value = self.get(key, float, default, optional=optional)
        if value is not None and not lo <= value <= hi:
            raise self.error(key, f"must be between {lo:g} and {hi:g}, got {value:g}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key, int, default)
        if not lo <= value <= hi:
            raise self.error(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def duration(self, key: str, default: float, *, keep_alive: bool = False) -> float:
        try:
            if key not in self.raw:
                return default
            return (parse_keep_alive if keep_alive else parse_duration)(self.raw[key])
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def options(self, key: str) -> Mapping[str, Any]:
        try:
            return MappingProxyType(parse_options(self.raw.get(key), strict=True))
        except BadRequest as e:
            raise self.error(key, e.message) from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _server(file: str, raw: Any) -> ServerConfig:
    s = _Section(file, "server", raw, set(ServerConfig.__dataclass_fields__))
    rate_limit = None
    if s.raw.get("rate_limit") is not None:
        r = _Section(file, "server.rate_limit", s.raw["rate_limit"], {"requests", "per"})
        rate_limit = RateLimit(r.integer("requests", 600, 1, 10**9), r.duration("per", 60.0))
        if rate_limit.per <= 0:
            raise r.error("per", "must be a positive duration")
    origins = s.get("cors_origins", list, [])
    if not all(isinstance(o, str) for o in origins):
        raise s.error("cors_origins", "must be a list of strings")
    grace = s.duration("shutdown_grace", 30.0)
    timeout = s.duration("queue_timeout", 120.0)
    if grace < 0 or timeout <= 0:
        raise s.error("shutdown_grace" if grace < 0 else "queue_timeout", "must be a positive duration")
    aging = s.duration("priority_aging", DEFAULT_AGING)
    if aging <= 0:
        raise s.error("priority_aging", "must be a positive duration")
    return ServerConfig(
        host=s.get("host", str, "127.0.0.1"),
        port=s.integer("port", DEFAULT_PORT, 0, 65535),
        api_key=s.get("api_key", str, None, optional=True) or None,
        max_queue=s.integer("max_queue", 256, 0, 10**6),
        max_body_mb=s.number("max_body_mb", 16.0, 0.001, 4096.0),
        shutdown_grace=grace,
        rate_limit=rate_limit,
        cors_origins=tuple(origins),
        queue_timeout=timeout,
        priority_aging=aging,
    )


def _memory(file: str, raw: Any, base: Path, models: tuple[ModelConfig, ...]) -> MemoryConfig:
    from .gguf import default_cache_dir  # the state directory; here: importing the config stays free of numpy
    s = _Section(file, "memory", raw, set(MemoryConfig.__dataclass_fields__))
    memory = MemoryConfig(
        budget_gb=s.number("budget_gb", None, 0.0, 1e6, optional=True),
        reserve_gb=s.number("reserve_gb", 4.0, 0.0, 1e6),
        high_water=s.number("high_water", 0.90, 0.01, 1.0),
        low_water=s.number("low_water", 0.80, 0.0, 1.0),
        check_interval=s.duration("check_interval", 2.0),
        max_loaded_models=s.integer("max_loaded_models", 0, 0, 10**4),
        prompt_cache_mb=s.number("prompt_cache_mb", 512.0, 0.0, 1e7),
        disk_cache_gb=s.number("disk_cache_gb", 8.0, 0.0, 1e6),
        disk_cache_dir=_directory(s, "disk_cache_dir", str(default_cache_dir() / "prompt-cache"), base),
        disk_cache_min_tokens=s.integer("disk_cache_min_tokens", 256, 1, 10**7),
        mlx_cache_limit_gb=s.number("mlx_cache_limit_gb", 1.0, 0.0, 1e6, optional=True),
    )
    if memory.low_water > memory.high_water:
        raise s.error("low_water", f"must not exceed high_water ({memory.high_water:g})")
    if memory.check_interval <= 0:
        raise s.error("check_interval", "must be a positive duration")
    _check_disk_cache_dir(s, memory.disk_cache_dir, models)
    return memory


def _check_disk_cache_dir(s: _Section, path: Path, models: tuple[ModelConfig, ...]) -> None:
    """The disk cache files entries among whatever lies there: never a model's files or the state directory."""
    from .disk_cache import refusal  # here: importing the config stays free of numpy and safetensors
    for m in models:
        if m.local and Path(m.source).is_relative_to(path):
            raise s.error("disk_cache_dir", f"'{path}' is or contains the source directory of model '{m.name}' ({m.source})")
    if reason := refusal(path):
        raise s.error("disk_cache_dir", f"'{path}' cannot hold prompt caches: {reason}")


def _directory(s: _Section, key: str, default: str, base: Path) -> Path:
    """A directory the daemon may create: `~` expanded, relative to the YAML file."""
    text = s.get(key, str, default)
    if not text.strip():
        raise s.error(key, "must be a directory path, got an empty string")
    try:
        path = (base / Path(text).expanduser()).resolve()
        exists = path.exists()
    except (OSError, RuntimeError, ValueError) as e:  # a NUL byte, an unknown ~user, a symlink loop
        raise s.error(key, f"{text!r} is not a usable path: {e}") from None
    if exists and not path.is_dir():
        raise s.error(key, f"'{path}' exists and is not a directory")
    return path


def _defaults(file: str, raw: Any) -> Defaults:
    s = _Section(file, "defaults", raw, {"keep_alive", "options"})
    options = s.options("options") if "options" in s.raw else Defaults().options
    return Defaults(keep_alive=s.duration("keep_alive", 1800.0, keep_alive=True), options=options)


def _source(s: _Section, base: Path) -> tuple[str, bool]:
    source = s.get("source", str, None) if "source" in s.raw else None
    if not source:
        raise s.error("source", "is required (a Hugging Face repo id or a local directory)")
    pathlike = source.startswith(("/", ".", "~"))
    path = (base / Path(source).expanduser()).resolve()
    if pathlike or path.exists():
        if not path.is_dir():
            raise s.error("source", f"directory '{path}' does not exist")
        return str(path), True
    if not _REPO_RE.match(source):
        raise s.error("source", f"'{source}' is neither an existing directory nor a Hugging Face repo id (owner/name)")
    return source, False


def _distributed(file: str, label: str, raw: Any, base: Path) -> DistributedConfig | None:
    """The `distributed` key: what can be checked without the model's files is checked here."""
    if raw is None:
        return None
    s = _Section(file, f"{label}.distributed", raw, {"ranks", "hosts", "hostfile", "backend", "mode", "env", "python"})
    given = [k for k in ("ranks", "hosts", "hostfile") if s.raw.get(k) is not None]
    if len(given) != 1:
        raise s.error(
            given[1] if given else "hosts",
            "give exactly one of 'hosts' (the Macs), 'hostfile' (from mlx.distributed_config) or 'ranks' (local processes)"
            + (f"; got {' and '.join(given)}" if given else ""),
        )
    backend = s.get("backend", str, "ring")
    if backend not in DISTRIBUTED_BACKENDS:
        raise s.error("backend", f"must be one of {', '.join(DISTRIBUTED_BACKENDS)}, got {backend!r}")
    mode = s.get("mode", str, "tensor")
    if mode not in DISTRIBUTED_MODES:
        raise s.error("mode", f"must be one of {', '.join(DISTRIBUTED_MODES)}, got {mode!r}")
    if backend == "jaccl" and sys.platform != "darwin":
        raise s.error("backend", f"jaccl (RDMA over Thunderbolt 5) needs macOS; this is {sys.platform} (use ring)")
    hosts: tuple[str, ...] = ()
    hostfile = None
    if "ranks" in given:
        ranks = s.integer("ranks", 2, 2, MAX_LOCAL_RANKS)
    elif "hosts" in given:
        listed = s.get("hosts", list, [])
        if len(listed) < 2 or not all(isinstance(h, str) and h.strip() for h in listed):
            raise s.error("hosts", "must list at least two hosts (names or IP addresses), rank 0 first")
        hosts = tuple(h.strip() for h in listed)
        if backend == "ring" and not all(_is_ip(h) for h in hosts):
            raise s.error("hosts", "the ring backend needs IP addresses (mlx.launch connects the ranks by IP); "
                          "or write a hostfile with mlx.distributed_config and give 'hostfile'")
        if backend == "jaccl":
            raise s.error("hosts", "jaccl needs each host's RDMA devices: write a hostfile with mlx.distributed_config and give 'hostfile'")
        ranks = len(hosts)
    else:
        path = (base / Path(s.get("hostfile", str, "")).expanduser()).resolve()
        hostfile = str(path)
        ranks = _hostfile_ranks(s, path)
    env = s.get("env", dict, {})
    for key, value in env.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise s.error("env", f"must map variable names to strings or numbers; {key!r}: {value!r} is not one")
    python = s.get("python", str, None, optional=True)
    return DistributedConfig(
        ranks=ranks,
        hosts=hosts,
        hostfile=hostfile,
        backend=backend,
        mode=mode,
        env=MappingProxyType({k: str(v) for k, v in env.items()}),
        python=python or None,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _hostfile_ranks(s: _Section, path: Path) -> int:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise s.error("hostfile", f"cannot read '{path}': {e.strerror or e}") from None
    except ValueError as e:
        raise s.error("hostfile", f"'{path}' is not valid JSON: {e}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or len(hosts) < 2 or not all(isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts):
        raise s.error("hostfile", f"'{path}' must list at least two hosts, each with an 'ssh' name (mlx.distributed_config writes it)")
    return len(hosts)


def _model(file: str, index: int, raw: Any, base: Path) -> ModelConfig:
    label = f"models[{index}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        label += f" ('{raw['name']}')"
    s = _Section(file, label, raw, set(ModelConfig.__dataclass_fields__) - {"local"})
    name = s.get("name", str, None) if "name" in s.raw else None
    if not name:
        raise s.error("name", "is required")
    if not _NAME_RE.match(name):
        raise s.error("name", f"'{name}' is not a valid model name (letters, digits, . _ - /, optional :tag)")
    aliases = s.get("aliases", list, [])
    for alias in aliases:
        if not isinstance(alias, str) or not _NAME_RE.match(alias):
            raise s.error("aliases", f"{alias!r} is not a valid model name")
    source, local = _source(s, base)
    context = s.raw.get("context_length")
    if context is not None:
        context = s.integer("context_length", 0, 1, 1 << 24)
    return ModelConfig(
        name=normalize_name(name),
        source=source,
        local=local,
        aliases=tuple(normalize_name(a) for a in aliases),
        preload=s.get("preload", bool, False),
        pinned=s.get("pinned", bool, False),
        keep_alive=s.duration("keep_alive", None, keep_alive=True) if "keep_alive" in s.raw else None,
        max_concurrency=s.integer("max_concurrency", 8, 1, 4096),
        context_length=context,
        options=s.options("options"),
        distributed=_distributed(file, label, s.raw.get("distributed"), base),
        priority=_priority(s),
    )


def _priority(s: _Section) -> Priority | None:
    if s.raw.get("priority") is None:
        return None
    try:
        return parse_priority(s.raw["priority"])
    except BadRequest:
        raise s.error("priority", f"must be one of {', '.join(PRIORITY_NAMES)}, got {brief(s.raw['priority'])}") from None


def _routing(file: str, top: _Section, models: tuple[ModelConfig, ...]) -> tuple[str | None, Mapping[str, str]]:
    """`default_model` and `categories`: each must name a configured model (or alias)."""
    index = Config(models=models)

    def configured(where: str, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{file}: {where}: key '{key}': must be a model name, got {brief(value)}")
        model = index.find(value)
        if model is None:
            known = ", ".join(m.name for m in models) or "none are configured"
            raise ConfigError(f"{file}: {where}: key '{key}': '{value}' is not a configured model (models: {known})")
        return model.name

    default = top.raw.get("default_model")
    default_model = None if default is None else configured("top level", "default_model", default)
    raw = top.raw.get("categories")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise top.error("categories", f"must be a mapping of category -> model name, got {type(raw).__name__}")
    categories = {}
    for category, name in raw.items():
        if not isinstance(category, str) or not category.strip():
            raise ConfigError(f"{file}: categories: {brief(category)} is not a category name (use a word, e.g. coding)")
        categories[category.strip().lower()] = configured("categories", category, name)
    return default_model, MappingProxyType(categories)


def parse_config(raw: Any, *, file: str = "models.yaml", base: Path | None = None) -> Config:
    """Build a Config from already-parsed YAML; `base` resolves relative sources."""
    top = _Section(file, "top level", raw, {"server", "memory", "defaults", "models", "default_model", "categories"})
    base = base or Path.cwd()
    models_raw = top.raw.get("models") or []
    if not isinstance(models_raw, list):
        raise top.error("models", "must be a list of models")
    models = tuple(_model(file, i, m, base) for i, m in enumerate(models_raw))
    seen: dict[str, str] = {}
    for m in models:
        for n in (m.name, *m.aliases):
            if n.lower() in seen:
                raise ConfigError(f"{file}: models ('{m.name}'): name or alias '{n}' is used twice (also by '{seen[n.lower()]}')")
            seen[n.lower()] = m.name
    default_model, categories = _routing(file, top, models)
    return Config(
        path=None,
        server=_server(file, top.raw.get("server")),
        memory=_memory(file, top.raw.get("memory"), base, models),
        defaults=_defaults(file, top.raw.get("defaults")),
        models=models,
        default_model=default_model,
        categories=categories,
    )


def load_config(
    path: str | Path | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    env: Mapping[str, str] = os.environ,
) -> Config:
    """Read models.yaml, then apply MLX_SERVER_* variables, then command-line flags."""
    path = Path(path or env.get("MLX_SERVER_CONFIG") or "models.yaml").expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    config = parse_config(raw, file=str(path), base=path.parent)
    server = config.server
    if env.get("MLX_SERVER_HOST"):
        server = replace(server, host=env["MLX_SERVER_HOST"])
    if env.get("MLX_SERVER_PORT"):
        try:
            server = replace(server, port=int(env["MLX_SERVER_PORT"]))
        except ValueError:
            raise ConfigError(f"MLX_SERVER_PORT: not a port number: {env['MLX_SERVER_PORT']!r}") from None
    if env.get("MLX_SERVER_API_KEY"):
        server = replace(server, api_key=env["MLX_SERVER_API_KEY"])
    if host:
        server = replace(server, host=host)
    if port is not None:
        server = replace(server, port=port)
    return replace(config, path=path, server=server)
