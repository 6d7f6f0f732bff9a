"""The real model through the daemon equals in-process mlx_lm: greedy answers token for
token on every generation route, streamed and not; continuous batching equals mlx_lm's
`batch_generate`; stop strings, num_predict, done_reason and eval_count; /api/embed.

Few and short requests: the model decodes a few tokens a second on a CPU. The same
prompt's second request (streamed after non-streamed) reuses its prompt cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from real_http import ask

pytestmark = [pytest.mark.real, pytest.mark.live]

SYSTEM = "Be brief."
# (question, max new tokens): ASCII (answered within 16, so it ends by EOS), digits and
# code, emoji (its 8th token ends mid-character), Cyrillic with CJK.
PROMPTS = {
    "ascii": ("What is the capital of France?", 16),
    "code": ("Write a Python function that returns 12 * 34.", 8),
    "emoji": ("Which emoji means happy: 😀 or 😢?", 8),
    "scripts": ("Как сказать «你好» по-русски?", 8),
}
# Every route at least once; a prompt's later routes reuse its prompt cache and reference.
CASES = [
    ("ascii", "/api/generate"),
    ("ascii", "/api/chat"),
    ("ascii", "/v1/messages"),
    ("code", "/v1/chat/completions"),
    ("emoji", "/v1/completions"),
    ("scripts", "/v1/chat/completions"),
    ("scripts", "/v1/messages"),
]
BATCH_TOKENS = 8


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.parametrize(("name", "route"), CASES)
def test_greedy_answer_equals_mlx_lm_streamed_and_not(real_daemon, reference, name, route):
    question, max_tokens = PROMPTS[name]
    messages = chat(question)
    prompt = reference.chat_ids(messages)
    want = reference.greedy(prompt, max_tokens)
    text = reference.chat_text(messages)  # /v1/completions gets the templated text itself

    single = ask(real_daemon.url, route, messages, max_tokens, stream=False, prompt_text=text)
    streamed = ask(real_daemon.url, route, messages, max_tokens, stream=True, prompt_text=text)

    assert (single.text, single.count, single.done_reason) == (want.text, len(want.tokens), want.finish_reason)
    assert "".join(streamed.chunks) == single.text
    assert (streamed.count, streamed.done_reason) == (single.count, single.done_reason)
    # no character split across lines: U+FFFD only where mlx_lm's own text ends mid-character
    assert sum(c.count("\ufffd") for c in streamed.chunks) == want.text.count("\ufffd") == want.text[-1:].count("\ufffd")
    if single.context is not None:  # /api/generate shows the tokens themselves
        assert single.context == tuple(prompt) + want.tokens


def test_concurrent_prompts_each_equal_mlx_lm_batch_generate(real_daemon, reference):
    questions = ["Name a color.", "What is 2+2?", "Say hello in French, please."]
    prompts = [reference.chat_ids(chat(q)) for q in questions]
    want = reference.batch(prompts, BATCH_TOKENS)

    def generate(question: str) -> tuple[int, ...]:
        body = {"model": "demo", "prompt": question, "system": SYSTEM, "stream": False,
                "options": {"temperature": 0, "num_predict": BATCH_TOKENS}}
        r = httpx.post(real_daemon.url + "/api/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return tuple(r.json()["context"])

    with ThreadPoolExecutor(len(questions)) as pool:
        got = list(pool.map(generate, questions))
    for prompt, context, tokens in zip(prompts, got, want):
        assert context == tuple(prompt) + tokens, reference.tokenizer.decode(list(context[len(prompt):]))


def test_num_predict_stop_strings_done_reason_and_eval_count(real_daemon, reference):
    question, _ = PROMPTS["ascii"]
    url, messages = real_daemon.url, chat(question)
    prompt = reference.chat_ids(messages)

    ended = reference.greedy(prompt, 16)  # SmolLM2 answers this one and ends with EOS
    assert ended.finish_reason == "stop" and "Paris" in ended.text
    answer = ask(url, "/api/generate", messages, 16, stream=False)
    assert (answer.text, answer.done_reason) == (ended.text, "stop")
    assert answer.count == len(ended.tokens) == ended.mlx_lm_count - 1  # mlx_lm counts the EOS step too

    short = reference.greedy(prompt, 3)
    answer = ask(url, "/api/generate", messages, 3, stream=False)
    assert (answer.text, answer.count, answer.done_reason) == (short.text, 3, "length")

    stop = "Paris"
    for stream in (False, True):
        answer = ask(url, "/api/generate", messages, 16, stream=stream, options={"stop": [stop]})
        assert (answer.text, answer.done_reason) == (ended.text[: ended.text.index(stop)], "stop")
    answer = ask(url, "/v1/chat/completions", messages, 16, stream=True, stop=["of Fr"])
    assert (answer.text, answer.done_reason) == (ended.text[: ended.text.index("of Fr")], "stop")


def test_embed_is_deterministic_on_the_real_model(real_daemon):
    body = {"model": "demo", "input": ["Paris is the capital of France.", "Привет, мир! 你好"]}
    first, second = (httpx.post(real_daemon.url + "/api/embed", json=body, timeout=120) for _ in range(2))
    assert first.status_code == second.status_code == 200, first.text
    vectors = first.json()["embeddings"]
    assert vectors == second.json()["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == 576 and vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-3  # L2-normalised, as Ollama's are
