"""The memory keys this branch adds to models.yaml."""

from __future__ import annotations

import pytest

from mlx_server.config import ConfigError, parse_config


def test_mlx_cache_limit_defaults_to_one_gb_and_null_means_mlx_default():
    assert parse_config({"models": []}).memory.mlx_cache_limit_gb == 1.0
    assert parse_config({"memory": {"mlx_cache_limit_gb": None}, "models": []}).memory.mlx_cache_limit_gb is None
    assert parse_config({"memory": {"mlx_cache_limit_gb": 0.25}, "models": []}).memory.mlx_cache_limit_gb == 0.25


@pytest.mark.parametrize("value, message", [(-1, "must be between 0 and"), ("big", "must be a number")])
def test_a_bad_mlx_cache_limit_names_the_key(value, message):
    with pytest.raises(ConfigError, match=f"key 'mlx_cache_limit_gb': {message}"):
        parse_config({"memory": {"mlx_cache_limit_gb": value}, "models": []})
