"""Checks a distributed model's files allow: run at prepare time, where they are known.

Each refusal names the `distributed` key to change, as config errors do.
"""

from __future__ import annotations

import importlib
import inspect
import json
import socket
from pathlib import Path
from typing import Any

import psutil

from ..config import DistributedConfig
from ..errors import MlxServerError


class GroupConfigError(MlxServerError):
    """What models.yaml asks of a distributed model cannot work with its files."""


def check_shardable(dist: DistributedConfig, path: Path, config: dict[str, Any]) -> None:
    """Refuse a mode the architecture lacks, or a rank count its shapes do not divide."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def number(key: str) -> int | None:
        value = config.get(key, text.get(key))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    tensor, pipeline = sharding_support(config)
    n = dist.ranks
    if dist.mode == "tensor":
        if not tensor:
            raise GroupConfigError(
                f"distributed.mode: '{config.get('model_type')}' models have no tensor parallelism in mlx_lm"
                + (" (use mode: pipeline)" if pipeline else "")
            )
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = number(key)
            if value is not None and value % n:
                raise GroupConfigError(
                    f"distributed: {key} is {value}, which {n} ranks cannot share evenly "
                    f"(tensor mode splits it; use a rank count that divides it)"
                )
    else:
        if not pipeline:
            raise GroupConfigError(
                f"distributed.mode: '{config.get('model_type')}' models have no pipeline parallelism in mlx_lm"
                + (" (use mode: tensor)" if tensor else "")
            )
        layers = number("num_hidden_layers")
        if layers is not None and layers < n:
            raise GroupConfigError(f"distributed: {n} ranks but only {layers} layers to split in pipeline mode")
        if not (path / "model.safetensors.index.json").is_file():
            raise GroupConfigError(
                f"distributed.mode: pipeline needs model.safetensors.index.json in {path} "
                f"(mlx_lm's sharded_load picks each stage's files from it)"
            )


def sharding_support(config: dict[str, Any]) -> tuple[bool, bool]:
    """(tensor, pipeline): what mlx_lm's class for this model_type implements.

    Imports the model module to look at its classes; it builds no arrays.
    """
    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes

    try:
        model_class, _ = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise GroupConfigError(f"mlx_lm cannot load this model: {e}") from None
    module = importlib.import_module(model_class.__module__)
    pipeline = any(
        issubclass(c, PipelineMixin) and c is not PipelineMixin for _, c in inspect.getmembers(module, inspect.isclass)
    )
    return hasattr(model_class, "shard"), pipeline


def check_rank0_here(dist: DistributedConfig) -> None:
    """Rank 0 answers the daemon on loopback, so it must run on this machine."""
    if dist.hosts:
        key, names = "hosts", [dist.hosts[0]]
    elif dist.hostfile:
        key, names = "hostfile", rank0_names(Path(dist.hostfile))
    else:
        return  # local ranks
    if not any(is_this_machine(n) for n in names):
        raise GroupConfigError(
            f"distributed.{key}: rank 0 ({', '.join(names)}) is not this machine; list this Mac first "
            f"(rank 0 serves the model to the daemon on 127.0.0.1)"
        )


def rank0_names(hostfile: Path) -> list[str]:
    """The first host of an mlx.distributed_config hostfile: its ssh name and IPs."""
    try:
        data = json.loads(hostfile.read_text(encoding="utf-8"))
        first = (data.get("hosts") if isinstance(data, dict) else data)[0]
        return [first["ssh"], *first.get("ips", [])]
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
        raise GroupConfigError(f"distributed.hostfile: cannot read rank 0 from {hostfile}: {e}") from None


def is_this_machine(host: str) -> bool:
    names = {"localhost", socket.gethostname(), socket.gethostname().split(".")[0]}
    if host in names or host.split(".")[0] in names:
        return True
    addresses = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return host in addresses
