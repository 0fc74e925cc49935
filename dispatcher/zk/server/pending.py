"""An answer that will come later: the one awaitable the synchronous engine returns.

The engine answers almost every request before :meth:`Engine.handle` returns.
A request for a mirrored subtree may instead need the upstream ensemble; the
engine then returns a :class:`Pending`, and the connection's reader waits for
it before it hands the engine that connection's next request. That wait is
what keeps ZooKeeper's per-session FIFO order while other sessions go on.
"""

from __future__ import annotations

import trio


class Pending:
    """Set once, when the deferred reply has been queued to the client."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def finish(self) -> None:
        self._event.set()

    @property
    def finished(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


__all__ = ["Pending"]
