"""Structured output on a live daemon: decoding constrained by llguidance so the
random-weight test model's output always parses and matches the schema.

Random weights are the hard case: nothing but the constraint makes the text JSON,
and nothing but the constraint ends it before the token budget runs out.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest

pytestmark = pytest.mark.live

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 15}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "role", "active", "tags", "address"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a user of the model server.", "Who maintains the reaper?", "Invent a person.", "Give me an admin.",
    "A guest from Paris.", "Write a haiku about the sea.", "Why is the sky blue?", "Fibonacci fan, please.",
    "Someone aged 42.", "A user with three tags.", "The quick brown fox.", "Hello! How can I help you today?",
    "An inactive account.", "Numbers: 0 1 2 3.", "A person from Lima.", "Streaming sends each token.",
    "true false null", "Memory pressure.", "The lazy dog's owner.", "One more, please.",
]


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    from mlx_server.testing import ready_daemon

    models = [{"name": "demo", "source": str(test_model), "preload": True, "max_concurrency": 4}]
    with ready_daemon(tmp_path_factory.mktemp("structured"), models) as daemon:
        yield daemon


@pytest.fixture
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_every_one_of_20_prompts_gives_json_that_matches_the_schema(oai):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(i: int) -> tuple[str, str]:
        seed = {"seed": i} if i % 2 else {}  # seeded requests take the engine's single-stream path
        r = oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": PROMPTS[i]}], response_format=response_format, temperature=1.0, max_tokens=400, **seed
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:  # four at once: the processors share a batch
        answers = list(pool.map(ask, range(20)))
    assert len({text for text, _ in answers}) > 15  # really sampled, not one canned answer
    for text, finish in answers:
        jsonschema.validate(json.loads(text), PERSON)
        assert finish in ("stop", "length")


def test_a_short_budget_still_closes_the_json(oai):
    """Free-form strings and objects could run forever: the end of the budget closes them."""
    unbounded = {"type": "object", "properties": {"story": {"type": "string"}, "more": {"type": "object"}}, "required": ["story", "more"]}
    formats = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "s", "schema": unbounded}}]
    for seed in range(6):
        r = oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Tell me a long story."}], response_format=formats[seed % 2], temperature=1.0, max_tokens=24, seed=seed
        )
        value = json.loads(r.choices[0].message.content)
        assert isinstance(value, dict)
        if seed % 2:
            jsonschema.validate(value, unbounded)
        assert r.usage.completion_tokens <= 24


def test_openai_streaming_json_schema(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["ok", "n"]}
    chunks = oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "ok?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        max_tokens=50,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_ollama_format_json_and_schema(live):
    client = ollama.Client(host=live.url, timeout=120)
    for seed in range(3):
        r = client.chat(model="demo", messages=[{"role": "user", "content": "JSON please"}], format="json", options={"num_predict": 60, "seed": seed, "temperature": 1})
        assert isinstance(json.loads(r.message.content), dict)
    r = client.generate(model="demo", prompt="A person.", format=PERSON, options={"num_predict": 400})
    jsonschema.validate(json.loads(r.response), PERSON)
    streamed = "".join(c.message.content for c in client.chat(model="demo", messages=[{"role": "user", "content": "hi"}], format=PERSON, stream=True, options={"num_predict": 400}))
    jsonschema.validate(json.loads(streamed), PERSON)


def test_anthropic_output_config_format(live):
    client = anthropic.Anthropic(base_url=live.url, api_key="unused", timeout=120, max_retries=0)
    m = client.messages.create(
        model="demo", max_tokens=400, messages=[{"role": "user", "content": "A person."}], extra_body={"output_config": {"format": {"type": "json_schema", "schema": PERSON}}}
    )
    jsonschema.validate(json.loads(m.content[0].text), PERSON)
    assert m.stop_reason in ("end_turn", "max_tokens")


def test_bad_formats_are_400s_that_name_the_parameter(oai, live):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
        )
    assert "'response_format'" in e.value.message and "wat" in e.value.message
    client = ollama.Client(host=live.url, timeout=60)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="demo", prompt="x", format={"type": "string", "pattern": "("})
    assert e.value.status_code == 400 and "'format' is not a usable JSON schema" in str(e.value)
    r = httpx.post(live.url + "/api/generate", json={"model": "demo", "prompt": "x", "format": "yaml"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("'format' must be \"json\" or a JSON schema")
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="demo", messages=[{"role": "user", "content": "x"}], format="json", think=True)
    assert e.value.status_code == 400 and "'think'" in str(e.value)
