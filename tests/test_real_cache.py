"""A second turn served from the prompt cache equals the same conversation served cold,
on the real model: on the batched path and on the single-stream path (a request with a
`seed`), whether the first turn ended by EOS or by length.

Two forms of second turn: a chat turn (/v1/chat/completions), and a raw continuation of
the first answer (/v1/completions, the templated text plus the answer plus " Also,").
After an EOS the chat template puts <|im_end|> (the EOS itself) right after the answer,
so a cache that wrongly kept the EOS's KV would go unnoticed there; the continuation
puts other text at that position, so such a cache changes what the model sees.

All conversations run first turns, then warm second turns; then the model is unloaded
(its prompt cache goes with it) and each second turn is served again, cold. Their system
prompts differ within the first few tokens, so no conversation reuses another's cache."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from real_http import Answer, ask

pytestmark = [pytest.mark.real, pytest.mark.live]

QUESTION = "What is the capital of France?"
FOLLOW_UP = "And of Italy?"  # the chat form's second turn
CONTINUATION = " Also,"  # the continued form's second turn, right after the first answer
FOLLOW_UP_TOKENS = 6
SEED = {"seed": 7}  # a seed sends a request down the single-stream path


@dataclass(frozen=True, slots=True)
class Case:
    system: str  # chosen so that the first answer ends as `first_end` says
    options: dict
    first_tokens: int
    first_end: str
    continued: bool = False


CASES = {
    "batched-eos": Case("Reply in one sentence.", {}, 16, "stop"),
    "batched-length": Case("Bravo. Be brief.", {}, 4, "length"),
    "single-eos": Case("You are a helpful assistant.", SEED, 16, "stop"),
    "single-length": Case("Delta. Be brief.", SEED, 4, "length"),
    "batched-eos-continued": Case("Be brief.", {}, 16, "stop", continued=True),
    "single-eos-continued": Case("Charlie. Be brief.", SEED, 16, "stop", continued=True),
}


@dataclass(frozen=True, slots=True)
class Turns:
    first: Answer
    warm: Answer
    cold: Answer


@pytest.fixture(scope="module")
def turns(real_daemon, reference) -> dict[str, Turns]:
    url = real_daemon.url

    def first(case: Case) -> Answer:
        messages = [{"role": "system", "content": case.system}, {"role": "user", "content": QUESTION}]
        if case.continued:
            return ask(url, "/v1/completions", [], case.first_tokens, stream=False, prompt_text=reference.chat_text(messages), **case.options)
        return ask(url, "/v1/chat/completions", messages, case.first_tokens, stream=False, **case.options)

    def second(case: Case, answer: Answer) -> Answer:
        messages = [{"role": "system", "content": case.system}, {"role": "user", "content": QUESTION}]
        if case.continued:
            text = reference.chat_text(messages) + answer.text + CONTINUATION
            return ask(url, "/v1/completions", [], FOLLOW_UP_TOKENS, stream=False, prompt_text=text, **case.options)
        messages += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": FOLLOW_UP}]
        return ask(url, "/v1/chat/completions", messages, FOLLOW_UP_TOKENS, stream=False, **case.options)

    firsts = {name: first(case) for name, case in CASES.items()}
    warm = {name: second(case, firsts[name]) for name, case in CASES.items()}
    unloaded = httpx.post(url + "/api/generate", json={"model": "demo", "keep_alive": 0}, timeout=120)
    assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload", unloaded.text
    cold = {name: second(case, firsts[name]) for name, case in CASES.items()}
    return {name: Turns(firsts[name], warm[name], cold[name]) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_second_turn_from_the_prompt_cache_equals_it_served_cold(turns, name):
    case, t = CASES[name], turns[name]
    assert t.first.done_reason == case.first_end, f"the first turn should end by {case.first_end}: {t.first.text!r}"
    assert t.warm.cached_tokens and t.warm.cached_tokens > 0, "the warm second turn did not use the prompt cache"
    assert t.cold.cached_tokens == 0, "the cold second turn found a cache"
    assert (t.warm.text, t.warm.count, t.warm.done_reason) == (t.cold.text, t.cold.count, t.cold.done_reason)
