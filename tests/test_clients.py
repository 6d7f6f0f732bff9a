"""The compatibility suite (marker `compat`): the clients people point at a local
server, installed from their registries and driven against a live daemon.

The model is the tiny random-weight one (tool-capable ChatML template), with a
context long enough for Claude Code's built-in prompt. Random weights answer
gibberish, so everything a check depends on is made deterministic by the server's
own constraints: tool calls by `tool_choice` (required / named), structured output
by JSON schemas with bounds. Clients that take an answer cut by the token budget as
a failure (Claude Code, the Agents SDK) use the `terse` entry of the same model,
which ends answers at the first vowel or space (models.yaml `stop`), as a model
ending its turn would. Claude Code and Codex come from npm
(scripts/install_clients.sh, into .cache/npm); without them their checks skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from mlx_server.testing import make_test_model, ready_daemon

pytestmark = [pytest.mark.compat, pytest.mark.live]

NPM_BIN = Path(__file__).resolve().parents[1] / ".cache" / "npm" / "bin"
CONTEXT = 32768  # Claude Code's prompt with two tools is ~5.3k of this tokenizer's tokens, Codex's ~15k+
STOPS = ["a", "e", "i", "o", "u", " ", "\n"]  # the `terse` model: a turn ends within a few tokens


class Weather(BaseModel):
    """Bounded, so a random model's answer fits a small token budget."""

    city: str = Field(max_length=8)
    degrees: int = Field(ge=0, le=40)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clients")
    model = make_test_model(directory / "tiny", context_length=CONTEXT)
    models = [
        {"name": "demo", "source": str(model), "preload": True, "keep_alive": -1, "options": {"temperature": 0}},
        {"name": "terse", "source": str(model), "keep_alive": -1, "options": {"temperature": 0, "stop": STOPS}},
    ]
    with ready_daemon(directory, models) as daemon:
        yield daemon


def npm_client(name: str) -> Path:
    path = NPM_BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {NPM_BIN} (run scripts/install_clients.sh: it needs node, npm and the npm registry)")
    return path


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """A client's environment: its own HOME, and nothing that phones home."""
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TERM", "PYTHONPATH")}
    return keep | {"HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", **extra}


# --- Claude Code -----------------------------------------------------------------------------


def claude(live, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = offline_env(
        tmp_path / "home",
        ANTHROPIC_BASE_URL=live.url,
        ANTHROPIC_API_KEY="sk-local",
        ANTHROPIC_DEFAULT_HAIKU_MODEL="terse",
        ANTHROPIC_SMALL_FAST_MODEL="terse",
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="64",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    command = [str(npm_client("claude")), "-p", "Say hi", "--model", "terse", "--system-prompt", "Be brief.", "--tools", "Agent,Bash", *args]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_claude_code_print(live, tmp_path):
    """`claude -p` with the Agent tool (it sends a system turn inside `messages`) and Bash."""
    run = claude(live, tmp_path, "--output-format", "json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["type"] == "result" and result["subtype"] == "success" and result["is_error"] is False, result
    assert result["usage"]["input_tokens"] > 1000 and result["num_turns"] == 1


def test_claude_code_stream_json(live, tmp_path):
    run = claude(live, tmp_path, "--output-format", "stream-json", "--verbose")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "system" and "assistant" in kinds and kinds[-1] == "result", kinds
    assert events[-1]["is_error"] is False and events[-1]["subtype"] == "success"
    (assistant,) = [e for e in events if e["type"] == "assistant"][:1]
    assert assistant["message"]["model"] == "terse" and assistant["message"]["content"][0]["type"] == "text"


# --- Codex CLI --------------------------------------------------------------------------------


def test_codex_exec(live, tmp_path):
    """`codex exec` through the Responses API, with short instructions and no network
    (its prompt is ~17k of this tokenizer's tokens: its tools, hosted ones included)."""
    codex = npm_client("codex")
    home = tmp_path / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    instructions = tmp_path / "instructions.md"
    instructions.write_text("Be brief.\n")
    (codex_home / "config.toml").write_text(
        f"""
model = "terse"
model_provider = "local"
model_instructions_file = "{instructions}"
model_reasoning_effort = "none"
check_for_update_on_startup = false
[model_providers.local]
name = "mlx-server"
base_url = "{live.url}/v1"
wire_api = "responses"
env_key = "LOCAL_KEY"
request_max_retries = 0
stream_max_retries = 0
[analytics]
enabled = false
[otel]
exporter = "none"
"""
    )
    env = offline_env(home, CODEX_HOME=str(codex_home), LOCAL_KEY="sk-local")
    command = [str(codex), "exec", "--skip-git-repo-check", "--json", "Say hi"]  # it sends no output limit: `terse` ends the turn
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kinds = [e.get("type") for e in events]
    assert "turn.completed" in kinds, kinds
    usage = next(e["usage"] for e in events if e.get("type") == "turn.completed")
    assert usage["input_tokens"] > 100


# --- OpenAI: responses.create / responses.stream and the Agents SDK ----------------------------


def test_openai_responses_create_and_stream(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="sk-local", max_retries=0, timeout=120)
    created = client.responses.create(model="demo", input="Hi", tools=[{"type": "function", **WEATHER_TOOL["function"]}], tool_choice="required", max_output_tokens=40)
    (call,) = created.output
    assert call.type == "function_call" and call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    after = client.responses.create(
        model="demo", previous_response_id=created.id, input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], max_output_tokens=4
    )
    alone = client.responses.create(model="demo", input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], max_output_tokens=1)
    assert after.usage.input_tokens > alone.usage.input_tokens + 5 and after.output[0].type == "message"
    schema = Weather.model_json_schema() | {"additionalProperties": False}
    with client.responses.stream(model="demo", input="Weather?", text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}}, max_output_tokens=60) as stream:
        final = stream.get_final_response()
    assert Weather.model_validate_json(final.output_text)


