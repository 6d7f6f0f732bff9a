"""Sizing a model from its files, before it is loaded."""

from __future__ import annotations

import json

import pytest

from mlx_server.config import ModelConfig
from mlx_server.sources import SourceError, locate


def test_only_the_weights_mlx_lm_loads_are_counted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 500)
    (tmp_path / "adapters.safetensors").write_bytes(b"x" * 7000)  # mlx_lm.load does not read it
    (tmp_path / "consolidated.safetensors").write_bytes(b"x" * 9000)
    local = locate(ModelConfig(name="m:latest", source=str(tmp_path), local=True))
    assert local.weights_bytes == 1500


def test_a_directory_without_model_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "adapters.safetensors").write_bytes(b"x")
    with pytest.raises(SourceError, match=r"no model\*.safetensors weights"):
        locate(ModelConfig(name="m:latest", source=str(tmp_path), local=True))
