"""models.yaml keys for the old MLX API Server's callers, and its dialect's options."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mlx_server.admission import DEFAULT_AGING, Priority
from mlx_server.api.keys import CONFIG
from mlx_server.api.ollama import old_server_dialect, old_server_options
from mlx_server.config import ConfigError, load_config, parse_config
from mlx_server.errors import BadRequest


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


MODELS = """
models:
  - {name: chat, source: org/chat, priority: high}
  - {name: "qwen2.5-coder:32b", source: org/coder, aliases: [coder]}
"""


def test_default_model_categories_and_priorities_parse(tmp_path):
    config = load_config(write(tmp_path, MODELS + """
default_model: chat
categories: {coding: coder, Fast: "chat:latest", default: chat}
server: {priority_aging: 45s}
"""))
    assert config.default_model == "chat:latest"
    assert dict(config.categories) == {"coding": "qwen2.5-coder:32b", "fast": "chat:latest", "default": "chat:latest"}
    assert [m.priority for m in config.models] == [Priority.HIGH, None]
    assert config.server.priority_aging == 45.0


def test_the_new_keys_are_optional():
    config = parse_config({"models": [{"name": "a", "source": "org/a"}]})
    assert config.default_model is None and dict(config.categories) == {}
    assert config.models[0].priority is None and config.server.priority_aging == DEFAULT_AGING


@pytest.mark.parametrize(
    "text, message",
    [
        ("default_model: gpt-4", "models.yaml: top level: key 'default_model': 'gpt-4' is not a configured model (models: chat:latest, qwen2.5-coder:32b)"),
        ("default_model: 3", "models.yaml: top level: key 'default_model': must be a model name, got 3"),
        ("categories: {coding: nope}", "models.yaml: categories: key 'coding': 'nope' is not a configured model"),
        ("categories: [coding]", "models.yaml: top level: key 'categories': must be a mapping of category -> model name, got list"),
        ("server: {priority_aging: 0}", "models.yaml: server: key 'priority_aging': must be a positive duration"),
        ("server: {priority_aging: soon}", "models.yaml: server: key 'priority_aging': bad duration 'soon'"),
    ],
)
def test_mistakes_name_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MODELS + text))
    assert message in str(e.value) and str(tmp_path / "models.yaml") in str(e.value)


def test_a_bad_model_priority_names_the_model(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\] \('a'\): key 'priority': must be one of high, medium, low, got 'urgent'"):
        load_config(write(tmp_path, "models:\n  - {name: a, source: org/a, priority: urgent}\n"))


def test_the_dialect_is_decided_by_the_body():
    assert old_server_dialect({"prompt": "hi"})  # no model: Ollama would refuse it
    assert old_server_dialect({"model": "a", "prompt": "hi", "max_tokens": 5})
    assert old_server_dialect({"model": "a", "prompt": "hi", "temperature": 0.1})
    assert old_server_dialect({"model": "a", "prompt": "hi", "category": "coding"})
    assert not old_server_dialect({"model": "a", "prompt": "hi", "options": {"temperature": 0.1, "num_predict": 5}})


def options(body: dict, model_options: dict | None = None):
    config = parse_config({"models": [{"name": "a", "source": "org/a", "options": model_options or {}}]})
    app = web.Application()
    app[CONFIG] = config
    return old_server_options(make_mocked_request("POST", "/api/generate", app=app), config.models[0], body)


def test_old_options_max_tokens_defaults_to_2048_and_top_level_fields_win():
    assert options({"prompt": "hi"}).num_predict == 2048
    assert options({"prompt": "hi"}).temperature == 0.7  # defaults.options
    assert options({"prompt": "hi"}, {"temperature": 0.2}).temperature == 0.2  # the model's own setting
    assert options({"prompt": "hi", "options": {"num_predict": 7}}).num_predict == 7
    both = options({"prompt": "hi", "max_tokens": 16, "temperature": 0.1, "options": {"num_predict": 7, "temperature": 0.9}})
    assert both.num_predict == 16 and both.temperature == 0.1


def test_old_options_errors_name_the_callers_field():
    with pytest.raises(BadRequest) as e:
        options({"prompt": "hi", "max_tokens": "many"})
    assert e.value.param == "max_tokens" and "'max_tokens'" in e.value.message
    with pytest.raises(BadRequest) as e:
        options({"prompt": "hi", "temperature": -2})
    assert e.value.param == "temperature"


async def test_without_default_model_a_request_naming_none_is_told_what_to_set(app_client, test_model):
    from conftest import make_config

    client = await app_client(make_config([{"name": "demo", "source": str(test_model)}]))
    for path, body in (("/api/generate", {"prompt": "hi"}), ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]})):
        r = await client.post(path, json=body)
        assert r.status == 400
        assert (await r.json())["error"] == "'model' is required: name one, or set default_model in models.yaml for requests that name none"
    r = await client.post("/api/generate", json={"prompt": "hi", "category": "coding"})
    assert r.status == 400 and "no categories are set in models.yaml" in (await r.json())["error"]
    r = await client.get("/queue/stats")
    assert (await r.json())["by_priority"] == {"high": 0, "medium": 0, "low": 0}
