"""models.yaml parsing: every mistake is refused with the file, the model and the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_server.config import (
    FOREVER,
    ConfigError,
    load_config,
    normalize_name,
    parse_config,
    parse_duration,
    parse_keep_alive,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def model(test_model: Path, **extra) -> dict:
    return {"name": "demo", "source": str(test_model), **extra}


def test_full_schema_parses_into_frozen_dataclasses(tmp_path, test_model):
    path = write(
        tmp_path,
        f"""
server:
  host: 0.0.0.0
  port: 12000
  api_key: secret
  max_queue: 10
  max_body_mb: 2
  shutdown_grace: 5s
  rate_limit: {{requests: 100, per: 1m}}
  cors_origins: ["http://localhost:3000"]
memory:
  budget_gb: 8
  reserve_gb: 2
  high_water: 0.85
  low_water: 0.7
  check_interval: 500ms
  max_loaded_models: 2
defaults:
  keep_alive: 10m
  options: {{temperature: 0.5}}
models:
  - name: qwen2.5-coder:32b
    source: mlx-community/Qwen2.5-Coder-32B-Instruct-4bit
    aliases: [coder]
    preload: true
    pinned: true
    keep_alive: -1
    max_concurrency: 4
    context_length: 32768
    options: {{temperature: 0.2, stop: ["</s>"]}}
  - name: demo
    source: {test_model}
