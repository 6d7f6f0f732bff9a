"""Prometheus metrics, in the daemon's own registry.

Labels are bounded: a model label is a configured model's name or "other", an
endpoint label is a route of this server or "other", so a client cannot create
series by inventing names. Gauges are read live at scrape time from snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .admission import Granted, Priority
from .config import normalize_name

PREFIX = "mlx_server"
OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# LLM latencies: from a cached short answer (ms) to a long generation (minutes).
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
ADMISSION_WAIT_REASONS = ("memory", "load")  # the manager's reasons, each a series from the start

# Waits for a slot: none at all (most requests) up to queue_timeout (120s by default).
WAIT_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class WaitSummary:
    """Requests of one priority admitted since the start, and their mean wait for a slot."""

    served: int
    mean_seconds: float


@dataclass(frozen=True, slots=True)
class LiveModel:
    name: str
    loaded: bool
    memory_bytes: int
    active_requests: int
    kv_bytes: int = 0  # KV caches of its running requests (reserved, or measured when larger)


@dataclass(frozen=True, slots=True)
class LiveReading:
    models: list[LiveModel] = field(default_factory=list)
    queue_depth: dict[Priority, int] = field(default_factory=dict)  # waiting for a slot or a load
    system_available_bytes: int = 0
    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0
    group_ranks_up: dict[str, int] = field(default_factory=dict)  # distributed models only
    reserved_bytes: int = 0  # KV reservations and loads under way
    pressure_level: int = 0  # 0 normal, 1 warning, 2 critical
    cache_spills: dict[str, int] = field(default_factory=dict)  # prompt-cache entries given back for memory, ever
    cache_drops: dict[str, int] = field(default_factory=dict)


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveReading]):
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        reading = self._read()
        loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 if the model is resident (ready)", labels=["model"])
        memory = GaugeMetricFamily(f"{PREFIX}_model_memory_bytes", "Bytes the model holds: weights and prompt cache", labels=["model"])
        active = GaugeMetricFamily(f"{PREFIX}_active_requests", "Requests holding a lease on the model", labels=["model"])
        kv = GaugeMetricFamily(f"{PREFIX}_kv_cache_bytes", "KV cache of the model's running requests: reserved, or measured when larger", labels=["model"])
        for m in reading.models:
            loaded.add_metric([m.name], 1.0 if m.loaded else 0.0)
            memory.add_metric([m.name], float(m.memory_bytes))
            active.add_metric([m.name], float(m.active_requests))
            kv.add_metric([m.name], float(m.kv_bytes))
        yield loaded
        yield memory
        yield active
        yield kv
        yield GaugeMetricFamily(f"{PREFIX}_memory_reserved_bytes", "Memory promised before use: KV reservations and loads under way", value=reading.reserved_bytes)
        yield _queue_depth(reading)
        yield GaugeMetricFamily(f"{PREFIX}_system_memory_available_bytes", "Host memory available (psutil)", value=reading.system_available_bytes)
        yield GaugeMetricFamily(
            f"{PREFIX}_memory_pressure_level",
            "Host memory pressure: 0 normal, 1 warning, 2 critical (macOS: the kernel's level; elsewhere: high_water)",
            value=reading.pressure_level,
        )
        yield GaugeMetricFamily(f"{PREFIX}_mlx_active_memory_bytes", "Memory MLX has allocated", value=reading.mlx_active_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_mlx_cache_memory_bytes", "Memory in MLX's buffer cache", value=reading.mlx_cache_bytes)
        ranks = GaugeMetricFamily(f"{PREFIX}_group_ranks_up", "Ranks of a distributed model's group that are up", labels=["model"])
        for name, up in reading.group_ranks_up.items():
            ranks.add_metric([name], float(up))
        yield ranks
        for what, counts, help_text in (
            ("spills", reading.cache_spills, "Prompt-cache entries written to the disk tier to free memory for a load or a request"),
            ("drops", reading.cache_drops, "Prompt-cache entries dropped to free memory (no disk tier, or too short for a file)"),
        ):
            family = CounterMetricFamily(f"{PREFIX}_prompt_cache_{what}", help_text, labels=["model"])
            for model in reading.models:
                family.add_metric([model.name], float(counts.get(model.name, 0)))
            yield family


def _queue_depth(reading: LiveReading) -> GaugeMetricFamily:
    """By priority; sum() over it is the total the unlabelled gauge used to be."""
    depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a slot or for their model to load", labels=["priority"])
    for priority in Priority:
        depth.add_metric([priority.label], float(reading.queue_depth.get(priority, 0)))
    return depth


class Metrics:
    def __init__(self, models: Iterable[str], endpoints: Iterable[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = {normalize_name(n).lower(): n for n in models}
        self._endpoints = frozenset(endpoints)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests_total", "HTTP requests answered", ["endpoint", "model", "status"], registry=r)
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Request time, first byte in to last byte out",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from admission to the first token", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens_total", "Prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens_total", "Tokens generated", ["model"], registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_prompt_cached_tokens_total", "Prompt tokens served from a prompt cache (memory or disk), not prefilled", ["model"], registry=r)
        self.loads = Counter(f"{PREFIX}_model_loads_total", "Model loads by result", ["model", "result"], registry=r)
        self.load_duration = Histogram(f"{PREFIX}_model_load_duration_seconds", "Model load time", ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter(f"{PREFIX}_model_evictions_total", "Model unloads by reason", ["model", "reason"], registry=r)
        self.admission_waits = Counter(
            f"{PREFIX}_admission_waits_total", "Requests that had to wait: for memory, or for another model's load", ["reason"], registry=r
        )
        for reason in ADMISSION_WAIT_REASONS:
            self.admission_waits.labels(reason)
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time a request waited for a running slot, by its priority",
            ["priority"], buckets=WAIT_BUCKETS, registry=r,
        )
        for priority in Priority:
            self.queue_wait.labels(priority.label)
        for name in self._models.values():
            self.prompt_tokens.labels(name)
            self.generated_tokens.labels(name)
            self.cached_tokens.labels(name)

    def model_label(self, name: str | None) -> str:
        """The configured name a request meant (":latest" implied, any case), else "other"."""
        if not isinstance(name, str) or not name.strip():
            return OTHER
        return self._models.get(normalize_name(name.strip()).lower(), OTHER)

    def endpoint_label(self, path: str | None) -> str:
        return path if path in self._endpoints else OTHER

    def bind_live(self, read: Callable[[], LiveReading]) -> None:
        self.registry.register(_LiveCollector(read))

    def observe_request(self, endpoint: str | None, model: str | None, status: int, seconds: float) -> None:
        endpoint = self.endpoint_label(endpoint)
        self.requests.labels(endpoint, self.model_label(model), str(status)).inc()
        self.request_duration.labels(endpoint).observe(seconds)

    def observe_generation(self, model: str, prompt_tokens: int, generated_tokens: int, ttft: float | None, cached_tokens: int = 0) -> None:
        label = self.model_label(model)
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.cached_tokens.labels(label).inc(cached_tokens)
        self.generated_tokens.labels(label).inc(generated_tokens)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)

    # the manager's Observer

    def model_loaded(self, name: str, result: str, seconds: float) -> None:
        label = self.model_label(name)
        self.loads.labels(label, result).inc()
        self.load_duration.labels(label).observe(seconds)

    def model_evicted(self, name: str, reason: str) -> None:
        self.evictions.labels(self.model_label(name), reason).inc()

    def admission_waited(self, reason: str) -> None:
        self.admission_waits.labels(reason).inc()

    def slot_granted(self, name: str, granted: Granted) -> None:
        self.queue_wait.labels(granted.priority.label).observe(granted.waited)

    def wait_summary(self, priority: Priority) -> WaitSummary:
        labels = {"priority": priority.label}
        served = int(self.registry.get_sample_value(f"{PREFIX}_queue_wait_seconds_count", labels) or 0)
        total = self.registry.get_sample_value(f"{PREFIX}_queue_wait_seconds_sum", labels) or 0.0
        return WaitSummary(served, total / served if served else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
