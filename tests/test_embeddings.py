"""Embeddings on every API against a live daemon: /api/embed, /api/embeddings and
/v1/embeddings, with the official `ollama` and `openai` clients.

The vectors are the mean-pooled, L2-normalised final hidden states of the test
model, whose hidden size is 256. Its context is set to 64 tokens here so that the
truncation rules are cheap to reach.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import ollama
import openai
import pytest

pytestmark = pytest.mark.live

HIDDEN = 256
CONTEXT = 64
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Why is the sky blue?", "def fibonacci(n):"]
LONG = "Memory pressure makes the reaper unload idle models. " * 20


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True, "context_length": CONTEXT}]
    with ready_daemon(tmp_path_factory.mktemp("embed"), models) as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return ollama.Client(host=live.url, timeout=60)


@pytest.fixture
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def close(a, b, tol=1e-5) -> bool:
    return np.allclose(np.asarray(a), np.asarray(b), atol=tol)


def test_embed_gives_unit_vectors_of_the_hidden_size(client):
    r = client.embed(model="demo", input=TEXTS[0])
    assert len(r.embeddings) == 1 and len(r.embeddings[0]) == HIDDEN
    assert math.isclose(float(np.linalg.norm(r.embeddings[0])), 1.0, rel_tol=1e-4)
    assert r.prompt_eval_count > 5 and r.total_duration > 0


def test_the_same_input_gives_the_same_vector(client):
    first = client.embed(model="demo", input=TEXTS).embeddings
    again = client.embed(model="demo", input=TEXTS).embeddings
    assert first == again
    alone = [client.embed(model="demo", input=t).embeddings[0] for t in TEXTS]
    assert all(close(a, b) for a, b in zip(first, alone))  # batching (padding) does not change a vector
    assert float(np.dot(first[0], first[1])) < 0.999  # and different texts differ


def test_more_inputs_than_one_engine_batch(client):
    texts = [f"{TEXTS[i % 3]} #{i}" for i in range(20)]
    vectors = client.embed(model="demo", input=texts).embeddings
    assert len(vectors) == 20
    assert close(vectors[19], client.embed(model="demo", input=texts[19]).embeddings[0])


def test_legacy_embeddings_route(client):
    legacy = client.embeddings(model="demo", prompt=TEXTS[1]).embedding
    assert close(legacy, client.embed(model="demo", input=TEXTS[1]).embeddings[0])
    assert client.embeddings(model="demo", prompt="").embedding == []


def test_openai_embeddings_float_and_base64(oai, client):
    reference = client.embed(model="demo", input=TEXTS).embeddings
    as_float = oai.embeddings.create(model="demo", input=TEXTS, encoding_format="float")
    as_base64 = oai.embeddings.create(model="demo", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in as_float.data] == [0, 1, 2] and as_float.object == "list"
    assert all(close(d.embedding, v) for d, v in zip(as_float.data, reference))
    assert all(close(d.embedding, v) for d, v in zip(as_base64.data, reference))
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == client.embed(model="demo", input=TEXTS).prompt_eval_count
    with pytest.raises(openai.BadRequestError) as e:  # another tokenizer's ids would embed garbage
        oai.embeddings.create(model="demo", input=[[5, 6, 7, 8]], encoding_format="float")
    assert "token ids" in str(e.value) and "send the text" in str(e.value)


def test_dimensions_shorten_and_renormalise(client, oai):
    short = client.embed(model="demo", input=TEXTS[0], dimensions=16).embeddings[0]
    assert len(short) == 16 and math.isclose(float(np.linalg.norm(short)), 1.0, rel_tol=1e-4)
    assert len(oai.embeddings.create(model="demo", input="x", dimensions=32, encoding_format="float").data[0].embedding) == 32
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="demo", input="x", dimensions=HIDDEN + 1)
    assert e.value.status_code == 400 and "dimensions" in str(e.value)


def test_inputs_longer_than_the_context_are_truncated_unless_told_not_to(client, oai):
    r = client.embed(model="demo", input=[LONG, TEXTS[0]])
    assert len(r.embeddings) == 2
    assert r.prompt_eval_count == CONTEXT + client.embed(model="demo", input=TEXTS[0]).prompt_eval_count
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="demo", input=[TEXTS[0], LONG], truncate=False)
    assert e.value.status_code == 400 and "'input[1]'" in str(e.value) and "context length 64" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="demo", input=LONG)


def test_empty_input_loads_the_model_and_returns_no_vectors(client, live):
    assert client.embed(model="demo", input=[]).embeddings == []
    r = httpx.post(live.url + "/api/embed", json={"model": "demo", "input": ["ok", ""]}, timeout=30)
    assert r.status_code == 400 and r.json() == {"error": "'input[1]' is empty"}


def test_unknown_models_and_bad_inputs(client, oai, live):
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nomic-embed-text", input="x")
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="demo", input="")
    assert "'input'" in e.value.message
    r = httpx.post(live.url + "/api/embed", json={"model": "demo", "input": 5}, timeout=30)
    assert r.status_code == 400 and "'input' must be a string or an array of strings" in r.json()["error"]
    r = httpx.post(live.url + "/v1/embeddings", json={"model": "demo", "input": "x", "encoding_format": "int8"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
