"""Calls from one thread into another thread's event loop, one wake-up per batch.

The xDS server's two threads (trio owning the state, grpcio's asyncio loop
moving bytes) hand each other work for every response, request and
completed write. Scheduling each call on its own (``call_soon_threadsafe``,
``TrioToken.run_sync_soon``) wakes the other loop once per call through a
write to its self-pipe: a system call and a loop iteration per stream, which
was the largest single cost of pushing one change to a thousand streams. A
:class:`Handoff` queues the calls and schedules one drain while none is
pending, so a burst costs one wake-up and the calls run in the order made.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Handoff"]

_Item = tuple[Callable[..., None], tuple[Any, ...]]


class Handoff:
    """Runs ``function(*args)`` on the loop behind ``schedule``, in call order.

    ``schedule(callback)`` must arrange for ``callback()`` to run soon on the
    target loop from any thread, and raise ``RuntimeError`` once that loop
    is gone (both ``loop.call_soon_threadsafe`` and ``TrioToken.run_sync_soon``
    do). The queue holds no more than its callers post between two drains;
    the xDS server bounds that per stream (requests in flight, unsent
    responses), so it is bounded by the stream limit. The functions must not
    raise: an exception would escape into the target loop.
    """

    def __init__(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        self._schedule = schedule
        self._lock = threading.Lock()
        self._items: collections.deque[_Item] = collections.deque()
        self._pending = False
        self._closed = False

    def call(self, function: Callable[..., None], *args: Any) -> bool:
        """Queue ``function(*args)``; False when the target loop is gone (it never runs)."""
        with self._lock:
            if self._closed:
                return False
            self._items.append((function, args))
            if self._pending:
                return True
            self._pending = True
        try:
            self._schedule(self._drain)
        except RuntimeError:
            with self._lock:
                self._closed = True
                self._items.clear()
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._pending = False
        for function, args in items:
            function(*args)
