"""Prompt-cache entries on disk: a KV cache outlives unloads and restarts.

Agents and IDEs resend the same long system prompt on every turn; after a
restart, a keep_alive unload or an eviction, the in-memory prompt cache is gone
and the first turn pays the whole prefill again. This store keeps finished KV
caches as files and hands back the one sharing the longest prefix with a prompt.

API (engine thread only: MLX work, plain synchronous calls, no threads):

    store = DiskPromptCache(directory, max_bytes)        # reads file headers only
    identity = model_identity(name, model_dir, lm_cache.make_prompt_cache(model))
    hit = store.fetch(identity, prompt, min_reuse=n)     # DiskHit | None; picks by the index
    if hit: cache, rest = hit.cache, prompt[hit.reused:]
    store.save(identity, tokens, cache)                  # True if it is on disk now
    store.read_rate                                      # bytes/s reading an entry back, measured; None before

Files: `<directory>/<quoted model name>/<sha256 of the file>.safetensors`, in
mlx_lm's `save_prompt_cache` format (so `mlx_lm` can read them too), with the
token ids, the model's identity digest and whether the cache can be trimmed in
its metadata. The name is the file's own checksum: `fetch` verifies it before
loading, so a corrupt or truncated file is never served (it is logged and
deleted). An entry whose identity digest differs from the model's current one
(other weights, config, mlx_lm version or cache classes) is foreign: logged,
deleted, never served. Writes go to a temporary file, are fsynced, then renamed
(the folder is fsynced too), so a crash at any moment leaves either the whole entry
or a temporary file that the next start deletes; that start also evicts down to
`max_bytes` (a crash between a save's rename and its eviction leaves one entry over).
Only the store's own files are ever deleted: its temporary files, files whose
header carries its format marker, and files with an entry's name whose header
cannot be read (torn). Anything else is left alone and not counted; a directory
that holds a model, or contains the state directory, is refused.
The index (tokens, size and last use of every entry) is read from the file
headers when the store opens; last use is the file's mtime, so LRU order
survives restarts. Eviction is LRU over all models within `max_bytes`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from safetensors import safe_open

from .gguf import default_cache_dir

log = logging.getLogger("mlx_server.disk_cache")

FORMAT = "mlx-server-prompt-cache-1"
MIN_DISK_REUSE = 16  # shared tokens below which loading a file is not worth it (as MIN_CACHE_REUSE)
SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
_META = "0."  # mlx_lm stores the caller's metadata under list index 0


def _lm_cache() -> Any:
    # Imported on first use, on the engine thread: importing this module costs no MLX import.
    return importlib.import_module("mlx_lm.models.cache")


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What a cache file must have been written for to be served to a model."""

    name: str  # the configured model name: its entries are filed under it
    digest: str  # config.json, weight files, mlx_lm version and cache classes


@dataclass(frozen=True, slots=True)
class DiskHit:
    cache: list  # mlx_lm cache objects, trimmed to `reused` tokens
    reused: int  # prompt tokens the cache holds; the rest still need prefill


@dataclass(slots=True)
class _Entry:
    path: Path
    model: str
    digest: str
    tokens: np.ndarray  # int32
    trimmable: bool
    nbytes: int
    used: float  # last use (the file's mtime)


class DiskCacheError(OSError):
    """A file in the cache directory is not a usable entry; the message says why."""