@pytest.fixture
def agents_sdk(live):
    agents = pytest.importorskip("agents")
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="sk-local", max_retries=0, timeout=120)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    return agents


def test_agents_sdk_run_and_streamed_run(agents_sdk):
    agent = agents_sdk.Agent(name="helper", instructions="Be brief.", model="terse", model_settings=agents_sdk.ModelSettings(max_tokens=32))
    async def streamed() -> tuple[list[str], str]:
        run = agents_sdk.Runner.run_streamed(agent, "Hi")
        deltas = [e.data.delta async for e in run.stream_events() if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
        return deltas, run.final_output

    async def both():
        ran = await agents_sdk.Runner.run(agent, "Hi")
        return ran, await streamed()

    result, (deltas, final) = asyncio.run(both())  # one loop: the SDK's client is bound to it
    assert isinstance(result.final_output, str)
    assert result.raw_responses[0].usage.output_tokens < 32 and result.raw_responses[0].usage.input_tokens > 5
    assert "".join(deltas) == final == result.final_output  # greedy: the same answer, streamed


def test_agents_sdk_function_tool_and_output_type(agents_sdk):
    calls = []

    @agents_sdk.function_tool
    def weather(city: Annotated[str, Field(max_length=8)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    settings = agents_sdk.ModelSettings(tool_choice="required", max_tokens=100)
    agent = agents_sdk.Agent(name="helper", instructions="Be brief.", model="demo", tools=[weather], model_settings=settings, output_type=Weather)
    result = agents_sdk.Runner.run_sync(agent, "Weather in Paris?", max_turns=3)
    # the forced call ran; tool_choice resets after it (the SDK's default), then the schema shapes the answer
    assert len(calls) == 1 and isinstance(calls[0], str)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and isinstance(result.final_output, Weather)


# --- LiteLLM ----------------------------------------------------------------------------------


def test_litellm_ollama_chat_and_openai(live):
    litellm = pytest.importorskip("litellm")
    messages = [{"role": "user", "content": "Hi"}]
    ollama = litellm.completion(model="ollama_chat/demo", api_base=live.url, messages=messages, max_tokens=5)
    assert ollama.choices[0].message.content and ollama.usage.completion_tokens == 5
    oai = litellm.completion(model="openai/demo", api_base=live.url + "/v1", api_key="sk-local", messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=100, temperature=0)
    (call,) = oai.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and oai.choices[0].finish_reason == "tool_calls"


# --- LangChain --------------------------------------------------------------------------------


def test_langchain_ollama_chat_and_embeddings(live):
    lc_ollama = pytest.importorskip("langchain_ollama")
    reply = lc_ollama.ChatOllama(model="demo", base_url=live.url, num_predict=5).invoke("Hi")
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] == 5
    vectors = lc_ollama.OllamaEmbeddings(model="demo", base_url=live.url).embed_documents(["hello", "world"])
    assert len(vectors) == 2 and len(vectors[0]) == 256 and vectors[0] != vectors[1]


def test_langchain_chat_openai_tools_and_structured_output(live):
    lc_openai = pytest.importorskip("langchain_openai")
    chat = lc_openai.ChatOpenAI(model="demo", base_url=live.url + "/v1", api_key="sk-local", max_tokens=100, max_retries=0)
    message = chat.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    for method in ("function_calling", "json_schema"):
        assert isinstance(chat.with_structured_output(Weather, method=method).invoke("Weather?"), Weather), method


# --- pydantic-ai ------------------------------------------------------------------------------


def test_pydantic_ai_structured_output_and_tools(live):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=live.url + "/v1", api_key="sk-local"))
    settings = {"max_tokens": 100, "temperature": 0}
    result = pydantic_ai.Agent(model, output_type=Weather, model_settings=settings).run_sync("Weather?")
    assert isinstance(result.output, Weather)  # its default: a final_result tool, tool_choice required

    calls = []
    agent = pydantic_ai.Agent(model, model_settings=settings | {"extra_body": {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}})

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    # Every request is forced to call the tool, so the run stops at the request limit:
    # by then the call was made, the tool ran, and its return went back to the server.
    with pydantic_ai.capture_run_messages() as messages, pytest.raises(pydantic_ai.UsageLimitExceeded):
        agent.run_sync("Weather in Paris?", usage_limits=UsageLimits(request_limit=2))
    assert len(calls) >= 1 and isinstance(calls[0], str)
    sent_back = [p for m in messages if m.kind == "request" for p in m.parts if p.part_kind == "tool-return"]
    assert sent_back and sent_back[0].content == f"sunny in {calls[0]}"


# --- llm with llm-ollama ----------------------------------------------------------------------


def test_llm_ollama_chat_and_embed(live, tmp_path):
    binary = shutil.which("llm", path=os.path.dirname(sys.executable))
    if binary is None:
        pytest.skip("the `llm` command is not installed (pip install llm llm-ollama)")
    env = os.environ | {"LLM_USER_PATH": str(tmp_path), "OLLAMA_HOST": live.url}
    chat = subprocess.run([binary, "-m", "ollama/demo", "-o", "num_predict", "5", "Hi"], env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    embed = subprocess.run([binary, "embed", "-m", "ollama/demo", "-c", "hello"], env=env, capture_output=True, text=True, timeout=120)
    assert embed.returncode == 0, embed.stderr
    assert len(json.loads(embed.stdout)) == 256
    models = subprocess.run([binary, "embed-models"], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "ollama/demo" in models  # registered because /api/show lists `embedding`
    assert httpx.post(live.url + "/api/show", json={"model": "demo"}).json()["capabilities"][-1] == "embedding"
