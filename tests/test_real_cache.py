"""A second turn served from the prompt cache equals the same conversation served cold,
on the real model: on the batched path and on the single-stream path (a request with a
`seed`), whether the first turn ended by EOS or by length.

All four conversations run first turns, then warm second turns; then the model is
unloaded (its prompt cache goes with it) and each second turn is served again, cold.
Their system prompts differ in the first word, so no conversation reuses another's cache."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from real_http import Answer, ask

pytestmark = [pytest.mark.real, pytest.mark.live]

QUESTION = "What is the capital of France?"  # answered in 8 tokens, then EOS
FOLLOW_UP = "And of Italy?"
FOLLOW_UP_TOKENS = 6


@dataclass(frozen=True, slots=True)
class Case:
    system: str
    options: dict  # a seed sends a request down the single-stream path
    first_tokens: int
    first_end: str


CASES = {
    "batched-eos": Case("Alpha. Be brief.", {}, 16, "stop"),
    "batched-length": Case("Bravo. Be brief.", {}, 4, "length"),
    "single-eos": Case("Charlie. Be brief.", {"seed": 7}, 16, "stop"),
    "single-length": Case("Delta. Be brief.", {"seed": 7}, 4, "length"),
}


@dataclass(frozen=True, slots=True)
class Turns:
    first: Answer
    warm: Answer
    cold: Answer


def _second_turn(case: Case, first: Answer) -> list[dict]:
    return [
        {"role": "system", "content": case.system},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": FOLLOW_UP},
    ]


@pytest.fixture(scope="module")
def turns(real_daemon) -> dict[str, Turns]:
    url, route = real_daemon.url, "/v1/chat/completions"
    firsts = {
        name: ask(url, route, [{"role": "system", "content": c.system}, {"role": "user", "content": QUESTION}],
                  c.first_tokens, stream=False, **c.options)
        for name, c in CASES.items()
    }
    warm = {name: ask(url, route, _second_turn(c, firsts[name]), FOLLOW_UP_TOKENS, stream=False, **c.options) for name, c in CASES.items()}
    unloaded = httpx.post(url + "/api/generate", json={"model": "demo", "keep_alive": 0}, timeout=120)
    assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload", unloaded.text
    cold = {name: ask(url, route, _second_turn(c, firsts[name]), FOLLOW_UP_TOKENS, stream=False, **c.options) for name, c in CASES.items()}
    return {name: Turns(firsts[name], warm[name], cold[name]) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_second_turn_from_the_prompt_cache_equals_it_served_cold(turns, name):
    case, t = CASES[name], turns[name]
    assert t.first.done_reason == case.first_end, f"the first turn should end by {case.first_end}: {t.first.text!r}"
    assert t.warm.cached_tokens and t.warm.cached_tokens > 0, "the warm second turn did not use the prompt cache"
    assert t.cold.cached_tokens == 0, "the cold second turn found a cache"
    assert (t.warm.text, t.warm.count, t.warm.done_reason) == (t.cold.text, t.cold.count, t.cold.done_reason)
