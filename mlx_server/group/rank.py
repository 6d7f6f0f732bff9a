"""One rank of a distributed model: `mlx.launch ... -- python -m mlx_server.group.rank`.

Every rank loads its shard with mlx_lm's `sharded_load` (tensor mode: `model.shard`,
pipeline mode: `model.model.pipeline`). Rank 0 also listens on 127.0.0.1 and speaks
`protocol.py` to the daemon; it sends each request to the other ranks through
`mx.distributed.all_sum` (rank 0 contributes the bytes, the others zeros), so every
rank runs the same forward passes, and after each token it tells them whether to go
on. While idle, rank 0 sends an empty message every second: a rank that died is
noticed then, not at the next request. Once loaded, every rank writes a heartbeat
(protocol.py) by which the daemon notices a rank that is alive but hung.

A rank that hits an error exits non-zero; `mlx.launch` then stops the others and the
daemon marks the model failed. A daemon killed outright leaves no group behind: the
group's watchdog (process.py) stops it. This is a separate process, not the daemon:
it may call MLX on its main thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import sharded_load

from .protocol import (
    HEARTBEAT_SECONDS,
    GenerateCommand,
    GroupInfo,
    RankInfo,
    decode,
    encode,
    heartbeat_line,
)

log = logging.getLogger("mlx_server.group.rank")

IDLE_SECONDS = 1.0  # rank 0 sends an empty message this often while no request runs
REQUEST_READ_SECONDS = 30.0  # longest the daemon may take to send its request line
HOST_BYTES = 64


class Ranks:
    """The collectives this program uses, on the CPU stream (control data is tiny)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def _sum(self, array: mx.array) -> mx.array:
        out = mx.distributed.all_sum(array, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def share(self, message: dict | None) -> dict | None:
        """Rank 0's message (None: nothing to do) on every rank."""
        data = encode(message) if (self.rank == 0 and message is not None) else b""
        size = int(self._sum(mx.array(len(data), dtype=mx.int64)).item())
        if size == 0:
            return None
        buffer = mx.array(list(data), dtype=mx.uint8) if self.rank == 0 else mx.zeros(size, dtype=mx.uint8)
        return decode(bytes(self._sum(buffer).tolist()))

    def go_on(self, decision: bool) -> bool:
        """Rank 0's decision to generate another token, on every rank."""
        return bool(self._sum(mx.array(1 if (self.rank == 0 and decision) else 0, dtype=mx.int32)).item())

    def gather_info(self, shard_bytes: int) -> GroupInfo:
        numbers = [0] * (2 * self.size)
        numbers[2 * self.rank : 2 * self.rank + 2] = [os.getpid(), shard_bytes]
        hosts = bytearray(HOST_BYTES * self.size)
        name = socket.gethostname().encode()[:HOST_BYTES]
        hosts[HOST_BYTES * self.rank : HOST_BYTES * self.rank + len(name)] = name
        numbers = self._sum(mx.array(numbers, dtype=mx.int64)).tolist()
        names = bytes(self._sum(mx.array(list(hosts), dtype=mx.uint8)).tolist())
        return GroupInfo(
            tuple(
                RankInfo(
                    rank=r,
                    host=names[HOST_BYTES * r : HOST_BYTES * (r + 1)].rstrip(b"\0").decode(errors="replace"),
                    pid=int(numbers[2 * r]),
                    shard_bytes=int(numbers[2 * r + 1]),
                )
                for r in range(self.size)
            )
        )


def generate(
    model,
    eos: set[int],
    ranks: Ranks,
    command: GenerateCommand,
    send: Callable[[int], bool],
    cancelled: Callable[[], bool],
) -> str:
    """Run one request on this rank; rank 0 sends the tokens. Returns the finish reason."""
    s = command.sampling
    mx.random.seed(s.seed)  # the same draws on every rank, so every rank feeds the same token
    window = s.repeat_last_n if s.repeat_last_n >= 0 else len(command.prompt)
    processors = []
    if window > 0:  # as the engine does
        processors = make_logits_processors(
            None, s.repeat_penalty if s.repeat_penalty != 1.0 else None, window,
            s.presence_penalty or None, window, s.frequency_penalty or None, window,
        )
    steps = generate_step(
        mx.array(command.prompt),
        model,
        max_tokens=command.max_tokens,
        sampler=make_sampler(s.temperature, s.top_p, s.min_p, top_k=s.top_k),
        logits_processors=processors or None,
        prompt_cache=make_prompt_cache(model),
    )
    finish = "length"
    try:
        for count, (token, _) in enumerate(steps, start=1):
            token = int(token)
            finish = "stop" if token in eos else "length" if count >= command.max_tokens else None
            if ranks.rank == 0 and finish is None and (not send(token) or cancelled()):
                finish = "cancelled"
            elif ranks.rank == 0 and finish is not None:
                send(token)
            if not ranks.go_on(finish is None):
                break
    finally:
        steps.close()
    return finish or "stop"


class Connection:
    """The daemon's side of one request, as rank 0 sees it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def read_request(self) -> dict:
        self.sock.settimeout(REQUEST_READ_SECONDS)
        reader = self.sock.makefile("rb")
        line = reader.readline(1 << 26)
        if not line:
            raise ConnectionError("the daemon closed the connection before sending a request")
        return decode(line)

    def send(self, obj: dict) -> bool:
        try:
            self.sock.sendall(encode(obj))
            return True
        except OSError:
            return False

    def send_token(self, token: int) -> bool:
        return self.send({"token": token})

    def closed(self) -> bool:
        """The daemon hung up: it cancels by closing and sends nothing after its request."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


def bind(port: int) -> socket.socket:
    """Rank 0's socket for the daemon, bound before the shard loads, so that a port that
    another process took since the daemon picked it ends the group at once, not after
    minutes of loading. It listens once the shard is loaded: until then the daemon's
    connections are refused."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("127.0.0.1", port))
    except OSError as e:
        server.close()
        raise SystemExit(f"rank 0: 127.0.0.1:{port} is taken ({e.strerror}); another process took it after the daemon picked it") from None
    return server


def serve(model, eos: set[int], ranks: Ranks, info: GroupInfo, server: socket.socket) -> None:
    """Rank 0: answer the daemon, one request at a time; others queue in the backlog."""
    server.listen(128)
    server.settimeout(IDLE_SECONDS)
    host, port = server.getsockname()
    print(f"mlx-server group: rank 0 of {ranks.size} listening on {host}:{port}", file=sys.stderr, flush=True)
    while True:
        try:
            sock, _ = server.accept()
        except TimeoutError:
            ranks.share(None)
            continue
        with sock:
            connection = Connection(sock)
            try:
                request = connection.read_request()
                if request.get("op") == "info":
                    connection.send(info.to_json())
                    continue
                if request.get("op") != "generate":
                    connection.send({"error": f"unknown op {request.get('op')!r}"})
                    continue
                command = GenerateCommand.from_json(request)
            except (OSError, ValueError, KeyError, TypeError) as e:
                connection.send({"error": f"bad request: {type(e).__name__}: {e}"})
                continue
            if connection.closed():  # cancelled while it waited in the backlog
                continue
            sock.settimeout(None)
            ranks.share(command.to_json())
            try:
                finish = generate(model, eos, ranks, command, connection.send_token, connection.closed)
            except Exception as e:  # a collective failed: the group is broken, say so and exit
                connection.send({"error": f"rank 0: {type(e).__name__}: {e}"})
                raise
            connection.send({"done": finish})


def follow(model, eos: set[int], ranks: Ranks) -> None:
    """Ranks 1..N-1: run whatever rank 0 sends, for ever."""
    while True:
        message = ranks.share(None)
        if message is not None:
            generate(model, eos, ranks, GenerateCommand.from_json(message), lambda t: True, lambda: False)


def heartbeat(rank: int) -> None:
    """A thread's loop: this rank's heartbeat on stdout, for ever. A plain `os.write`, so
    that no buffer holds it back; it ends with the rank (or once the launcher is gone)."""
    line = heartbeat_line(rank)
    while True:
        os.write(sys.stdout.fileno(), line)
        time.sleep(HEARTBEAT_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_server.group.rank", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model directory (the same path on every host)")
    parser.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--port", type=int, required=True, help="rank 0 listens on 127.0.0.1:PORT")
    # --name and --daemon-pid mark the command line: by them a daemon finds what one now gone left of a group.
    parser.add_argument("--name", default="", help="the model's name in models.yaml")
    parser.add_argument("--daemon-pid", type=int, default=0, help="the daemon that launched this group")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(levelname)s %(message)s")

    group = mx.distributed.init(strict=True, backend=args.backend)
    ranks = Ranks(group)
    server = bind(args.port) if ranks.rank == 0 else None
    log.info("rank %d of %d: loading its shard of '%s' (%s)", ranks.rank, ranks.size, args.name, args.mode)
    if args.mode == "tensor":
        model, tokenizer = sharded_load(args.model, tensor_group=group)
    else:
        model, tokenizer = sharded_load(args.model, pipeline_group=group)
    shard_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    info = ranks.gather_info(shard_bytes)
    eos = set(tokenizer.eos_token_ids)
    log.info("rank %d of %d loaded its shard (%.1f MB)", ranks.rank, ranks.size, shard_bytes / 1e6)
    threading.Thread(target=heartbeat, args=(ranks.rank,), name="heartbeat", daemon=True).start()
    if server is not None:
        serve(model, eos, ranks, info, server)
    else:
        follow(model, eos, ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
