"""SingleStream on its own: prefilled in slices, then mlx_lm's generate_step, it yields
what generate_step yields on the whole prompt; its one-ahead token is reachable; and
running or closing it leaves the thread's default MLX stream as it found it."""

from __future__ import annotations

import pytest

from mlx_server.engine import libs
from mlx_server.engine.sampling import GuardedProcessors
from mlx_server.engine.single import SingleStream


@pytest.fixture(scope="module")
def loaded(test_model):
    libs.import_mlx()
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(test_model))
    return model, tokenizer.encode("Summarise the plan in one line: " + "the quick brown fox " * 12)


def stream(model, prompt, max_tokens, processors=None):
    if processors is not None:
        processors.prefix = libs.mx.array(prompt[:-1])
    s = SingleStream(model, prompt, libs.lm_cache.make_prompt_cache(model), libs.lm_sample.greedy_sampler, processors, max_tokens)
    while s.prefilling:
        s.prefill(7)  # uneven slices
    return s


def reference(model, prompt, max_tokens, processors=None):
    steps = libs.lm_generate.generate_step(libs.mx.array(prompt), model, max_tokens=max_tokens, logits_processors=processors)
    return [token for token, _ in steps]


@pytest.mark.parametrize("penalty", [False, True], ids=["greedy", "repeat-penalty"])
def test_sliced_prefill_then_generate_step_matches_generate_step(loaded, penalty):
    model, prompt = loaded

    def processors():
        return libs.lm_sample.make_logits_processors(None, 1.3, 16) if penalty else None

    s = stream(model, prompt, 40, GuardedProcessors(processors()) if penalty else None)
    tokens = []
    while (step := s.next()) is not None:
        tokens.append(step[0])
    assert tokens == reference(model, prompt, 40, processors())
    assert s.cache[0].offset == len(prompt) + 40  # every token handed out was fed
    s.close()


def test_the_pending_token_is_the_next_one_and_is_not_fed(loaded):
    model, prompt = loaded
    s = stream(model, prompt, 40)
    assert not s.decoding
    handed = [s.next()[0] for _ in range(5)]
    assert s.decoding
    token, logprobs = s.take_pending()
    assert handed + [token] == reference(model, prompt, 6)
    assert logprobs.ndim == 1 and logprobs.argmax().item() == token
    assert s.cache[0].offset == len(prompt) + 5
    assert not s.decoding and s.next() is None  # the stream ended there


def test_interleaved_streams_leave_the_default_stream_alone(loaded):
    model, prompt = loaded
    mx = libs.mx
    before = mx.default_stream(mx.default_device())
    a, b = stream(model, prompt, 10), stream(model, prompt, 10)
    a.next()
    b.next()
    assert mx.default_stream(mx.default_device()) == before
    a.close()  # the first opened ends first: its stream context closes out of order
    b.next()
    b.close()
    assert mx.default_stream(mx.default_device()) == before
