"""The OpenAI API against a live daemon, with the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.live

GREEDY = {"temperature": 0, "max_tokens": 8}
HELLO = [{"role": "user", "content": "Hello! How can I help you today?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True, "aliases": ["tiny"], "options": {"temperature": 0.5}}]
    with ready_daemon(tmp_path_factory.mktemp("openai"), models) as daemon:
        yield daemon


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_chat_completion_shape_usage_and_finish_reason(client):
    r = client.chat.completions.create(model="demo", messages=HELLO, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "demo"
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"  # random weights rarely pick the end token within 8
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_and_reports_usage_when_asked(client):
    whole = client.chat.completions.create(model="demo", messages=HELLO, **GREEDY)
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain) and len(plain) >= 3  # role, text..., finish


def test_the_stream_is_sse_data_lines_ending_with_done(live):
    body = {"model": "demo", "messages": HELLO, "stream": True, **GREEDY}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_every_role_and_content_parts_reach_the_template(client):
    short = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=1)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "Why is the sky"}, {"type": "text", "text": "blue?"}]},
        {"role": "assistant", "content": "Rayleigh."},
        {"role": "user", "content": "Hello! How can I help you today?"},
    ]
    long = client.chat.completions.create(model="demo", messages=conversation, max_tokens=1)
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20


def test_max_completion_tokens_stop_and_seed(client):
    r = client.chat.completions.create(model="demo", messages=HELLO, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    seeded = [client.chat.completions.create(model="demo", messages=HELLO, max_tokens=10, temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert seeded[0] == seeded[1] != seeded[2]
    text = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=16, temperature=0).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[: text.index(stop)]


def test_penalties_and_top_p_are_accepted_and_checked(client):
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=4, presence_penalty=1.5, frequency_penalty=0.5, top_p=0.9)
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HELLO, max_tokens=4, presence_penalty=500)
    assert "'presence_penalty'" in e.value.message and e.value.body["param"] == "presence_penalty"


def test_completions_plain_streaming_echo_and_token_prompts(client):
    r = client.completions.create(model="demo", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="demo", prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model="demo", prompt="The quick brown fox", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "The quick brown fox" + r.choices[0].text
    ids = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="def f(", suffix="return 1", max_tokens=2)
    assert "fill-in-the-middle" in e.value.message


def test_models_list_get_and_unknown(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["demo:latest"]
    assert listed.data[0].object == "model" and listed.data[0].owned_by == "mlx-server"
    assert client.models.retrieve("tiny").id == "demo:latest"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["message"] == "model 'gpt-4o' not found"


def test_an_unknown_model_is_404_in_openais_error_shape(client, live):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}, timeout=30)
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "model 'gpt-4o' not found", "type": "not_found_error", "param": "model", "code": 404}}


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"messages": []}, "'messages' must be a non-empty array"),
        ({"n": 2}, "'n' must be 1"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"response_format": {"type": "xml"}}, "'response_format.type'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text only"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "'messages[0].role'"),
        ({"stream_options": {"include_usage": True}}, "'stream_options' is only allowed"),
        ({"top_logprobs": 3}, "'top_logprobs' needs 'logprobs': true"),
    ],
)
def test_bad_requests_are_400s_that_name_what_is_wrong(client, extra, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**({"model": "demo", "messages": HELLO} | extra))
    assert fragment in e.value.message
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"prompt": ["one", "two"]}, "one prompt per request"),
        ({"prompt": "x", "best_of": 3}, "'best_of' must be 1"),
        ({"prompt": [5, 6], "echo": True}, "'echo' needs a string prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "'max_tokens' must be an integer"),
    ],
)
def test_bad_completions_requests_are_400s(client, extra, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**({"model": "demo"} | extra))
    assert fragment in e.value.message


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_requests_are_counted_in_the_metrics(client, live):
    client.chat.completions.create(model="demo", messages=HELLO, max_tokens=1)
    metrics = httpx.get(live.url + "/metrics", timeout=30).text
    assert 'mlx_server_requests_total{endpoint="/v1/chat/completions",model="demo:latest",status="200"}' in metrics
    assert 'mlx_server_requests_total{endpoint="/v1/chat/completions",model="other",status="404"}' in metrics
