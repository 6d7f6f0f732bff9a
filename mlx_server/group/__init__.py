"""One model sharded over several ranks with MLX's distributed runtime.

`mlx.launch` starts the ranks (`rank.py`), every rank loads its shard with
mlx_lm's `sharded_load`, and rank 0 answers the daemon on loopback with the
NDJSON protocol of `protocol.py`. The daemon side (`process.py`, `backend.py`)
makes the group one resident model to the manager.
"""
