"""Real groups on loopback (ring backend, `mlx.launch`), behind a live daemon.

A random model (4 heads, 2 KV heads) over 2 ranks answers every API with the same
greedy text as the same model in one process; /health, /api/ps, `mlx-server ps` and
metrics show its ranks; killing a rank mid-stream ends that stream with an error,
leaves no rank behind, marks the model failed, and a request after the back-off brings
the group back; keep_alive 0 unloads it and leaves no rank behind. Groups are slow to
start on a busy two-core machine: waits are bounded but generous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import anthropic
import ollama
import openai
import psutil
import pytest

from mlx_server.manager import RETRY_FAILED_AFTER

LAUNCH_TIMEOUT = 300.0  # seconds a group may take to come up here
OPTIONS = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [
        {"name": "pair", "source": str(test_model), "distributed": {"ranks": 2, "backend": "ring", "mode": "tensor"}, "max_concurrency": 2},
        {"name": "solo", "source": str(test_model), "preload": True},
        {"name": "trio", "source": str(test_model), "distributed": {"ranks": 3}},  # 4 heads: refused at load
        {"name": "nopython", "source": str(test_model), "distributed": {"ranks": 2, "python": "/nonexistent/bin/python"}},
    ]
    with ready_daemon(tmp_path_factory.mktemp("group"), models, ready="solo") as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return ollama.Client(host=live.url, timeout=LAUNCH_TIMEOUT)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def model_health(daemon, name: str) -> dict:
    return next(m for m in get_json(daemon.url + "/health")["models"] if m["name"] == f"{name}:latest")


def rank_pids(daemon, name: str) -> list[int]:
    group = model_health(daemon, name).get("group")
    return [r["pid"] for r in group["ranks"]] if group else []


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


def none_alive(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def group_metric(daemon) -> float:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('mlx_server_group_ranks_up{model="pair:latest"}'):
                return float(line.split()[-1])
    raise AssertionError("no mlx_server_group_ranks_up for pair:latest")


def test_every_api_serves_the_group_with_the_local_answers(live, client):
    prompt = "The capital of France is"
    expected = client.generate(model="solo", prompt=prompt, options=OPTIONS).response
    answer = client.generate(model="pair", prompt=prompt, options=OPTIONS)
    assert answer.response == expected and answer.eval_count == 8 and answer.done_reason == "length"
    streamed = list(client.generate(model="pair", prompt=prompt, options=OPTIONS, stream=True))
    assert "".join(p.response for p in streamed) == expected and streamed[-1].done

    messages = [{"role": "user", "content": "Say hello."}]
    local_chat = client.chat(model="solo", messages=messages, options=OPTIONS).message.content
    assert "".join(p.message.content for p in client.chat(model="pair", messages=messages, options=OPTIONS, stream=True)) == local_chat

    oai = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=LAUNCH_TIMEOUT)
    chunks = oai.chat.completions.create(model="pair", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == local_chat

    claude = anthropic.Anthropic(base_url=live.url, api_key="unused", timeout=LAUNCH_TIMEOUT)
    with claude.messages.stream(model="pair", max_tokens=8, messages=messages, extra_body={"temperature": 0}) as stream:
        assert "".join(stream.text_stream) == local_chat


def test_status_shows_the_group(live, client):
    client.generate(model="pair", prompt="hi", options={"num_predict": 1})
    group = model_health(live, "pair")["group"]
    assert (group["backend"], group["mode"], group["state"], group["ranks_up"]) == ("ring", "tensor", "up", 2)
    assert [r["rank"] for r in group["ranks"]] == [0, 1]
    assert all(r["state"] == "up" and psutil.pid_exists(r["pid"]) and r["shard_bytes"] > 0 for r in group["ranks"])
    ps = get_json(live.url + "/api/ps")["models"]
    assert next(m for m in ps if m["name"] == "pair:latest")["group"]["ranks_up"] == 2
    assert "group" not in next(m for m in ps if m["name"] == "solo:latest")
    assert group_metric(live) == 2.0
    out = subprocess.run([sys.executable, "-m", "mlx_server", "ps", "--url", live.url], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ring tensor-parallel group" in out.stdout
    assert f"rank 1  {group['ranks'][1]['host']}  pid {group['ranks'][1]['pid']}  up" in out.stdout


def test_requests_queue_at_rank_0_and_a_cancelled_stream_frees_the_group(live, client):
    prompt = "The capital of France is"
    expected = client.generate(model="solo", prompt=prompt, options=OPTIONS).response
    with ThreadPoolExecutor(2) as pool:  # max_concurrency 2: both admitted, rank 0 runs one at a time
        answers = list(pool.map(lambda _: client.generate(model="pair", prompt=prompt, options=OPTIONS).response, range(2)))
    assert answers == [expected, expected]
    body = json.dumps({"model": "pair", "prompt": "Count:", "options": {"temperature": 0, "num_predict": 3000}}).encode()
    with urllib.request.urlopen(urllib.request.Request(live.url + "/api/generate", data=body), timeout=LAUNCH_TIMEOUT) as r:
        assert json.loads(r.readline())["done"] is False  # then hang up mid-stream
    started = time.monotonic()
    assert client.generate(model="pair", prompt=prompt, options=OPTIONS).response == expected
    assert time.monotonic() - started < 120, "the group went on generating for a stream nobody reads"


def test_what_a_group_does_not_offer_is_a_clear_400(live, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="pair", prompt="hi", format="json", options=OPTIONS)
    assert e.value.status_code == 400 and "structured output and logprobs are not available" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="pair", input="hi")
    assert e.value.status_code == 400 and "does not compute embeddings" in e.value.error


def test_shapes_the_ranks_cannot_split_fail_the_load_with_the_reason(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="trio", prompt="hi", options=OPTIONS)
    assert e.value.status_code == 503
    assert "num_attention_heads is 4, which 3 ranks cannot share evenly" in e.value.error


def test_ranks_that_cannot_start_fail_the_load_with_their_output(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nopython", prompt="hi", options=OPTIONS)
    assert e.value.status_code == 503 and "while loading" in e.value.error and "/nonexistent/bin/python" in e.value.error


def test_a_killed_rank_fails_the_stream_and_the_group_then_comes_back(live, client):
    client.generate(model="pair", prompt="hi", options={"num_predict": 1})
    pids = rank_pids(live, "pair")
    assert len(pids) == 2
    stream = client.generate(model="pair", prompt="Count:", options={"temperature": 0, "num_predict": 3000}, stream=True)
    first = next(stream)
    assert not first.done
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(ollama.ResponseError) as e:
        for part in stream:
            assert not part.done, "the stream finished although a rank died"
    assert "failed mid-request" in e.value.error and "rank 1" in e.value.error

    wait_until(lambda: none_alive(pids), 60, "every rank of the broken group gone")
    health = model_health(live, "pair")
    assert health["state"] == "failed" and "rank 1" in health["error"] and "group" not in health
    assert group_metric(live) == 0.0
    with pytest.raises(ollama.ResponseError) as e:  # the back-off of a failed load
        client.generate(model="pair", prompt="hi", options=OPTIONS)
    assert e.value.status_code == 503 and "rank 1" in e.value.error

    time.sleep(RETRY_FAILED_AFTER)
    answer = client.generate(model="pair", prompt="The capital of France is", options=OPTIONS)
    assert answer.eval_count == 8
    new_pids = rank_pids(live, "pair")
    assert len(new_pids) == 2 and not set(new_pids) & set(pids)
    assert model_health(live, "pair")["state"] == "ready"


def test_keep_alive_zero_unloads_every_rank(live, client):
    client.generate(model="pair", prompt="hi", options={"num_predict": 1})
    pids = rank_pids(live, "pair")
    assert len(pids) == 2
    client.generate(model="pair", prompt="hi", options={"num_predict": 2}, keep_alive=0)
    wait_until(lambda: model_health(live, "pair")["state"] == "unloaded", 60, "pair unloaded by keep_alive")
    assert none_alive(pids), "a rank outlived its group's unload"
    assert "group" not in model_health(live, "pair") and group_metric(live) == 0.0


def test_a_daemon_killed_outright_leaves_no_group_behind(daemon, test_model):
    process = daemon([{"name": "pair", "source": str(test_model), "preload": True, "distributed": {"ranks": 2}}])
    process.wait_ready("pair", timeout=LAUNCH_TIMEOUT)
    pids = rank_pids(process, "pair")
    assert len(pids) == 2
    marker = f"--daemon-pid {process.proc.pid}"
    process.kill()  # SIGKILL: no shutdown, no unload
    wait_until(lambda: none_alive(pids), 60, "the ranks of a killed daemon gone")
    wait_until(lambda: not any(marker in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), 30,
               "mlx.launch of a killed daemon gone")
