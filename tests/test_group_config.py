"""The `distributed` key: what models.yaml refuses, and what the model's files refuse
at prepare time (mode the architecture lacks, shapes the rank count cannot split,
rank 0 not on this machine). No ranks are launched here."""

from __future__ import annotations

import json
import sys

import pytest

from mlx_server.config import ConfigError, parse_config
from mlx_server.group.checks import GroupConfigError, check_rank0_here, check_shardable


def distributed(raw, tmp_path=None):
    config = parse_config({"models": [{"name": "big", "source": "owner/repo", "distributed": raw}]}, base=tmp_path)
    return config.models[0].distributed


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"ranks": 2, "hosts": ["10.0.0.1", "10.0.0.2"]}, "hosts", "exactly one of"),
        ({"backend": "ring"}, "hosts", "exactly one of"),
        ({"ranks": 1}, "ranks", "between 2 and 64"),
        ({"hosts": ["10.0.0.1"]}, "hosts", "at least two hosts"),
        ({"hosts": ["mac1.local", "mac2.local"]}, "hosts", "ring backend needs IP addresses"),
        ({"ranks": 2, "mode": "data"}, "mode", "tensor, pipeline"),
        ({"ranks": 2, "backend": "mpi"}, "backend", "ring, jaccl"),
        ({"ranks": 2, "env": {"BAD-NAME": "1"}}, "env", "variable names"),
        ({"ranks": 2, "colour": "red"}, "colour", "unknown key"),
        ({"hostfile": "missing.json"}, "hostfile", "cannot read"),
    ],
)
def test_refusals_name_the_key(raw, key, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        distributed(raw, tmp_path)
    message = str(e.value)
    assert "models[0] ('big').distributed" in message and f"key '{key}'" in message and words in message


@pytest.mark.skipif(sys.platform == "darwin", reason="jaccl is refused off macOS only")
def test_jaccl_refused_off_macos():
    with pytest.raises(ConfigError, match=r"key 'backend': jaccl .* needs macOS"):
        distributed({"ranks": 2, "backend": "jaccl"})


def test_accepted_forms(tmp_path):
    local = distributed({"ranks": 3, "env": {"MLX_METAL_FAST_SYNCH": 1}, "python": "/opt/py/bin/python"})
    assert (local.ranks, local.hosts, local.backend, local.mode) == (3, (), "ring", "tensor")
    assert dict(local.env) == {"MLX_METAL_FAST_SYNCH": "1"} and local.python == "/opt/py/bin/python"
    hosts = distributed({"hosts": ["10.0.0.1", "10.0.0.2"], "mode": "pipeline"})
    assert (hosts.ranks, hosts.hosts, hosts.mode) == (2, ("10.0.0.1", "10.0.0.2"), "pipeline")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}))
    from_file = distributed({"hostfile": "hosts.json"}, tmp_path)
    assert from_file.ranks == 2 and from_file.hostfile == str(hostfile)
    assert parse_config({"models": [{"name": "m", "source": "o/r"}]}).models[0].distributed is None


def test_heads_not_divisible_by_the_rank_count(test_model):
    config = json.loads((test_model / "config.json").read_text())  # 4 heads, 2 KV heads
    check_shardable(distributed({"ranks": 2}), test_model, config)
    with pytest.raises(GroupConfigError, match="num_attention_heads is 4, which 3 ranks cannot share evenly"):
        check_shardable(distributed({"ranks": 3}), test_model, config)
    with pytest.raises(GroupConfigError, match="num_key_value_heads is 2, which 4 ranks"):
        check_shardable(distributed({"ranks": 4}), test_model, config)


def test_mode_the_architecture_lacks(test_model):
    llama = json.loads((test_model / "config.json").read_text())
    with pytest.raises(GroupConfigError, match=r"distributed.mode: 'llama' models have no pipeline parallelism .*use mode: tensor"):
        check_shardable(distributed({"ranks": 2, "mode": "pipeline"}), test_model, llama)
    with pytest.raises(GroupConfigError, match="mlx_lm cannot load this model"):
        check_shardable(distributed({"ranks": 2}), test_model, {**llama, "model_type": "no_such_arch"})


def test_rank0_must_be_this_machine(tmp_path):
    check_rank0_here(distributed({"ranks": 2}))
    check_rank0_here(distributed({"hosts": ["127.0.0.1", "10.0.0.2"]}))
    with pytest.raises(GroupConfigError, match=r"distributed.hosts: rank 0 \(192.0.2.1\) is not this machine"):
        check_rank0_here(distributed({"hosts": ["192.0.2.1", "127.0.0.1"]}))
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "far-away-mac", "ips": ["192.0.2.7"]}, {"ssh": "b", "ips": ["192.0.2.8"]}]))
    with pytest.raises(GroupConfigError, match=r"distributed.hostfile: rank 0 \(far-away-mac, 192.0.2.7\)"):
        check_rank0_here(distributed({"hostfile": str(hostfile)}))
