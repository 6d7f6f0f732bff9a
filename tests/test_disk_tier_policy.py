"""Which prompt caches the disk tier keeps: those that are cheaper to read back than to
prefill again, by the model's measured prefill rate and the disk's measured read rate,
from a floor up; and the tier is on by default, under the state directory.

No MLX here: the decision is a pure function, and the tier is driven with a fake store."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mlx_server.config import load_config, parse_config
from mlx_server.disk_cache import ModelIdentity
from mlx_server.engine.disk_tier import DISK_MIN_TOKENS, DiskTier, worth_a_file
from mlx_server.testing import write_config

MB = 1e6


def test_a_cache_is_worth_a_file_when_reading_it_back_beats_prefilling_it():
    # the case: a 300-token system prompt of a 32B model (256 KiB a token: ~80 MB),
    # prefilled at ~300 tokens/s on a Mac (one second), read back at 2 GB/s (0.04 s)
    assert worth_a_file(300, 300 * 262_144, min_tokens=256, prefill_rate=300.0, read_rate=2000 * MB)
    # the demo model on this CPU: 46 KB a token prefilled at ~6 tokens/s, read at ~280 MB/s
    assert worth_a_file(300, 300 * 46_080, min_tokens=256, prefill_rate=6.0, read_rate=280 * MB)
    # a small model on a fast accelerator and a slow disk: prefilling again is cheaper
    assert not worth_a_file(4000, 4000 * 24_576, min_tokens=256, prefill_rate=20_000.0, read_rate=50 * MB)


def test_the_floor_holds_whatever_the_rates():
    assert not worth_a_file(255, 1, min_tokens=256, prefill_rate=1.0, read_rate=1e12)
    assert worth_a_file(256, 1, min_tokens=256, prefill_rate=1.0, read_rate=1e12)
    assert worth_a_file(32, 1, min_tokens=16, prefill_rate=1.0, read_rate=1e12)


@pytest.mark.parametrize("prefill_rate, read_rate", [(None, 280 * MB), (6.0, None), (None, None)])
def test_unknown_rates_save_from_the_floor_up(prefill_rate, read_rate):
    """Before the first prefill or the first read or write there is nothing to weigh: the
    save goes ahead (and measures the disk); a refusal would never learn otherwise."""
    assert worth_a_file(300, 10**12, min_tokens=256, prefill_rate=prefill_rate, read_rate=read_rate)
    assert not worth_a_file(100, 1, min_tokens=256, prefill_rate=prefill_rate, read_rate=read_rate)


@dataclass
class Cache:
    nbytes: int


@dataclass
class FakeStore:
    read_rate: float | None = None
    saved: list = field(default_factory=list)
    fetched: list = field(default_factory=list)

    def save(self, identity, tokens, cache) -> bool:
        self.saved.append(len(tokens))
        return True

    def fetch(self, identity, prompt, min_reuse) -> None:
        self.fetched.append(min_reuse)


def tier(store: FakeStore, min_tokens: int = DISK_MIN_TOKENS) -> DiskTier:
    return DiskTier(store, ModelIdentity("m", "digest"), min_tokens)


def test_the_tier_queues_and_spills_by_the_rates_it_is_given():
    store = FakeStore(read_rate=100 * MB)
    disk = tier(store)
    cache = [Cache(300 * 40_000)]  # 12 MB: 0.12 s to read back
    disk.queue(list(range(300)), cache, prefill_rate=1000.0)  # 0.3 s to prefill: saved
    assert len(disk.pending) == 1 and disk.prefill_rate == 1000.0
    disk.queue(list(range(300)), cache, prefill_rate=10_000.0)  # 0.03 s to prefill: not
    assert len(disk.pending) == 1
    assert not disk.spill(list(range(300)), cache)  # by the last rate it was given
    disk.queue(list(range(100)), [Cache(1)], prefill_rate=1.0)  # under the floor
    assert len(disk.pending) == 1
    store.read_rate = 1000 * MB  # the disk turned out faster
    assert disk.spill(list(range(300)), cache) and store.saved == [300]


def test_a_file_is_read_only_when_it_saves_the_floor_in_prefill():
    store = FakeStore()
    tier(store, min_tokens=64).fetch(list(range(500)), reused=200)
    assert store.fetched == [264]


def test_the_disk_tier_is_on_by_default_under_the_state_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "state"))
    memory = parse_config({}).memory
    assert (memory.disk_cache_gb, memory.disk_cache_min_tokens) == (8.0, DISK_MIN_TOKENS)
    assert memory.disk_cache_dir == (tmp_path / "state" / "mlx-server" / "prompt-cache").resolve()
    memory = parse_config({"memory": {"disk_cache_min_tokens": 64, "disk_cache_gb": 0}}).memory
    assert (memory.disk_cache_gb, memory.disk_cache_min_tokens) == (0.0, 64)


@pytest.mark.parametrize("value, message", [(0, "must be between 1"), ("many", "must be an integer")])
def test_a_bad_floor_names_its_key(value, message):
    with pytest.raises(ValueError, match=f"memory: key 'disk_cache_min_tokens': {message}"):
        parse_config({"memory": {"disk_cache_min_tokens": value}})


def test_test_configs_keep_the_disk_tier_in_the_test_folder(tmp_path):
    config = load_config(write_config(tmp_path / "models.yaml", []), env={})
    assert config.memory.disk_cache_gb > 0 and config.memory.disk_cache_dir == (tmp_path / "models-prompt-cache").resolve()