def model_identity(name: str, model_dir: str | Path, cache: list) -> ModelIdentity:
    """The identity of a loaded model: a digest of its config.json, the names,
    sizes and mtimes of its weight files, the mlx_lm version and the classes of
    the caches it makes (`cache`: what `make_prompt_cache(model)` returns)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(FORMAT.encode())
    h.update((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        st = weights.stat()
        h.update(f"\0{weights.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(f"\0mlx_lm {importlib.import_module('mlx_lm').__version__}".encode())
    h.update(("\0" + ",".join(type(c).__name__ for c in cache)).encode())
    return ModelIdentity(name, h.hexdigest())


def refusal(directory: str | Path) -> str | None:
    """Why `directory` must not be the cache directory, or None: the store files
    entries one level below it, so model files there would be mixed with them."""
    directory = Path(directory).expanduser().resolve()
    state = default_cache_dir().resolve()
    if state != directory and state.is_relative_to(directory):
        return f"it contains the state directory '{state}'"
    for pattern in ("config.json", "*.safetensors", "*/config.json", "*/model*.safetensors"):
        if found := next(directory.glob(pattern), None):
            return f"it holds a model ('{found}')"
    return None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_header(path: Path) -> dict[str, str]:
    """The safetensors metadata of `path` ({} if none); safetensors checks the header and the file's size."""
    with safe_open(path, "numpy") as f:
        return f.metadata() or {}


def _encode_tokens(tokens: np.ndarray) -> str:
    return base64.b64encode(tokens.astype("<i4").tobytes()).decode("ascii")


def _decode_tokens(text: str) -> np.ndarray:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise DiskCacheError("token ids are cut short")
    return np.frombuffer(raw, dtype="<i4").astype(np.int32)


