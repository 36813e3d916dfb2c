"""slots.SlotPool on its own (no model): which slot a request gets, the queue, giving up, closing; and the server's
score of a slot by the conversation it holds (the default model)."""

from __future__ import annotations

import threading
import time

import pytest

from lminf_gguf.slots import SlotPool


class Session:
    def __init__(self, name):
        self.name, self.closed, self.cancelled = name, False, False

    def close(self):
        self.closed = True

    def cancel(self):
        self.cancelled = True


def test_prefers_the_best_score_then_the_least_recently_used():
    a, b, c = Session("a"), Session("b"), Session("c")
    pool = SlotPool([a, b, c])
    with pool.acquire() as s1:
        assert s1 is a  # all unused: the first
    with pool.acquire() as s2:
        assert s2 is b  # a was used last: b, c are older
    with pool.acquire(score=lambda s: 5 if s is a else 0) as s3:
        assert s3 is a  # the one holding the conversation, though used before
    assert pool.busy() == 0


def test_waiters_are_served_in_order_and_can_give_up():
    pool = SlotPool([Session("only")])
    order, gone = [], threading.Event()
    hold = pool.acquire()
    hold.__enter__()

    def waiter(i):
        try:
            with pool.acquire(give_up=(gone.is_set if i == 1 else None)):
                order.append(i)
        except TimeoutError:
            order.append(f"{i} gave up")

    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)  # queue in order 0, 1, 2
    gone.set()  # waiter 1's client leaves while queued
    time.sleep(2 * SlotPool.POLL_S)
    hold.__exit__(None, None, None)
    for t in threads:
        t.join(10)
    assert order == ["1 gave up", 0, 2]


def test_close_waits_for_running_requests_and_closes_everything():
    sessions = [Session("a"), Session("b")]
    pool = SlotPool(sessions)
    running = pool.acquire()
    running.__enter__()
    assert pool.close(timeout=0.2) is False and not any(s.closed for s in sessions)
    threading.Timer(0.2, running.__exit__, (None, None, None)).start()
    assert pool.close(timeout=10) is True and all(s.closed for s in sessions)
    with pytest.raises(TimeoutError):  # a request arriving after the close is turned away (503 in the server)
        with pool.acquire():
            pass


def test_an_empty_pool_is_refused():
    with pytest.raises(ValueError):
        SlotPool([])


def test_a_continuation_scores_its_own_slot_and_renders_once(monkeypatch):
    """The server's slot choice (handler.held_prefix_score): the session that holds the conversation scores its
    length, the others 0, and the conversation is rendered once for all the free sessions, not once per session."""
    from conftest import DEFAULT_MODEL
    from lminf_gguf import handler, responses
    from lminf_gguf.slots import open_sessions

    if DEFAULT_MODEL is None:
        pytest.skip("the offline default model is not installed")
    pool = open_sessions(DEFAULT_MODEL, 3, n_local=256, n_threads=2)
    try:
        for i, other in ((0, "Count to three."), (2, "Name a colour.")):  # busy slots, other conversations
            pool.sessions[i].create_chat_completion([{"role": "user", "content": other}], max_tokens=4, temperature=0)
        first = [{"role": "user", "content": "Say one word."}]
        reply = pool.sessions[1].create_chat_completion(first, max_tokens=4, temperature=0)
        follow = first + [reply["choices"][0]["message"], {"role": "user", "content": "And another."}]
        calls = []
        render = responses.render_chat
        monkeypatch.setattr(responses, "render_chat", lambda *args: calls.append(1) or render(*args))
        score = handler.held_prefix_score(follow)
        scores = [score(s) for s in pool.sessions]
        assert scores[1] > 0 and scores[0] == scores[2] == 0, scores
        assert len(calls) == 1
        # a conversation the session does not hold scores 0 there too
        assert handler.held_prefix_score([{"role": "user", "content": "Other."}])(pool.sessions[1]) == 0
    finally:
        pool.close()
