"""Shared fixtures: one random-weight test model per session, in-process apps and
live daemons on free loopback ports. HF_HUB_OFFLINE is set for every test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from mlx_server.config import parse_config
from mlx_server.testing import DaemonProcess, make_test_model, write_config


@pytest.fixture(scope="session")
def test_model(tmp_path_factory) -> Path:
    """The default tiny model (hidden 256, 4 layers, ~10 MB)."""
    return make_test_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def second_model(tmp_path_factory) -> Path:
    """Another tiny model with different weights, for two-model tests."""
    return make_test_model(tmp_path_factory.mktemp("models") / "tiny2", seed=1)


def make_config(models: list[dict], **sections):
    """A Config from plain dicts, like models.yaml would give."""
    return parse_config({**sections, "models": models})


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