class DiskPromptCache:
    """Prompt caches on disk under `directory`, at most `max_bytes` of files.

    Engine thread only. Every method is synchronous and does its own file work.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory).expanduser()
        self.max_bytes = max_bytes
        if reason := refusal(self.directory):  # models.yaml is checked too; this sees the files as they are now
            raise DiskCacheError(f"{self.directory} cannot hold prompt caches: {reason}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[Path, _Entry] = {}
        self._reads: float | None = None  # bytes/s of whole loads (checksum, parse), smoothed
        self._writes: float | None = None  # bytes/s of whole saves (serialise, fsync, checksum), smoothed
        started = time.perf_counter()
        for model_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            for path in sorted(model_dir.iterdir()):
                self._index(path)
        log.info(
            "disk prompt cache %s: %d entries, %.1f MB (limit %.1f MB), index read in %.3fs",
            self.directory, len(self._entries), self.nbytes / 1e6, max_bytes / 1e6, time.perf_counter() - started,
        )
        self._evict()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def read_rate(self) -> float | None:
        """Bytes per second that reading an entry back costs: measured on this store's
        loads; before any, its saves (a write also fsyncs, so it errs slow); else None."""
        return self._reads if self._reads is not None else self._writes

    # --- lookup ---------------------------------------------------------------------

    def fetch(self, model: ModelIdentity, prompt: Sequence[int], min_reuse: int = MIN_DISK_REUSE) -> DiskHit | None:
        """The stored cache sharing the longest prefix with `prompt`, trimmed to it.

        At most len(prompt) - 1 tokens are reused: the last prompt token must run
        to give the next token's logits. None below `min_reuse` shared tokens
        (pass more than an in-memory hit already gives, so a file is read only
        when it saves more prefill). The choice reads only the index.
        """
        self._drop_foreign(model)
        wanted = np.asarray(prompt, dtype=np.int32)
        candidates = []
        for entry in self._entries.values():
            if entry.model != model.name:
                continue
            n = min(len(entry.tokens), len(wanted))
            differs = np.flatnonzero(entry.tokens[:n] != wanted[:n])
            shared = int(differs[0]) if differs.size else n
            reuse = min(shared, len(wanted) - 1)
            if reuse >= max(min_reuse, MIN_DISK_REUSE) and (reuse == len(entry.tokens) or entry.trimmable):
                candidates.append((reuse, entry))
        candidates.sort(key=lambda c: c[0], reverse=True)
        for reuse, entry in candidates:
            cache = self._load(entry, model)
            if cache is None:
                continue
            if reuse < len(entry.tokens):
                _lm_cache().trim_prompt_cache(cache, len(entry.tokens) - reuse)
            self._touch(entry)
            return DiskHit(cache, reuse)
        return None

    def _load(self, entry: _Entry, model: ModelIdentity) -> list | None:
        started = time.perf_counter()
        try:
            if _file_sha256(entry.path) != entry.path.stem:
                raise DiskCacheError("its checksum does not match its content (corrupt or truncated)")
            cache, meta = _lm_cache().load_prompt_cache(str(entry.path), return_metadata=True)
            if meta.get("mlx_server_digest") != model.digest:
                raise DiskCacheError("it was written for another model or version")
            if not np.array_equal(_decode_tokens(meta.get("mlx_server_tokens", "")), entry.tokens):
                raise DiskCacheError("its token ids changed since the index was read")
        except MemoryError:
            raise  # the machine is short of memory; the file is fine
        except Exception as e:  # whatever a bad file makes mlx raise: never served, never fatal
            self._discard(entry, f"{type(e).__name__}: {e}")
            return None
        seconds = time.perf_counter() - started
        self._reads = _smoothed(self._reads, entry.nbytes / seconds)
        log.info("disk prompt cache: loaded %d tokens of '%s' (%.1f MB) in %.3fs", len(entry.tokens), model.name, entry.nbytes / 1e6, seconds)
        return cache

    # --- saving ---------------------------------------------------------------------

    def save(self, model: ModelIdentity, tokens: Sequence[int], cache: list) -> bool:
        """Store the KV cache of `tokens`; True when an entry on disk now holds them.

        An entry that already holds these tokens as a prefix is only marked used.
        Entries that are a prefix of the new one go when the new cache can be
        trimmed (it serves them too). Then the least recently used entries of any
        model go until the store fits in max_bytes.
        """
        self._drop_foreign(model)
        stored = np.asarray(tokens, dtype=np.int32)
        if stored.size == 0:
            return False
        held = {getattr(c, "offset", len(stored)) for c in cache}
        if held != {len(stored)}:
            log.warning("disk prompt cache: not saving '%s': %d tokens but caches holding %s", model.name, len(stored), sorted(held))
            return False
        lm_cache = _lm_cache()
        trimmable = lm_cache.can_trim_prompt_cache(cache)
        for entry in self._entries.values():
            holds = entry.model == model.name and len(entry.tokens) >= len(stored) and np.array_equal(entry.tokens[: len(stored)], stored)
            if holds and (len(entry.tokens) == len(stored) or entry.trimmable):
                self._touch(entry)
                return True
        cache = _compact(cache, lm_cache)
        if sum(c.nbytes for c in cache) > self.max_bytes:
            return False
        started = time.perf_counter()
        folder = self.directory / quote(model.name, safe="")
        temp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}{SUFFIX}"
        try:
            if not folder.is_dir():
                folder.mkdir(parents=True)
                _fsync_dir(self.directory)  # the folder's own name, like each entry's, survives a power cut
            metadata = {
                "mlx_server_format": FORMAT,
                "mlx_server_model": model.name,
                "mlx_server_digest": model.digest,
                "mlx_server_tokens": _encode_tokens(stored),
                "mlx_server_trimmable": "1" if trimmable else "0",
            }
            lm_cache.save_prompt_cache(str(temp), cache, metadata)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
            path = folder / f"{_file_sha256(temp)}{SUFFIX}"
            os.replace(temp, path)
            _fsync_dir(folder)
        except Exception as e:  # a full disk, or a cache mlx_lm cannot serialise: serving goes on
            log.warning("disk prompt cache: cannot save %d tokens of '%s': %s: %s", len(stored), model.name, type(e).__name__, e)
            temp.unlink(missing_ok=True)
            return False
        stat = path.stat()
        entry = _Entry(path, model.name, model.digest, stored, trimmable, stat.st_size, stat.st_mtime)
        if trimmable:
            for old in [e for e in self._entries.values() if e.model == model.name and e.path != path
                        and len(e.tokens) <= len(stored) and np.array_equal(e.tokens, stored[: len(e.tokens)])]:
                self._remove(old)
        self._entries[path] = entry
        seconds = time.perf_counter() - started
        self._writes = _smoothed(self._writes, entry.nbytes / seconds)
        log.info("disk prompt cache: saved %d tokens of '%s' (%.1f MB) in %.3fs", len(stored), model.name, entry.nbytes / 1e6, seconds)
        self._evict()  # the new entry, used last, goes only if it alone is too large
        return path in self._entries

    # --- the index ------------------------------------------------------------------

    def _index(self, path: Path) -> None:
        """Index one of the store's files; delete it if it is unusable; leave any other file alone."""
        if not path.is_file() or path.suffix != SUFFIX:
            return
        if path.name.startswith(TEMP_PREFIX):  # a save cut short by a crash
            path.unlink(missing_ok=True)
            return
        try:
            meta = _read_header(path)
        except Exception as e:  # torn: deleted if it bears an entry's name
            if _ENTRY_NAME.fullmatch(path.name):
                self._discard_path(path, f"{type(e).__name__}: {e}")
            return
        if _META + "mlx_server_format" not in meta:
            return  # not the store's: never deleted, not counted
        try:
            if meta[_META + "mlx_server_format"] != FORMAT:
                raise DiskCacheError("not an mlx-server prompt cache of this format")
            stat = path.stat()
            entry = _Entry(
                path=path,
                model=meta[_META + "mlx_server_model"],
                digest=meta[_META + "mlx_server_digest"],
                tokens=_decode_tokens(meta[_META + "mlx_server_tokens"]),
                trimmable=meta[_META + "mlx_server_trimmable"] == "1",
                nbytes=stat.st_size,
                used=stat.st_mtime,
            )
        except Exception as e:  # any malformed header: the file is not an entry we can trust
            self._discard_path(path, f"{type(e).__name__}: {e}")
            return
        self._entries[path] = entry

    def _drop_foreign(self, model: ModelIdentity) -> None:
        for entry in [e for e in self._entries.values() if e.model == model.name and e.digest != model.digest]:
            self._discard(entry, "it was written for another version of the model (weights, config, mlx_lm or cache classes differ)")

    def _touch(self, entry: _Entry) -> None:
        entry.used = time.time()
        try:
            os.utime(entry.path, (entry.used, entry.used))
        except OSError as e:
            log.warning("disk prompt cache: cannot mark %s used: %s", entry.path, e)

    def _evict(self) -> None:
        """Least recently used first, of any model, until the files fit in max_bytes."""
        total = self.nbytes
        for entry in sorted(self._entries.values(), key=lambda e: e.used):
            if total <= self.max_bytes:
                break
            total -= entry.nbytes
            log.info("disk prompt cache: evicting %d tokens of '%s' (%.1f MB, least recently used)", len(entry.tokens), entry.model, entry.nbytes / 1e6)
            self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        self._entries.pop(entry.path, None)
        entry.path.unlink(missing_ok=True)

    def _discard(self, entry: _Entry, reason: str) -> None:
        self._entries.pop(entry.path, None)
        self._discard_path(entry.path, reason)

    @staticmethod
    def _discard_path(path: Path, reason: str) -> None:
        log.warning("disk prompt cache: ignoring and deleting %s: %s", path, reason)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("disk prompt cache: cannot delete %s: %s", path, e)


def _smoothed(old: float | None, new: float) -> float:
    return new if old is None else 0.5 * (old + new)


def _compact(cache: list, lm_cache: Any) -> list:
    """The cache without the spare room a KVCache grows in steps of 256 tokens:
    its `state` is the whole buffer, which would go to disk too."""
    compact = []
    for c in cache:
        if type(c) is lm_cache.KVCache and c.keys is not None and c.keys.shape[2] > c.offset:
            c = lm_cache.KVCache.from_state((c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset))
        compact.append(c)
    return compact


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
