"""The disk prompt cache deletes only its own files, and refuses a directory that
holds a model or contains the state directory, at config load and when it opens.

No MLX here: the files are written with safetensors' numpy API.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_server.config import ConfigError, load_config
from mlx_server.disk_cache import FORMAT, DiskCacheError, DiskPromptCache


def write_safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(64, dtype=np.float32)}, str(path), metadata=metadata)
    return path


def write_entry(folder: Path, fmt: str = FORMAT) -> Path:
    """A file as the store names and marks its entries (its name is its sha256)."""
    meta = {"0.mlx_server_format": fmt, "0.mlx_server_model": "m:latest", "0.mlx_server_digest": "d",
            "0.mlx_server_tokens": "AQAAAA==", "0.mlx_server_trimmable": "1"}
    temp = write_safetensors(folder / "entry.safetensors", meta)
    return temp.rename(folder / f"{hashlib.sha256(temp.read_bytes()).hexdigest()}.safetensors")


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    write_safetensors(folder / "model.safetensors", {"format": "mlx"})
    return folder


def test_files_that_are_not_the_stores_are_left_alone_and_not_counted(tmp_path):
    folder = tmp_path / "cache" / "m%3Alatest"
    foreign = [
        write_safetensors(folder / "adapters.safetensors", {"format": "pt"}),
        write_safetensors(folder / ("a" * 64 + ".safetensors")),  # an entry's name, but no marker
        write_safetensors(tmp_path / "cache" / "vision" / "tower.safetensors"),
    ]
    (folder / "notes.safetensors").write_bytes(b"not safetensors at all")  # torn, but not an entry's name
    foreign.append(folder / "notes.safetensors")
    ours = write_entry(folder)
    old = write_entry(folder, fmt="mlx-server-prompt-cache-0")
    temp = write_safetensors(folder / ".tmp-0123.safetensors")

    store = DiskPromptCache(tmp_path / "cache", 1 << 30)
    assert all(p.exists() for p in foreign)
    assert ours.exists() and not old.exists() and not temp.exists()
    assert len(store) == 1 and store.nbytes == ours.stat().st_size


def test_an_entry_whose_data_is_cut_short_is_deleted_when_the_store_opens(tmp_path):
    entry = write_entry(tmp_path / "m%3Alatest")
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size - 8)
    assert len(DiskPromptCache(tmp_path, 1 << 30)) == 0 and not entry.exists()


def test_the_store_refuses_a_directory_that_holds_models_and_deletes_nothing(tmp_path):
    model = write_model(tmp_path / "models" / "tiny")
    with pytest.raises(DiskCacheError, match="holds a model"):
        DiskPromptCache(tmp_path / "models", 1 << 30)
    with pytest.raises(DiskCacheError, match="holds a model"):
        DiskPromptCache(model, 1 << 30)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_the_store_refuses_the_state_directorys_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(DiskCacheError, match="contains the state directory"):
        DiskPromptCache(tmp_path / "xdg", 1 << 30)
    assert len(DiskPromptCache(tmp_path / "xdg" / "mlx-server" / "prompt-cache", 1 << 30)) == 0


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("models", "is or contains the source directory of model 'm:latest'"),
        ("models/org/m", "is or contains the source directory of model 'm:latest'"),
        ("other", "cannot hold prompt caches: it holds a model ('{tmp}/other/x/config.json')"),
        ("xdg", "cannot hold prompt caches: it contains the state directory '{tmp}/xdg/mlx-server'"),
    ],
)
def test_config_refuses_a_disk_cache_dir_with_models_or_the_state_directory(tmp_path, monkeypatch, directory, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "models" / "org" / "m").mkdir(parents=True)
    write_model(tmp_path / "other" / "x")
    config = tmp_path / "models.yaml"
    config.write_text(f"memory: {{disk_cache_gb: 1, disk_cache_dir: {directory}}}\nmodels: [{{name: m, source: ./models/org/m}}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(config, env={})
    path = (tmp_path / directory).resolve()
    assert str(e.value).startswith(f"{config}: memory: key 'disk_cache_dir': '{path}' ")
    assert message.format(tmp=tmp_path.resolve()) in str(e.value)
