"""The API details real clients meet (issue 14): null options, /api/show capabilities,
think levels, history kept, token-id embeddings refused, model-management routes."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError

from conftest import make_config
from mlx_server.errors import BadRequest
from mlx_server.options import merge_options, parse_options
from mlx_server.prompts import capabilities, chat_prompt

GREEDY = {"temperature": 0, "num_predict": 4}


@pytest.fixture
async def client(app_client, test_model):
    config = make_config([{"name": "demo", "source": str(test_model), "options": {"seed": 42}}])
    return await app_client(config)


# --- options ---------------------------------------------------------------------


def test_null_options_are_skipped_as_ollama_skips_them():
    # LangChain's OllamaEmbeddings sends every unset option as null
    parsed = parse_options({"repeat_last_n": None, "temperature": None, "num_ctx": None, "stop": None, "top_k": 5})
    assert parsed == {"top_k": 5}


def test_seed_minus_one_means_random_and_overrides_the_models_seed():
    assert parse_options({"seed": -1}) == {"seed": None}
    assert merge_options({"seed": 42}, parse_options({"seed": -1})).seed is None
    assert merge_options({"seed": 42}, parse_options({"seed": 7})).seed == 7
    with pytest.raises(BadRequest, match="'seed'"):
        parse_options({"seed": "x"})


async def test_null_options_over_http(client):
    nulls = {"repeat_last_n": None, "num_ctx": None, "mirostat": None, "temperature": None}
    r = await client.post("/api/embed", json={"model": "demo", "input": "hello", "options": nulls})
    assert r.status == 200, await r.text()
    assert len((await r.json())["embeddings"][0]) == 256
    r = await client.post("/api/chat", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {**nulls, **GREEDY, "seed": -1}})
    assert r.status == 200, await r.text()
    assert (await r.json())["done"] is True


# --- /api/show capabilities --------------------------------------------------------


async def test_show_lists_what_the_tiny_model_supports(client):
    show = await (await client.post("/api/show", json={"model": "demo"})).json()
    assert show["capabilities"] == ["completion", "tools", "embedding"]


class FakeTokenizer:
    """Just what `capabilities` and `chat_prompt` read."""

    has_chat_template = True
    has_tool_calling = False

    def __init__(self, template: str = "", vocab: dict | None = None, *, system_first_only: bool = False):
        self.chat_template = template
        self.vocab = vocab or {}
        self.system_first_only = system_first_only
        self.rendered: list[list[dict]] = []
        self.kwargs: dict = {}

    def get_vocab(self):
        return self.vocab

    def apply_chat_template(self, messages, **kwargs):
        if self.system_first_only and any(m["role"] == "system" for m in messages[1:]):
            raise TemplateError("System message must be at the beginning.")
        self.rendered.append(messages)
        self.kwargs = kwargs
        return [1, 2, 3]


def test_capabilities_follow_template_and_vocabulary():
    assert capabilities(FakeTokenizer()) == ["completion", "embedding"]
    thinking = FakeTokenizer("{% if enable_thinking %}<think>{% endif %}{{ tools }}")
    assert capabilities(thinking) == ["completion", "tools", "thinking", "embedding"]
    fim = FakeTokenizer(vocab={"<|fim_prefix|>": 1, "<|fim_suffix|>": 2, "<|fim_middle|>": 3})
    assert capabilities(fim) == ["completion", "insert", "embedding"]


# --- think levels and history ----------------------------------------------------------


def test_think_level_reaches_the_template_as_reasoning_effort():
    tokenizer = FakeTokenizer()
    chat_prompt(tokenizer, [{"role": "user", "content": "x"}], think="high")
    assert tokenizer.kwargs["enable_thinking"] is True and tokenizer.kwargs["reasoning_effort"] == "high"
    chat_prompt(tokenizer, [{"role": "user", "content": "x"}], think=False)
    assert tokenizer.kwargs["enable_thinking"] is False and "reasoning_effort" not in tokenizer.kwargs


async def test_think_strings_other_than_levels_are_refused(client):
    messages = [{"role": "user", "content": "hi"}]
    r = await client.post("/api/chat", json={"model": "demo", "messages": messages, "think": "extreme", "stream": False})
    assert r.status == 400 and "'think'" in (await r.json())["error"] and "low, medium, high" in (await r.json())["error"]
    r = await client.post("/api/chat", json={"model": "demo", "messages": messages, "think": "medium", "stream": False, "options": GREEDY})
    assert r.status == 200, await r.text()


def test_thinking_in_history_is_kept_under_both_names():
    tokenizer = FakeTokenizer()
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "because"}, {"role": "user", "content": "q2"}]
    chat_prompt(tokenizer, history)
    assert tokenizer.rendered[-1][1] == {"role": "assistant", "content": "a", "thinking": "because", "reasoning_content": "because"}


async def test_ollama_chat_history_thinking_reaches_the_template(client, monkeypatch):
    from mlx_server.api import ollama

    seen = []
    real = ollama.chat_messages
    monkeypatch.setattr(ollama, "chat_messages", lambda raw: seen.append(real(raw)) or seen[-1])
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "t"}, {"role": "user", "content": "q2"}]
    r = await client.post("/api/chat", json={"model": "demo", "messages": history, "stream": False, "options": GREEDY})
    assert r.status == 200 and seen[0][1]["thinking"] == "t"


# --- system messages mid-conversation ------------------------------------------------


def test_a_later_system_message_renders_in_place_where_the_template_allows():
    tokenizer = FakeTokenizer()
    messages = [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "system", "content": "s2"}]
    chat_prompt(tokenizer, messages)
    assert tokenizer.rendered[-1] == messages


def test_a_later_system_message_is_folded_into_the_system_prompt_where_the_template_refuses_it():
    tokenizer = FakeTokenizer(system_first_only=True)
    messages = [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "system", "content": "s2"}]
    chat_prompt(tokenizer, messages)
    assert tokenizer.rendered[-1] == [{"role": "system", "content": "s1\n\ns2"}, {"role": "user", "content": "u"}]


# --- routes this server does not have ---------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/push"), ("HEAD", "/api/blobs/sha256:ab"), ("POST", "/api/blobs/sha256:ab")],
)
async def test_model_management_routes_answer_501_pointing_to_models_yaml(client, method, path):
    r = await client.request(method, path, json={"model": "x"})
    assert r.status == 501
    if method != "HEAD":
        assert "models.yaml" in (await r.json())["error"]