""",
    )
    config = load_config(path, env={})
    assert config.path == path.resolve()
    assert config.server.host == "0.0.0.0" and config.server.port == 12000
    assert config.server.api_key == "secret"
    assert config.server.shutdown_grace == 5.0
    assert config.server.rate_limit.requests == 100 and config.server.rate_limit.per == 60.0
    assert config.memory.check_interval == 0.5 and config.memory.max_loaded_models == 2
    assert config.defaults.keep_alive == 600.0 and config.defaults.options["temperature"] == 0.5
    coder, demo = config.models
    assert coder.name == "qwen2.5-coder:32b" and not coder.local
    assert coder.aliases == ("coder:latest",) and coder.pinned and coder.keep_alive == FOREVER
    assert coder.options["stop"] == ("</s>",)
    assert demo.name == "demo:latest" and demo.local and demo.source == str(test_model.resolve())
    assert demo.keep_alive is None and config.keep_alive_of(demo) == 600.0
    with pytest.raises(AttributeError):
        config.server.port = 1  # frozen


def test_names_follow_ollama(test_model):
    config = parse_config({"models": [model(test_model, aliases=["tiny", "small:v2"])]})
    assert normalize_name("llama3") == "llama3:latest"
    for name in ("demo", "demo:latest", "DEMO", "tiny", "tiny:latest", "small:v2"):
        assert config.find(name).name == "demo:latest", name
    assert config.find("small") is None
    assert config.find("demo:other") is None


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("server: {prot: 1}\n", "server: key 'prot': unknown key"),
        ("memory: {high_water: 2}\n", "memory: key 'high_water': must be between"),
        ("memory: {low_water: 0.95, high_water: 0.9}\n", "key 'low_water': must not exceed high_water"),
        ("defaults: {keep_alive: 5x}\n", "defaults: key 'keep_alive': bad duration '5x'"),
        ("defaults: {options: {temprature: 1}}\n", "defaults: key 'options': unknown option 'temprature'"),
        ("server: {port: 'abc'}\n", "server: key 'port': must be an integer"),
        ("server: {port: true}\n", "server: key 'port': must be an integer"),
        ("models: {a: 1}\n", "key 'models': must be a list"),
        ("extra: 1\n", "top level: key 'extra': unknown key"),
        ("models: [{source: a/b}]\n", "models[0]: key 'name': is required"),
        ("models: [{name: x}]\n", "models[0] ('x'): key 'source': is required"),
        ("models: [{name: x, source: a/b, keep_alive: soon}]\n", "models[0] ('x'): key 'keep_alive': bad duration"),
        ("models: [{name: x, source: a/b, colour: red}]\n", "models[0] ('x'): key 'colour': unknown key"),
        ("models: [{name: 'bad name', source: a/b}]\n", "key 'name': 'bad name' is not a valid model name"),
        ("models: [{name: x, source: ./does-not-exist}]\n", "models[0] ('x'): key 'source': directory"),
        ("models: [{name: x, source: 'not a repo'}]\n", "neither an existing directory nor a Hugging Face repo id"),
        ("models: [{name: x, source: a/b, max_concurrency: 0}]\n", "key 'max_concurrency': must be between 1"),
        ("models: [{name: x, source: a/b, options: {top_p: 7}}]\n", "key 'options': option 'top_p' must be between"),
        ("models: [{name: x, source: a/b}, {name: 'x:latest', source: c/d}]\n", "'x:latest' is used twice"),
        ("models: [{name: x, source: a/b, aliases: [y]}, {name: z, source: c/d, aliases: [Y]}]\n", "alias 'Y:latest' is used twice"),
        ("server: [1, 2]\n", "server: must be a mapping"),
        ("server: {rate_limit: {requests: 10, per: 0}}\n", "server.rate_limit: key 'per': must be a positive duration"),
        ("memory: {disk_cache_gb: -1}\n", "memory: key 'disk_cache_gb': must be between 0"),
        ("memory: {disk_cache_gb: lots}\n", "memory: key 'disk_cache_gb': must be a number"),
        ("memory: {disk_cache_dir: 5}\n", "memory: key 'disk_cache_dir': must be a string"),
        ("memory: {disk_cache_dir: ' '}\n", "memory: key 'disk_cache_dir': must be a directory path"),
        ("memory: {disk_cache_dir: \"a\\0b\"}\n", "memory: key 'disk_cache_dir': 'a\\x00b' is not a usable path"),
        ("memory: {disk_cach_gb: 1}\n", "memory: key 'disk_cach_gb': unknown key"),
    ],
)
def test_mistakes_are_refused_naming_file_model_and_key(tmp_path, yaml_text, fragment):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(path) in str(e.value)
    assert fragment in str(e.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n"), env={})


def test_relative_source_resolves_against_the_config_file(tmp_path, test_model):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "demo").symlink_to(test_model, target_is_directory=True)
    config = load_config(write(tmp_path, "models: [{name: demo, source: ./models/demo}]\n"), env={})
    assert config.models[0].local and Path(config.models[0].source).is_dir()


def test_disk_cache_is_on_by_default_under_the_state_directory_and_resolves_like_a_source(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    memory = parse_config({}).memory
    assert memory.disk_cache_gb == 8.0 and memory.disk_cache_min_tokens == 256
    assert memory.disk_cache_dir == Path("~/.cache/mlx-server/prompt-cache").expanduser().resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert parse_config({}).memory.disk_cache_dir == (tmp_path / "xdg" / "mlx-server" / "prompt-cache").resolve()
    config = load_config(write(tmp_path, "memory: {disk_cache_gb: 20, disk_cache_dir: state/prompts}\n"), env={})
    assert config.memory.disk_cache_gb == 20.0 and config.memory.disk_cache_dir == tmp_path.resolve() / "state" / "prompts"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_config({"memory": {"disk_cache_dir": "~/kv"}}).memory.disk_cache_dir == (tmp_path / "home" / "kv").resolve()
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "memory: {disk_cache_dir: taken}\n"), env={})
    assert f"{tmp_path / 'models.yaml'}: memory: key 'disk_cache_dir': '{(tmp_path / 'taken').resolve()}' exists and is not a directory" in str(e.value)


def test_environment_then_flags_override_the_file(tmp_path):
    path = write(tmp_path, "server: {host: 127.0.0.1, port: 1000}\n")
    env = {"MLX_SERVER_HOST": "0.0.0.0", "MLX_SERVER_PORT": "2000", "MLX_SERVER_API_KEY": "k", "MLX_SERVER_CONFIG": str(path)}
    config = load_config(None, env=env)
    assert (config.server.host, config.server.port, config.server.api_key) == ("0.0.0.0", 2000, "k")
    config = load_config(None, env=env, host="127.0.0.2", port=3000)
    assert (config.server.host, config.server.port) == ("127.0.0.2", 3000)
    with pytest.raises(ConfigError, match="MLX_SERVER_PORT"):
        load_config(path, env={"MLX_SERVER_PORT": "eleven"})


@pytest.mark.parametrize(
    "value, seconds",
    [(30, 30.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0),
     ("500ms", 0.5), ("-1", -1.0), ("-1m", -60.0), ("0", 0.0), (" 2m ", 120.0), ("1d", 86400.0)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5x", "m5", "1h-3m", None, True, [], "1.2.3s", float("nan")])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_keep_alive_negative_means_forever():
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-5m") == math.inf
    assert parse_keep_alive(0) == 0.0


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_units_round_trip(n, unit):
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * scale)
    assert parse_duration(f"-{n}{unit}") == pytest.approx(-n * scale)


@given(st.text(max_size=12))
def test_duration_parser_never_crashes(text):
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert isinstance(value, float) and math.isfinite(value)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12))
def test_config_parser_refuses_garbage_with_config_error_only(raw):
    try:
        parse_config(raw)
    except ConfigError:
        pass
