"""Answering a command's future never raises into the engine thread, even when the
caller cancels it between the thread's check and its answer (a client disconnect)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from mlx_server.engine.commands import fail, resolve


class CancelledAsAnswered(Future):
    """The race, made certain: the caller cancels just before the thread's answer lands
    (after any check the thread made)."""

    def set_result(self, result) -> None:
        self.cancel()
        super().set_result(result)

    def set_exception(self, exception) -> None:
        self.cancel()
        super().set_exception(exception)


@pytest.mark.parametrize("answer", [lambda f: resolve(f, 1), lambda f: fail(f, RuntimeError("x"))])
def test_a_future_cancelled_as_it_is_answered_is_left_alone(answer):
    future = CancelledAsAnswered()
    answer(future)  # the engine thread would die of InvalidStateError here
    assert future.cancelled()


def test_answers_reach_a_live_future_once():
    future: Future = Future()
    resolve(future, 1)
    resolve(future, 2)
    fail(future, RuntimeError("late"))
    assert future.result() == 1


def test_a_cancelled_future_stays_cancelled():
    future: Future = Future()
    future.cancel()
    resolve(future, 1)
    fail(future, RuntimeError("late"))
    assert future.cancelled()
