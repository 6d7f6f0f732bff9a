"""Three local ranks in tensor mode give the same greedy answers as one process, and a
daemon that shuts down leaves none of them behind.

The model is the real SmolLM2-135M (9 heads, 3 KV heads) when the session has the
`real_model` fixture (tests/conftest.py with `make-demo-model`), or a directory named
by MLX_SERVER_GROUP_MODEL; otherwise a random model with 6 heads and 3 KV heads.
Tensor parallelism sums the partial products of each layer over the ranks in another
order than one process does; in float32/bfloat16 that can move a logit in its last
bits, so where two candidates tie within rounding a greedy token may differ. The test
compares token ids and, if they ever diverge, reports the first divergence with both
candidates instead of a bare string mismatch.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import ollama
import psutil
import pytest

from mlx_server.testing import make_test_model, ready_daemon

LAUNCH_TIMEOUT = 600.0  # three ranks load one after another on a busy two-core machine


@pytest.fixture(scope="module")
def group_model(request, tmp_path_factory) -> Path:
    if os.environ.get("MLX_SERVER_GROUP_MODEL"):
        return Path(os.environ["MLX_SERVER_GROUP_MODEL"])
    try:
        return request.getfixturevalue("real_model")
    except pytest.FixtureLookupError:
        return make_test_model(tmp_path_factory.mktemp("models") / "six-heads", hidden=384, heads=6)


@pytest.fixture(scope="module")
def live(tmp_path_factory, group_model):
    models = [
        {"name": "one", "source": str(group_model), "preload": True, "keep_alive": -1},
        {"name": "three", "source": str(group_model), "keep_alive": -1, "distributed": {"ranks": 3, "mode": "tensor"}},
    ]
    with ready_daemon(tmp_path_factory.mktemp("three"), models, ready="one") as daemon:
        yield daemon


def first_divergence(expected: list[int], got: list[int]) -> str:
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return f"token {i}: one process chose {a}, three ranks chose {b}"
    return f"lengths differ: {len(expected)} vs {len(got)}"


def test_three_ranks_answer_like_one_process_and_leave_nothing_behind(live):
    client = ollama.Client(host=live.url, timeout=LAUNCH_TIMEOUT)
    prompt, options = "The capital of France is", {"temperature": 0, "num_predict": 6}
    one = client.generate(model="one", prompt=prompt, options=options, raw=True)
    three = client.generate(model="three", prompt=prompt, options=options, raw=True)
    assert three.context == one.context, f"{prompt!r}: {first_divergence(one.context, three.context)}"
    assert three.response == one.response
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    options = {"temperature": 0, "num_predict": 5}
    one = client.chat(model="one", messages=chat, options=options).message.content
    three = "".join(p.message.content for p in client.chat(model="three", messages=chat, options=options, stream=True))
    assert three == one

    with urllib.request.urlopen(live.url + "/health", timeout=30) as r:
        group = next(m for m in json.load(r)["models"] if m["name"] == "three:latest")["group"]
    assert group["ranks_up"] == 3 and [r["rank"] for r in group["ranks"]] == [0, 1, 2]
    pids = [r["pid"] for r in group["ranks"]]
    assert live.stop() == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)

