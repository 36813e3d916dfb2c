"""Slots: several sessions over one shared Model, so that a server answers several conversations at once.

Each slot is an LMInfinite with its own llama.cpp context (its own sinks, window and bounded cache) on the weights
loaded once. A request takes a free slot, preferring the one whose sequence already holds the conversation it
continues (only the new messages are then evaluated); otherwise the least recently used one. With no slot free
it waits its turn (first come, first served).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from typing import Callable, List, Optional

__all__ = ["SlotPool", "open_sessions"]


class SlotPool:
    """Hands out sessions, one request at a time each."""

    POLL_S = 0.2  # how often a waiting request checks whether it should give up (client gone, shutdown)

    def __init__(self, sessions: List, model=None):
        if not sessions:
            raise ValueError("a slot pool needs at least one session")
        self.sessions = list(sessions)
        self.model = model  # a shared Model the pool owns (closed after the sessions), or None
        self._cond = threading.Condition()
        self._free = set(range(len(self.sessions)))
        self._queue: deque = deque()              # tickets of waiting requests, oldest first
        self._tickets = itertools.count()
        self._clock = itertools.count(1)
        self._last_used = [0] * len(self.sessions)
        self.closed = False

    def __len__(self) -> int:
        return len(self.sessions)

    def busy(self) -> int:
        """Slots in use now."""
        with self._cond:
            return len(self.sessions) - len(self._free)

    @contextlib.contextmanager
    def acquire(self, score: Optional[Callable[[object], int]] = None,
                give_up: Optional[Callable[[], bool]] = None):
        """A free session for one request. score(session) ranks free sessions (higher: better, e.g. the length of
        the conversation it already holds); ties go to the least recently used. give_up() is polled while waiting:
        when it returns True, or the pool is closed, acquire raises TimeoutError (the caller's client left, or the
        server is stopping)."""
        ticket = next(self._tickets)
        with self._cond:
            if self.closed:
                raise TimeoutError("the slot pool is closed")
            self._queue.append(ticket)
            try:
                while not (self._free and self._queue[0] == ticket):
                    if self.closed or (give_up is not None and give_up()):
                        raise TimeoutError("the slot pool is closed" if self.closed else "gave up waiting for a slot")
                    self._cond.wait(self.POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            slot = max(self._free, key=lambda i: (score(self.sessions[i]) if score else 0, -self._last_used[i]))
            self._free.remove(slot)
        try:
            yield self.sessions[slot]
        finally:
            with self._cond:
                self._last_used[slot] = next(self._clock)
                self._free.add(slot)
                self._cond.notify_all()

    def cancel_all(self) -> None:
        for session in self.sessions:
            cancel = getattr(session, "cancel", None)
            if cancel is not None:
                cancel()

    def close(self, timeout: float = 30.0) -> bool:
        """Wait up to timeout for the running requests, then close every session and the owned model. False (and
        nothing closed) when a request is still running."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: len(self._free) == len(self.sessions), timeout):
                return False
            for session in self.sessions:
                close = getattr(session, "close", None)
                if close:
                    close()
            if self.model is not None:
                self.model.close()
        return True


def open_sessions(model_path, parallel: int, **kwargs) -> SlotPool:
    """`parallel` LMInfinite sessions on one Model loaded from model_path (n_gpu_layers and rpc_servers go to the
    Model, verbose to both), as a pool that owns them and the model."""
    from .engine import LMInfinite
    from .models import Model

    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, not {parallel!r}")
    model = Model(model_path, n_gpu_layers=kwargs.pop("n_gpu_layers", 0), rpc_servers=kwargs.pop("rpc_servers", None),
                  rpc_timeout=kwargs.pop("rpc_timeout", None),
                  verbose=kwargs.get("verbose", False))
    sessions = []
    try:
        for _ in range(parallel):
            sessions.append(LMInfinite(model, **kwargs))
    except BaseException:
        for s in sessions:
            s.close()
        model.close()
        raise
    return SlotPool(sessions, model)
