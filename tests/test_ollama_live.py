"""The real `ollama` Python client against a live daemon on a free loopback port."""

from __future__ import annotations

import ollama
import pytest


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [
        {"name": "demo", "source": str(test_model), "preload": True, "aliases": ["tiny"]},
        {"name": "offline-hub:7b", "source": "mlx-community/not-downloaded-4bit"},
    ]
    with ready_daemon(tmp_path_factory.mktemp("live"), models) as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return ollama.Client(host=live.url, timeout=60)


def test_list_ps_show(client):
    names = {m.model for m in client.list().models}
    assert names == {"demo:latest", "offline-hub:7b"}
    running = client.ps().models
    assert [m.model for m in running] == ["demo:latest"]
    assert running[0].size > 0 and running[0].expires_at is not None and running[0].context_length == 4096
    shown = client.show("tiny")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.details.family == "llama"


def test_generate_non_streaming_and_streaming(client):
    options = {"temperature": 0, "num_predict": 10}
    single = client.generate(model="demo", prompt="Hello", options=options)
    assert single.done and single.done_reason == "length" and single.eval_count == 10
    assert single.total_duration > 0 and single.prompt_eval_count > 0 and single.context
    parts = list(client.generate(model="demo", prompt="Hello", options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == single.response


def test_chat_non_streaming_and_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    options = {"temperature": 0, "num_predict": 8}
    single = client.chat(model="tiny", messages=messages, options=options)
    assert single.message.role == "assistant" and single.done and single.eval_count == 8
    parts = list(client.chat(model="tiny", messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == single.message.content
    assert parts[-1].done_reason == "length"


def test_unknown_model_is_404_never_substituted(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3", prompt="hi")
    assert e.value.status_code == 404 and "model 'llama3' not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="demo:7b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_a_model_that_cannot_load_says_why(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="offline-hub:7b", prompt="hi")
    assert e.value.status_code == 503 and "HF_HUB_OFFLINE" in e.value.error


def test_keep_alive_zero_unloads_and_an_empty_prompt_loads(client):
    unloaded = client.generate(model="demo", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []
    loaded = client.generate(model="demo", prompt="", keep_alive="1m")
    assert loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == ["demo:latest"]
