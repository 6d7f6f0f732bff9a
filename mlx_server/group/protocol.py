"""The NDJSON protocol between the daemon and a group's rank 0, over loopback TCP.

One connection per request; one JSON object per line each way:

    daemon -> rank 0   {"op": "info"}
    rank 0 -> daemon   {"ranks": [{"rank", "host", "pid", "shard_bytes"}...]}

    daemon -> rank 0   {"op": "generate", "prompt": [ids], "max_tokens": N, "sampling": {...}}
    rank 0 -> daemon   {"token": id}  ...one per generated token (an end-of-sequence token too)
                       {"done": "stop" | "length" | "cancelled"}   or   {"error": "why"}

The daemon cancels a generation by closing the connection; rank 0 notices before its
next step.

Every rank also writes a heartbeat line to its stdout (`heartbeat_line`), which
`mlx.launch` passes on, over ssh for a rank on another Mac, to its own stdout, which
the daemon reads: a channel every rank has, with no port or address to find. No MLX
here: both sides import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..options import GenerationOptions

# Each rank writes its heartbeat this often, from a thread of its own. MLX releases the GIL
# while it computes or waits for a peer, so a rank that is busy, or blocked in a collective
# by a hung peer, still beats; a rank that is stopped or frozen falls silent.
HEARTBEAT_SECONDS = 1.0
HEARTBEAT = re.compile(rb"mlx-server group heartbeat: rank (\d+)\r?\n")  # a pty (ssh -tt) adds the \r


@dataclass(frozen=True, slots=True)
class Sampling:
    """What every rank needs to sample the same token: options and a shared seed."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float

    @classmethod
    def of(cls, options: GenerationOptions, seed: int) -> Sampling:
        return cls(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            seed=seed,
            repeat_penalty=options.repeat_penalty,
            repeat_last_n=options.repeat_last_n,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
        )


@dataclass(frozen=True, slots=True)
class GenerateCommand:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling

    def to_json(self) -> dict[str, Any]:
        return {"op": "generate", "prompt": list(self.prompt), "max_tokens": self.max_tokens, "sampling": asdict(self.sampling)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> GenerateCommand:
        return cls(tuple(int(t) for t in body["prompt"]), int(body["max_tokens"]), Sampling(**body["sampling"]))


@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int
    host: str
    pid: int
    shard_bytes: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    ranks: tuple[RankInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ranks": [asdict(r) for r in self.ranks]}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> GroupInfo:
        return cls(tuple(RankInfo(**r) for r in body["ranks"]))


def heartbeat_line(rank: int) -> bytes:
    return f"mlx-server group heartbeat: rank {rank}\n".encode()


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {line[:80]!r}")
    return body
