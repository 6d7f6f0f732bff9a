"""The on-disk prompt cache: exact round trips, longest-prefix lookup, integrity,
foreign models, LRU eviction by size and an index that survives a restart.

MLX runs in-process here: the store is engine-thread code, called directly.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as lm_cache
from mlx_lm.utils import load_model

from mlx_server import disk_cache
from mlx_server.disk_cache import (
    MIN_DISK_REUSE,
    DiskPromptCache,
    ModelIdentity,
    model_identity,
)

LOG = "mlx_server.disk_cache"


@pytest.fixture(scope="module")
def model(test_model):
    loaded, _ = load_model(test_model)
    return loaded


@pytest.fixture(scope="module")
def identity(test_model, model) -> ModelIdentity:
    return model_identity("tiny:latest", test_model, lm_cache.make_prompt_cache(model))


@pytest.fixture(scope="module")
def vocab(model) -> int:
    return model.args.vocab_size


def prompt_tokens(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def prefill(model, tokens: list[int]) -> list:
    cache = lm_cache.make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))
    return cache


def next_logits(model, cache: list, token: int) -> mx.array:
    logits = model(mx.array([[token]]), cache=cache)
    mx.eval(logits)
    return logits


def keys_of(cache: list) -> list[mx.array]:
    return [c.keys[..., : c.offset, :] for c in cache]


def entry_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.safetensors"))


def test_a_saved_cache_loads_back_with_identical_next_token_logits(tmp_path, model, identity, vocab):
    tokens = prompt_tokens(vocab, 200, seed=1)
    cache = prefill(model, tokens)
    store = DiskPromptCache(tmp_path, 1 << 30)
    assert store.save(identity, tokens, cache)
    (path,) = entry_files(tmp_path)
    assert path.parent.name == "tiny%3Alatest" and len(path.stem) == 64  # its name is its sha256

    hit = store.fetch(identity, tokens + [7])
    assert hit is not None and hit.reused == 200
    assert [type(c).__name__ for c in hit.cache] == [type(c).__name__ for c in cache]
    expected = next_logits(model, copy.deepcopy(cache), 7)
    assert mx.array_equal(next_logits(model, hit.cache, 7), expected).item()
    # the file is in mlx_lm's own format: mlx_lm reads it, with our metadata
    loaded, meta = lm_cache.load_prompt_cache(str(path), return_metadata=True)
    assert meta["mlx_server_digest"] == identity.digest and len(loaded) == len(cache)
    assert all(c.keys.shape[2] == 200 for c in loaded)  # without the spare room of the live buffer


def test_the_longest_shared_prefix_wins_and_is_trimmed_to_it(tmp_path, model, identity, vocab):
    base = prompt_tokens(vocab, 200, seed=2)
    first = base[:120] + prompt_tokens(vocab, 30, seed=3)  # leaves base at 120
    second = base[:60] + prompt_tokens(vocab, 100, seed=4)  # leaves base at 60
    first_cache, second_cache = prefill(model, first), prefill(model, second)
    store = DiskPromptCache(tmp_path, 1 << 30)
    assert store.save(identity, first, first_cache) and store.save(identity, second, second_cache)
    assert len(store) == 2

    hit = store.fetch(identity, base)
    assert hit.reused == 120 and all(c.offset == 120 for c in hit.cache)
    for got, want in zip(keys_of(hit.cache), keys_of(first_cache)):
        assert mx.array_equal(got, want[..., :120, :]).item()

    hit = store.fetch(identity, second[:110] + [5, 6, 7])
    assert hit.reused == 110
    for got, want in zip(keys_of(hit.cache), keys_of(second_cache)):
        assert mx.array_equal(got, want[..., :110, :]).item()

    # the whole stored sequence as the prompt: its last token still runs
    assert store.fetch(identity, first).reused == len(first) - 1
    assert store.fetch(identity, base[:MIN_DISK_REUSE - 1] + [1] * 40) is None
    assert store.fetch(identity, prompt_tokens(vocab, 100, seed=5)) is None
    assert store.fetch(ModelIdentity("other:latest", identity.digest), base) is None
    # an in-memory hit of 120 tokens already: only a longer disk prefix is worth reading
    assert store.fetch(identity, base, min_reuse=121) is None
    assert store.fetch(identity, second[:110] + [5], min_reuse=110).reused == 110


def test_the_read_rate_is_measured_by_loads_and_before_any_by_saves(tmp_path, model, identity, vocab):
    """What the disk tier weighs against prefill: bytes per second, measured here."""
    tokens = prompt_tokens(vocab, 100, seed=40)
    store = DiskPromptCache(tmp_path, 1 << 30)
    assert store.read_rate is None
    store.save(identity, tokens, prefill(model, tokens))
    assert store.read_rate > 1e6  # a saved entry's bytes over the whole save
    reopened = DiskPromptCache(tmp_path, 1 << 30)
    assert reopened.read_rate is None  # the index read is not a load
    assert reopened.fetch(identity, tokens + [1]) is not None and reopened.read_rate > 1e6


def test_a_cache_that_does_not_hold_exactly_the_tokens_is_not_saved(tmp_path, model, identity, vocab, caplog):
    tokens = prompt_tokens(vocab, 60, seed=30)
    store = DiskPromptCache(tmp_path, 1 << 30)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert not store.save(identity, tokens + [1], prefill(model, tokens))
    assert "61 tokens but caches holding [60]" in caplog.text
    assert len(store) == 0 and entry_files(tmp_path) == []
    assert not store.save(identity, [], prefill(model, tokens))


def test_a_longer_entry_replaces_its_prefixes_and_covers_shorter_saves(tmp_path, model, identity, vocab):
    tokens = prompt_tokens(vocab, 150, seed=6)
    cache = prefill(model, tokens)
    store = DiskPromptCache(tmp_path, 1 << 30)
    short = copy.deepcopy(cache)
    lm_cache.trim_prompt_cache(short, 50)
    assert store.save(identity, tokens[:100], short)
    assert store.save(identity, tokens, cache)
    (path,) = entry_files(tmp_path)  # the 100-token entry is gone: the new one serves it
    middle = copy.deepcopy(cache)
    lm_cache.trim_prompt_cache(middle, 30)
    assert store.save(identity, tokens[:120], middle) and entry_files(tmp_path) == [path]  # covered: nothing written
    assert store.fetch(identity, tokens[:100] + [9]).reused == 100


def test_corrupt_and_truncated_files_are_ignored_logged_and_deleted(tmp_path, model, identity, vocab, caplog):
    tokens = prompt_tokens(vocab, 100, seed=7)
    store = DiskPromptCache(tmp_path, 1 << 30)
    store.save(identity, tokens, prefill(model, tokens))
    (path,) = entry_files(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the values of the last layer
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert store.fetch(identity, tokens + [1]) is None
    assert "checksum does not match" in caplog.text and str(path) in caplog.text
    assert not path.exists() and len(store) == 0

    store.save(identity, tokens, prefill(model, tokens))
    (path,) = entry_files(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert store.fetch(identity, tokens + [1]) is None
    assert "ignoring and deleting" in caplog.text and not path.exists()


def test_unreadable_headers_and_leftover_temp_files_go_when_the_store_opens(tmp_path, model, identity, vocab, caplog):
    tokens = prompt_tokens(vocab, 100, seed=8)
    DiskPromptCache(tmp_path, 1 << 30).save(identity, tokens, prefill(model, tokens))
    (good,) = entry_files(tmp_path)
    folder = good.parent
    (folder / ("0" * 64 + ".safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (folder / ("1" * 64 + ".safetensors")).write_bytes(good.read_bytes()[:6])
    (folder / ".tmp-cut-short.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger=LOG):
        store = DiskPromptCache(tmp_path, 1 << 30)
    assert caplog.text.count("ignoring and deleting") == 2
    assert entry_files(tmp_path) == [good] and list(folder.iterdir()) == [good]
    assert store.fetch(identity, tokens + [1]).reused == 100


def test_a_cache_of_another_model_version_is_never_served(tmp_path, model, identity, vocab, second_model, caplog):
    tokens = prompt_tokens(vocab, 100, seed=9)
    DiskPromptCache(tmp_path, 1 << 30).save(identity, tokens, prefill(model, tokens))
    (path,) = entry_files(tmp_path)
    # the same name now loads other weights: the daemon restarts with a new identity
    other, _ = load_model(second_model)
    new_identity = model_identity(identity.name, second_model, lm_cache.make_prompt_cache(other))
    assert new_identity.digest != identity.digest
    store = DiskPromptCache(tmp_path, 1 << 30)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert store.fetch(new_identity, tokens + [1]) is None
    assert "another version of the model" in caplog.text and not path.exists()


def test_the_identity_follows_config_weights_and_cache_classes(tmp_path, test_model, model, identity):
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for f in test_model.iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
        os.utime(copy_dir / f.name, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    caches = lm_cache.make_prompt_cache(model)
    assert model_identity(identity.name, copy_dir, caches) == identity
    weights = copy_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    touched = model_identity(identity.name, copy_dir, caches)
    assert touched.digest != identity.digest
    rotating = [lm_cache.RotatingKVCache(max_size=64) for _ in caches]
    assert model_identity(identity.name, copy_dir, rotating).digest != touched.digest


def test_least_recently_used_entries_go_first_to_stay_within_the_size(tmp_path, model, identity, vocab, caplog):
    sequences = [prompt_tokens(vocab, 100, seed=10 + i) for i in range(3)]
    caches = [prefill(model, s) for s in sequences]
    probe = DiskPromptCache(tmp_path / "probe", 1 << 30)
    probe.save(identity, sequences[0], caches[0])
    entry_bytes = probe.nbytes

    store = DiskPromptCache(tmp_path / "store", int(2.5 * entry_bytes))
    assert store.save(identity, sequences[0], caches[0]) and store.save(identity, sequences[1], caches[1])
    assert store.fetch(identity, sequences[0] + [1]) is not None  # the first is now the most recently used
    with caplog.at_level(logging.INFO, logger=LOG):
        assert store.save(identity, sequences[2], caches[2])
    assert "least recently used" in caplog.text
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    assert len(entry_files(tmp_path / "store")) == 2
    assert store.fetch(identity, sequences[1] + [1]) is None
    assert store.fetch(identity, sequences[0] + [1]) is not None
    assert store.fetch(identity, sequences[2] + [1]) is not None

    tiny = DiskPromptCache(tmp_path / "tiny", entry_bytes // 2)
    assert not tiny.save(identity, sequences[0], caches[0])  # larger than the whole store
    assert len(tiny) == 0 and entry_files(tmp_path / "tiny") == []


def test_the_index_and_its_lru_order_survive_a_restart(tmp_path, model, identity, vocab, monkeypatch):
    sequences = [prompt_tokens(vocab, 100, seed=20 + i) for i in range(3)]
    caches = [prefill(model, s) for s in sequences]
    store = DiskPromptCache(tmp_path, 1 << 30)
    for s, c in zip(sequences, caches):
        store.save(identity, s, c)
    entry_bytes = store.nbytes // 3
    store.fetch(identity, sequences[0] + [1])  # used last

    with monkeypatch.context() as patched:  # opening reads headers only: no MLX, no tensors
        patched.setattr(disk_cache, "_lm_cache", lambda: pytest.fail("the index read loaded a cache"))
        reopened = DiskPromptCache(tmp_path, 1 << 30)
    assert len(reopened) == 3 and reopened.nbytes == store.nbytes
    hit = reopened.fetch(identity, sequences[2] + [4])
    expected = next_logits(model, copy.deepcopy(caches[2]), 4)
    assert hit.reused == 100 and mx.array_equal(next_logits(model, hit.cache, 4), expected).item()

    # a smaller limit at the next start keeps the two used last: the third and the first
    smaller = DiskPromptCache(tmp_path, int(2.5 * entry_bytes))
    assert len(smaller) == 2
    assert smaller.fetch(identity, sequences[1] + [1]) is None
    assert smaller.fetch(identity, sequences[0] + [1]) is not None
